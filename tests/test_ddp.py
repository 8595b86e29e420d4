"""torchrun with two CPU processes (gloo): the CLI trains through DistributedDataParallel, only rank 0
prints and writes, and both ranks end with identical weights; --sync-bn is refused on CPU."""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_train import make_photo_folder  # noqa: E402

from fastcolor.models import build_model  # noqa: E402

_WRAPPER = """
import json, os, sys
from safetensors.torch import save_file
import fastcolor.train as ft
from fastcolor.app import cli

_train = ft.train


def train(cfg):  # the CLI's own train(), and each rank's weights for the test
    res = _train(cfg)
    state = {k: v.detach().clone().contiguous() for k, v in res.model.state_dict().items()}
    save_file(state, os.path.join(os.environ["FC_OUT"], "rank" + os.environ["RANK"] + ".safetensors"))
    with open(os.path.join(os.environ["FC_OUT"], "val" + os.environ["RANK"] + ".json"), "w") as f:
        json.dump([h["val_loss"] for h in res.history], f)
    return res

ft.train = train  # cmd_train imports train from fastcolor.train when it runs
sys.exit(cli.main(sys.argv[1:]))
"""


def test_the_cli_under_torchrun_prints_once_and_ends_identical(tmp_path):
    data = make_photo_folder(tmp_path / "photos", per_photo=2, size=32)
    run, out = tmp_path / "run", tmp_path / "out"
    out.mkdir()
    wrapper = tmp_path / "wrapper.py"
    wrapper.write_text(_WRAPPER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FC_OUT": str(out),
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(wrapper),
           "train", str(data), "--out", str(run), "--model", "zhang-tiny", "--workers", "0", "--epochs", "2",
           "--batch-size", "2", "--max-steps-per-epoch", "2", "--device", "cpu", "--log-every", "1"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert sum(ln.startswith("trained zhang-tiny") for ln in lines) == 1, proc.stdout
    assert sum(ln.startswith("epoch   0") for ln in lines) == 1, proc.stdout
    assert proc.stderr.count("fastcolor: recipe default:") == 1, proc.stderr[-3000:]
    s0, s1 = load_file(str(out / "rank0.safetensors")), load_file(str(out / "rank1.safetensors"))
    assert s0.keys() == s1.keys() and s0
    for k in s0:
        assert torch.equal(s0[k], s1[k]), k
    # training happened (weights moved from the seeded initial ones), both ranks saw the same all-reduced
    # validation losses, and rank 0 wrote the run
    torch.manual_seed(0)
    init = build_model("zhang_tiny").state_dict()
    assert any(k.endswith("weight") and not torch.equal(s0[k], init[k]) for k in s0)
    v0, v1 = (json.loads((out / f"val{r}.json").read_text()) for r in (0, 1))
    assert v0 == v1 and len(v0) == 2
    assert json.loads((run / "result.json").read_text())["epochs_completed"] == 2
    assert (run / "last.safetensors").is_file() and (run / "model.safetensors").is_file()


def test_sync_bn_on_cpu_is_refused_saying_why(tmp_path, capsys):
    from fastcolor.app.cli import main

    data = make_photo_folder(tmp_path / "photos", per_photo=1, size=32)
    assert main(["train", str(data), "--out", str(tmp_path / "run"), "--device", "cpu", "--sync-bn"]) == 2
    err = capsys.readouterr().err
    assert "--sync-bn: torch's SyncBatchNorm runs on CUDA devices only" in err
    assert not (tmp_path / "run").exists()
