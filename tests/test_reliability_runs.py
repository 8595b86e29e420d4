"""Issue 13 (reliability, second pass), the application's and the training loop's side: run
directories owned by one process, splits and priors that go stale, FIFOs and dangling links
among inputs, crafted weights files, outputs that are inputs, and the one-line messages of
the cases that used to end in a raw exception. Each test holds the minimal input that
exposed the bug."""
import errno
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastcolor.app.cli import main
from fastcolor.data import index_images, load_rgb, load_split
from fastcolor.io import (
    LOCK_FILE,
    DirectoryLockedError,
    check_unlocked,
    load_checkpoint,
    load_tensors,
    lock_directory,
    save_checkpoint,
    save_tensors,
)
from fastcolor.models import build_model
from fastcolor.models.serialization import load_model, save_model
from fastcolor.train import CheckpointError, TrainConfig, train

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_train import one_thread  # noqa: E402,F401  (autouse: one intra-op thread)

REPO = Path(__file__).resolve().parents[1]


def _photos(folder: Path, n: int, start: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(start, start + n):
        rng = np.random.default_rng(i)
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"im{i:02d}.png")
    return folder


def _cfg(data, run, **kw):
    base = dict(data_dir=str(data), run_dir=str(run), model="zhang_tiny", batch_size=4, epochs=1, lr=1e-3,
                workers=0, progress=False, plot=False, max_steps_per_epoch=1)
    base.update(kw)
    return TrainConfig(**base)


def _train_argv(data, run, *extra):
    return ["train", str(data), "--model", "zhang-tiny", "--epochs", "1", "--batch-size", "4", "--workers", "0",
            "--max-steps-per-epoch", "1", "--out", str(run), "-q", *extra]


def _run(capsys, *argv):
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _one_error_line(rc, err, *fragments, code=2) -> str:
    assert rc == code, err
    lines = [ln for ln in err.splitlines()
             if ln.strip() and (ln.startswith("fastcolor: error:") or not ln.startswith("fastcolor: "))]
    assert len(lines) == 1 and lines[0].startswith("fastcolor: error: "), err
    assert "Traceback" not in err
    for f in fragments:
        assert f in lines[0], (f, err)
    return lines[0]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return _photos(tmp_path_factory.mktemp("runs") / "data", 12)


@pytest.fixture(scope="module")
def zhang_file(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "zhang.safetensors"
    save_model(path, build_model({"arch": "zhang", "base": 8, "mid_width": 16, "mid_dilations": [2],
                                  "input_size": 32}))
    return path


# ----------------------------------------------------------------------------- 1. run directory lock

_HOLDER = """
import sys, time
from fastcolor.io import lock_directory
with lock_directory(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(120)
"""


@pytest.mark.timeout(120)
def test_a_second_train_on_a_run_directory_in_use_refuses_naming_the_owner(capsys, data, tmp_path, monkeypatch):
    """Before: a second train on R deleted the first one's in-flight .last.safetensors.<x>.tmp
    (and rewrote train_config.json). Now R is locked; the lock dies with its owner (kill -9)."""
    run = tmp_path / "R"
    run.mkdir()
    inflight = run / ".last.safetensors.abc123.tmp"  # the first process's checkpoint being written
    inflight.write_bytes(b"half a checkpoint")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(run)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "locked"
        rc, _, err = _run(capsys, *_train_argv(data, run, "--resume"))
        _one_error_line(rc, err, str(run), f"pid {holder.pid}", "in use")
        with pytest.raises(DirectoryLockedError, match=f"pid {holder.pid}"):
            train(_cfg(data, run))
        assert inflight.read_bytes() == b"half a checkpoint"
        assert sorted(p.name for p in run.iterdir()) == sorted([LOCK_FILE, inflight.name])  # nothing written
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # kill -9 released it: the next run takes the directory (and clears the dead one's temp file)
    seen = []
    import fastcolor.train as ft

    real_save = ft.save_checkpoint

    def probing_save(path, *a, **k):  # while training, the directory is locked against others
        with pytest.raises(DirectoryLockedError, match=f"pid {os.getpid()}"):
            check_unlocked(run, "training run")
        seen.append(Path(path).name)
        return real_save(path, *a, **k)

    monkeypatch.setattr(ft, "save_checkpoint", probing_save)
    train(_cfg(data, run))
    assert seen and not inflight.exists()
    check_unlocked(run)  # released on return
    with lock_directory(run):
        pass


# ----------------------------------------------------------------------------- 2. stale split and prior


def test_a_folder_that_grew_gets_a_new_split_instead_of_got_1_and_0(tmp_path):
    data, run = _photos(tmp_path / "data", 1), tmp_path / "run"
    with pytest.raises(ValueError, match="got 1 and 0"):
        train(_cfg(data, run))
    _photos(data, 12, start=1)
    with pytest.warns(UserWarning, match=r"split.json is out of date \(12 image file\(s\) added"):
        res = train(_cfg(data, run))
    assert res.epochs_completed == 1
    split = load_split(run / "split.json")
    assert sum(len(v) for v in split.values()) == 13


def test_stale_split_and_prior_are_rebuilt_without_a_checkpoint_and_refused_on_resume(capsys, tmp_path, monkeypatch):
    import fastcolor.train as ft

    data, run = _photos(tmp_path / "data", 12), tmp_path / "run"

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:  # an attempt stopped before its first checkpoint
        m.setattr(ft._Trainer, "run_period", interrupted)
        with pytest.raises(KeyboardInterrupt):
            train(_cfg(data, run))
    assert [len(v) for v in load_split(run / "split.json").values()] == [10, 1, 1]
    old_prior = load_tensors(run / "prior.safetensors")[0]["prior"]
    _photos(data, 28, start=12)
    with pytest.warns(UserWarning, match="out of date"):
        train(_cfg(data, run))
    assert [len(v) for v in load_split(run / "split.json").values()] == [32, 4, 4]  # was the old 10/1/1
    prior, meta = load_tensors(run / "prior.safetensors")
    assert not torch.equal(prior["prior"], old_prior) and meta["size"] == 32
    # with a checkpoint, a changed folder is refused, saying what changed
    (data / "im39.png").unlink()
    _photos(data, 1, start=40)
    changed = r"1 image file\(s\) added \(im40.png\); 1 image file\(s\) removed \(im39.png\)"
    with pytest.raises(ValueError, match=changed):
        train(_cfg(data, run, epochs=2))
    rc, _, err = _run(capsys, *_train_argv(data, run, "--resume", "--epochs", "2"))
    _one_error_line(rc, err, "split.json", "im40.png", "--restart")
    assert load_checkpoint(run / "last.safetensors")["meta"]["epoch"] == 0  # untouched


# ----------------------------------------------------------------------------- 3. FIFOs


@pytest.mark.timeout(60)
def test_a_fifo_named_like_an_image_is_skipped_never_read(capsys, zhang_file, tmp_path):
    """Before: `fastcolor colorize x.png` on a FIFO hung forever in open()."""
    folder = _photos(tmp_path / "in", 1)
    os.mkfifo(folder / "x.png")
    rc, _, err = _run(capsys, "colorize", folder / "x.png", "-o", tmp_path / "o1", "--weights", zhang_file)
    _one_error_line(rc, err, "nothing was colorized")
    assert "x.png: a FIFO (named pipe), not a regular file" in err
    rc, _, err = _run(capsys, "colorize", folder, "-o", tmp_path / "o2", "--weights", zhang_file, "-q")
    assert rc == 0 and "skipping" in err and "FIFO" in err, err
    assert (tmp_path / "o2" / "im00.png").is_file()
    with pytest.raises(OSError, match="FIFO"):  # the dataset / eval path
        load_rgb(folder / "x.png")
    with pytest.warns(UserWarning, match=r"x.png \(a FIFO"):  # train and eval index it as unreadable
        assert [it.path for it in index_images(folder)] == ["im00.png"]


# ----------------------------------------------------------------------------- 4. crafted weights files


def _fusion_file(tmp_path, **config):
    model = build_model("fusion_tiny")
    path = tmp_path / "fusion.safetensors"
    save_model(path, model)
    tensors, meta = load_tensors(path)
    save_tensors(path, tensors, {"format": "fastcolor-model-1", "model_config": {**meta["model_config"], **config}})
    return path


def test_every_size_field_of_a_stored_config_is_checked_before_allocating(tmp_path, zhang_file, monkeypatch):
    """Before: a 7 MB fusion file with embed_size 30000 allocated 10.8 GB inside load_model."""
    from fastcolor.colorize import MemoryLimitError
    from fastcolor.models import fusion

    crafted_fusion = _fusion_file(tmp_path, embed_size=200_000)
    real_init = fusion.Embedder.__init__

    def only_on_meta(self, *a, **k):  # a real (non-meta) backbone would allocate the probe pass
        assert torch.empty(0).device.type == "meta", "a backbone was built for real before the memory check"
        real_init(self, *a, **k)

    monkeypatch.setattr(fusion.Embedder, "__init__", only_on_meta)
    with pytest.raises(MemoryLimitError, match=r"embed_size=200000.*needs about"):
        load_model(crafted_fusion)
    # a million blocks listed next to a few tensors: refused before even the meta skeleton
    tensors, meta = load_tensors(zhang_file)
    crafted = tmp_path / "blocks.safetensors"
    save_tensors(crafted, tensors, {"format": "fastcolor-model-1",
                                    "model_config": {**meta["model_config"], "mid_dilations": [1] * 1_000_000}})
    with pytest.raises(ValueError, match="mid_dilations lists 1000000 blocks"):
        load_model(crafted)


def test_a_backbone_path_stored_in_a_weights_file_is_never_opened(tmp_path, monkeypatch, capsys, data):
    from fastcolor.models import fusion

    opened = []
    monkeypatch.setattr(fusion, "load_state_file", lambda p: opened.append(p) or {})
    existing = tmp_path / "secret.bin"
    existing.write_bytes(b"not weights")
    messages = []
    for target in (existing, tmp_path / "missing.bin"):
        path = _fusion_file(tmp_path, backbone_weights=str(target))
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            model = load_model(path)
        assert model.config["backbone_weights"] is None
        messages.append(" ".join(str(x.message) for x in w).replace(str(target), "PATH"))
    assert opened == [] and messages[0] == messages[1] and "never read" in messages[0]
    # resuming a checkpoint that names backbone weights: refused, the path not read either
    run = tmp_path / "run"
    model = build_model("fusion_tiny")
    config = {**model.config, "backbone_weights": str(existing)}
    opt = torch.optim.Adam(p for p in model.parameters() if p.requires_grad)
    save_checkpoint(run / "last.safetensors", {k: v for k, v in model.state_dict().items()
                                              if not k.startswith("embedder.")}, config, opt,
                    epoch=0, history=[{"epoch": 0, "train_loss": 1.0, "val_loss": 1.0}], best_val_loss=1.0,
                    best_epoch=0, bad_epochs=0, stopped_early=False)
    with pytest.raises(ValueError, match="never read: pass backbone_weights"):
        train(_cfg(data, run, model="fusion_tiny", loss="mse"))
    assert opened == []


# ----------------------------------------------------------------------------- 9. outputs that are inputs


def test_overwrite_never_replaces_an_input_of_the_same_command(capsys, zhang_file, tmp_path, monkeypatch):
    """Before: `colorize q out9/sub/x.png -o out9 --overwrite` replaced the input out9/sub/x.png."""
    monkeypatch.chdir(tmp_path)
    _photos(Path("q/sub"), 1)
    (Path("q/sub/im00.png")).rename("q/sub/x.png")
    _photos(Path("out9/sub"), 1, start=5)
    Path("out9/sub/im05.png").rename("out9/sub/x.png")
    before = Path("out9/sub/x.png").read_bytes()
    rc, _, err = _run(capsys, "colorize", "q", "out9/sub/x.png", "-o", "out9", "--overwrite", "--weights",
                      zhang_file)
    _one_error_line(rc, err, "out9/sub/x.png", "also an input")
    assert Path("out9/sub/x.png").read_bytes() == before


# ----------------------------------------------------------------------------- weak messages


def test_a_dangling_symlink_among_inputs_is_skipped_and_named(capsys, zhang_file, tmp_path):
    folder = _photos(tmp_path / "in", 1)
    (folder / "gone.png").symlink_to(tmp_path / "nowhere.png")
    (tmp_path / "link.png").symlink_to(tmp_path / "nowhere.png")
    rc, _, err = _run(capsys, "colorize", tmp_path / "link.png", folder, "-o", tmp_path / "out", "--weights",
                      zhang_file, "-q")
    assert rc == 0, err  # before: "no such file or directory: link.png", exit 2
    assert f"link.png: a symbolic link to '{tmp_path / 'nowhere.png'}', which does not exist" in err
    assert "gone.png: a symbolic link" in err and "Errno" not in err


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full here")
def test_output_that_is_a_device_and_absurd_sizes_are_one_line_errors(capsys, zhang_file, data, tmp_path):
    rc, _, err = _run(capsys, "colorize", data / "im00.png", "-o", "/dev/full", "--weights", zhang_file)
    _one_error_line(rc, err, "-o /dev/full", "a character device", "not a folder")  # before: "File exists"
    rc, _, err = _run(capsys, "colorize", data / "im00.png", "-o", tmp_path / "o", "--weights", zhang_file,
                      "--size", "1000000000000")
    _one_error_line(rc, err, "--size", "65536")  # before: "Storage size calculation overflowed"
    rc, _, err = _run(capsys, *_train_argv(data, tmp_path / "r", "--size", "1000000000000"))
    _one_error_line(rc, err, "--size", "65536")
    assert not (tmp_path / "r").exists()
    from fastcolor.colorize import MemoryLimitError, colorize_image  # the library: a memory refusal, no overflow

    with pytest.raises(MemoryLimitError, match="needs about"):
        colorize_image(load_model(zhang_file), np.zeros((8, 8), np.uint8), size=10**12)


@pytest.mark.parametrize("device", ["foo", "meta", "mps"])
def test_train_refuses_a_device_it_cannot_use_before_writing_anything(capsys, data, tmp_path, device):
    run = tmp_path / "run"
    rc, _, err = _run(capsys, *_train_argv(data, run, "--device", device))
    _one_error_line(rc, err, f"--device {device}", "'cpu', 'cuda'")
    assert not run.exists()
    with pytest.raises(ValueError, match="device"):
        TrainConfig(data_dir=str(data), run_dir=str(run), device=device)


def _corrupt(path: Path, how: str) -> None:
    if how == "empty":
        path.write_bytes(b"")
    elif how == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:  # the training state in the metadata damaged: no history, epoch a string
        ck = load_checkpoint(path)
        meta = {k: v for k, v in ck["meta"].items() if k != "history"}
        meta["epoch"] = "three"
        tensors = {f"model.{k}": v for k, v in ck["model_state"].items()}
        save_tensors(path, tensors, {"format": "fastcolor-checkpoint-1", "model_config": ck["model_config"],
                                     "meta": meta})


@pytest.mark.parametrize("how", ["empty", "truncated", "metadata"])
def test_resume_from_a_damaged_checkpoint_says_what_to_do_and_restart_works(capsys, data, tmp_path, how):
    run = tmp_path / "run"
    assert _run(capsys, *_train_argv(data, run))[0] == 0
    _corrupt(run / "last.safetensors", how)
    line = _one_error_line(*_run(capsys, *_train_argv(data, run, "--resume"))[::2], "last.safetensors",
                           "best.safetensors (epoch 0) is intact", "--restart")
    assert ("damaged training state" in line) == (how == "metadata"), line  # before: KeyError 'history'
    with pytest.raises(CheckpointError, match="restart=True"):
        train(_cfg(data, run))
    rc, _, err = _run(capsys, *_train_argv(data, run, "--restart"))
    assert rc == 0, err
    assert load_checkpoint(run / "last.safetensors")["meta"]["epoch"] == 0


def test_disk_full_while_training_names_the_file_and_the_space(capsys, data, tmp_path, monkeypatch):
    real = os.replace

    def full(src, dst, *a, **k):
        if str(dst).endswith("last.safetensors"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", full)
    rc, _, err = _run(capsys, *_train_argv(data, tmp_path / "run"))
    _one_error_line(rc, err, "No space left on device writing", "last.safetensors", "it needs about", "free there",
                    code=1)  # before: "OSError: [Errno 28] No space left on device"
    assert not list((tmp_path / "run").glob(".*.tmp"))


def test_eval_on_a_folder_of_only_unreadable_images(capsys, zhang_file, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.png").write_bytes(b"")
    (bad / "b.jpg").write_text("not a jpeg")
    rc, _, err = _run(capsys, "eval", zhang_file, bad, "--split", "all")
    _one_error_line(rc, err, f"DATA {bad}: no readable image", "a.png (empty file", "b.jpg (not a readable image")


# ----------------------------------------------------------------------------- issue 23: train


def test_resume_as_another_model_is_refused_and_keeps_train_config(capsys, tmp_path):
    """23.7: `--resume --model zhang-small` on a zhang-tiny run went on with the tiny model while recording and
    announcing zhang-small. 23.8: a refused --resume rewrote train_config.json with settings never used."""
    data, run = _photos(tmp_path / "data", 12), tmp_path / "run"
    rc, _, err = _run(capsys, *_train_argv(data, run))
    assert rc == 0, err
    recorded = (run / "train_config.json").read_bytes()
    last = (run / "last.safetensors").read_bytes()
    small = [*_train_argv(data, run, "--resume")]
    small[small.index("zhang-tiny")] = "zhang-small"
    rc, _, err = _run(capsys, *small)
    _one_error_line(rc, err, "holds a 'zhang_tiny' model", "'zhang_small'", "--model", "--restart")
    rc, _, err = _run(capsys, *_train_argv(data, run, "--resume", "--size", "64"))
    _one_error_line(rc, err, "--size")
    assert (run / "train_config.json").read_bytes() == recorded and (run / "last.safetensors").read_bytes() == last
    rc, _, err = _run(capsys, *_train_argv(data, run, "--resume"))  # the same settings still resume
    assert rc == 0, err


@pytest.mark.parametrize("flags, fragments", [
    (("--betas", "1", "1"), ("--betas", "[0, 1)", "(1.0, 1.0)")),
    (("--prior-lambda", "2"), ("--prior-lambda", "[0, 1]", "2.0")),
    (("--crop-size", "64"), ("--crop-size", "at most the image size", "32", "64")),
    (("--seed", "-1"), ("--seed", "0..2**63-1", "-1")),
    (("--seed", str(2**64)), ("--seed", "0..2**63-1", str(2**64))),
])
def test_bad_settings_name_their_flag_and_write_nothing(capsys, tmp_path, flags, fragments):
    """Before: the message named no option, and split.json, prior.safetensors and train_config.json were left."""
    data = _photos(tmp_path / "data", 12)
    rc, _, err = _run(capsys, *_train_argv(data, tmp_path / "run", *flags))
    _one_error_line(rc, err, *fragments)
    assert not (tmp_path / "run").exists()


def test_one_unreadable_image_is_warned_once_with_two_workers(capsys, tmp_path):
    """Before: once per worker process and epoch (5 times over 3 epochs with --workers 2)."""
    data = _photos(tmp_path / "data", 16)
    (data / "bad.png").write_bytes(b"garbage" * 50)
    rc, _, err = _run(capsys, "train", data, "--model", "zhang-tiny", "--epochs", "3", "--batch-size", "4",
                      "--workers", "2", "--out", tmp_path / "run", "-q", "--prior", "data")
    assert rc == 0, err
    assert err.count("skipping unreadable image") == 1 and "skipping unreadable image 'bad.png'" in err, err


def test_images_vanishing_during_training_give_one_readable_line(capsys, tmp_path, monkeypatch):
    """Before: the worker's whole traceback, squeezed into one line."""
    from fastcolor.training.source import FolderSource

    data = _photos(tmp_path / "data", 16)
    real = FolderSource.train_loader

    def vanish(self, epoch, skip=0):
        if epoch == 1:
            for p in data.glob("*.png"):
                p.unlink()
        return real(self, epoch, skip)

    monkeypatch.setattr(FolderSource, "train_loader", vanish)
    rc, _, err = _run(capsys, "train", data, "--model", "zhang-tiny", "--epochs", "3", "--batch-size", "4",
                      "--workers", "2", "--out", tmp_path / "run", "-q")
    line = _one_error_line(rc, err, f"{data}: none of", "could be read", "No such file or directory")
    assert "Original Traceback" not in line and "DataLoader worker" not in line and len(line) < 400, line
