"""Two CPU processes (gloo) train a few steps through DistributedDataParallel and end identical."""
import os
import socket
import sys
from pathlib import Path

import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_train import make_photo_folder  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, data: str, run: str, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from fastcolor.train import TrainConfig, train

    res = train(TrainConfig(data_dir=data, run_dir=run, model="zhang_tiny", batch_size=4, epochs=2, lr=3e-3,
                            workers=0, progress=False, plot=False, device="cpu"))
    state = {k: v.detach().clone().contiguous() for k, v in res.model.state_dict().items()}
    save_file(state, os.path.join(out, f"rank{rank}.safetensors"))
    save_file({"val": torch.tensor([h["val_loss"] for h in res.history])}, os.path.join(out, f"hist{rank}.safetensors"))


def test_two_process_gloo_training_ends_with_identical_weights(tmp_path):
    data = make_photo_folder(tmp_path / "photos", per_photo=4, size=32)
    run, out = tmp_path / "run", tmp_path / "out"
    out.mkdir()
    init = None
    torch.manual_seed(0)
    from fastcolor.models import build_model

    init = build_model("zhang_tiny").state_dict()
    # fork: no re-import of torch in the children (CPU only, nothing CUDA is initialised here)
    mp.start_processes(_worker, args=(2, _free_port(), str(data), str(run), str(out)), nprocs=2, join=True,
                       start_method="fork" if sys.platform == "linux" else "spawn")
    s0, s1 = load_file(str(out / "rank0.safetensors")), load_file(str(out / "rank1.safetensors"))
    assert s0.keys() == s1.keys() == init.keys()
    for k in s0:
        assert torch.equal(s0[k], s1[k]), k
    # training happened (weights moved) and both ranks saw the same all-reduced validation losses
    moved = [k for k in s0 if s0[k].is_floating_point() and not torch.equal(s0[k], init[k])]
    assert any(k.endswith("weight") for k in moved)
    assert torch.equal(load_file(str(out / "hist0.safetensors"))["val"], load_file(str(out / "hist1.safetensors"))["val"])
    assert (run / "last.safetensors").is_file() and (run / "model.safetensors").is_file()
