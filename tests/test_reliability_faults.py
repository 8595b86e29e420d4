"""Faults: a training process SIGKILLed at random moments always resumes from an intact
checkpoint; every output file (checkpoints, model, metrics, split, prior, PNGs, colorized
images, embedding cache) is written atomically, so a failure or a kill in the middle of a
write leaves the previous file as it was."""
import json
import multiprocessing as mp
import os
import random
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import fastcolor.io as fio
from fastcolor.io import load_checkpoint, load_tensors
from fastcolor.models.serialization import load_model, save_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_train import make_photo_folder, one_thread  # noqa: E402,F401  (autouse: one intra-op thread)

FORK = mp.get_context("fork")  # children start at once: torch is already imported


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return make_photo_folder(tmp_path_factory.mktemp("photos"), per_photo=3, size=32)


def _train_cfg(photos, run, **kw):
    from fastcolor.train import TrainConfig

    base = dict(data_dir=str(photos), run_dir=str(run), model="zhang_tiny", batch_size=4, epochs=1000,
                patience=1000, lr=1e-3, workers=0, progress=False, plot=True)
    return TrainConfig(**{**base, **kw})


def _slow_disk(flag: Path | None = None, hang: float = 0.0):
    """fsync takes 15 ms (a slow disk: kills land inside writes more often); with ``flag``, the
    first fsync of a checkpoint announces itself and then hangs for ``hang`` seconds."""
    real = os.fsync

    def fsync(fd):
        name = os.readlink(f"/proc/self/fd/{fd}") if os.path.exists(f"/proc/self/fd/{fd}") else ""
        if flag is not None and "last.safetensors" in name and name.endswith(".tmp"):
            flag.write_text(name)
            time.sleep(hang)
        time.sleep(0.015)
        return real(fd)
    os.fsync = fsync


def _child_train(photos, run, flag, hang):
    torch.set_num_threads(1)
    _slow_disk(flag, hang)
    from fastcolor.train import train

    train(_train_cfg(photos, run))


def _check_run_dir(run: Path) -> int | None:
    """Every file a killed run left must be whole; returns the epoch of last.safetensors (None if absent)."""
    for name in ("train_config.json", "split.json", "result.json"):
        if (run / name).exists():
            json.loads((run / name).read_text())
    if (run / "prior.safetensors").exists():
        assert load_tensors(run / "prior.safetensors")[0]["weights"].shape == (313,)
    last = None
    if (run / "last.safetensors").exists():
        ck = load_checkpoint(run / "last.safetensors")
        last = ck["meta"]["epoch"]
        assert ck["optimizer_state"]["state"] and [h["epoch"] for h in ck["meta"]["history"]] == list(range(last + 1))
    if (run / "best.safetensors").exists():
        best = load_checkpoint(run / "best.safetensors")["meta"]["epoch"]
        assert last is not None and best <= last  # never from an epoch that the resume will repeat
        # it is the recorded best, or one improvement behind when the kill fell between the
        # two writes (the resume then rewrites it from last.safetensors)
        assert best == ck["meta"]["best_epoch"] or ck["meta"]["best_epoch"] == last
    if (run / "metrics.jsonl").exists():
        rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
        # metrics are written right after the checkpoint: at most one epoch behind it
        assert last is not None and len(rows) in (last, last + 1)
    if (run / "loss_curve.png").exists():
        from PIL import Image

        with Image.open(run / "loss_curve.png") as im:
            im.load()
    return last


@pytest.mark.timeout(120)
def test_sigkill_at_random_moments_always_resumes_from_an_intact_checkpoint(photos, tmp_path):
    """One run directory, five processes in a row, each SIGKILLed: one exactly inside a
    checkpoint write, four after random delays (import, split, prior, epochs, writes)."""
    from fastcolor.train import train

    run = tmp_path / "run"
    rng = random.Random(20240611)
    delays = ["mid-write"] + [rng.uniform(0.2, 3.0) for _ in range(4)]
    epochs_seen, mid_write_kills, t_start = [], 0, time.time()
    for i, delay in enumerate(delays):
        flag = tmp_path / f"writing{i}"
        proc = FORK.Process(target=_child_train, args=(photos, run, flag if delay == "mid-write" else None, 30.0))
        proc.start()
        try:
            if delay == "mid-write":
                deadline = time.time() + 40
                while not flag.exists() and proc.is_alive() and time.time() < deadline:
                    time.sleep(0.01)
                assert flag.exists(), "the child never wrote a checkpoint"
            else:
                time.sleep(delay)
            assert proc.is_alive(), f"training ended on its own (exit {proc.exitcode})"
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join()
        assert proc.exitcode == -signal.SIGKILL
        tmp_left = list(run.glob(".*.tmp")) if run.exists() else []
        mid_write_kills += bool(tmp_left)
        if delay == "mid-write":
            assert any("last.safetensors" in p.name for p in tmp_left)  # killed inside that write
        epoch = _check_run_dir(run) if run.exists() else None
        if epochs_seen and epochs_seen[-1] is not None:
            assert epoch is not None and epoch >= epochs_seen[-1]  # never goes back
        epochs_seen.append(epoch)
    assert mid_write_kills >= 1
    last = epochs_seen[-1]
    if last is None:  # every kill landed before the first checkpoint: start from scratch
        res = train(_train_cfg(photos, run, epochs=2, plot=False))
        assert res.resumed_from_epoch is None
    else:
        res = train(_train_cfg(photos, run, epochs=last + 2, plot=False))
        assert res.resumed_from_epoch == last
    assert [h["epoch"] for h in res.history] == list(range(res.epochs_completed))
    assert not list(run.glob(".*.tmp"))  # leftovers of killed writes are cleaned up
    best = load_checkpoint(run / "best.safetensors")
    assert best["meta"]["epoch"] == res.best_epoch and best["meta"]["best_val_loss"] == res.best_val_loss
    final = load_model(run)
    for k, v in final.state_dict().items():  # model.safetensors holds exactly the best epoch's weights
        assert torch.equal(v, best["model_state"][k]), k
    print(f"\nkills after {delays}: last epochs {epochs_seen}, {mid_write_kills} inside a write, "
          f"{time.time() - t_start:.1f} s")


def _child_killed_between_last_and_best(photos, run):
    """Dies at the second write of best.safetensors, after last.safetensors of that epoch."""
    torch.set_num_threads(1)
    real, seen = os.fsync, []

    def fsync(fd):
        if ".best.safetensors." in os.readlink(f"/proc/self/fd/{fd}"):
            seen.append(fd)
            if len(seen) == 2:
                os.kill(os.getpid(), signal.SIGKILL)
        return real(fd)
    os.fsync = fsync
    from fastcolor.train import train

    train(_train_cfg(photos, run, plot=False, min_delta=-1e9))  # every epoch "improves"


def test_kill_between_last_and_best_is_repaired_on_resume(photos, tmp_path):
    """Regression: best.safetensors was written before last.safetensors, so a kill between the two
    left a best file from an epoch the resumed run repeated (and could record differently)."""
    from fastcolor.train import train

    run = tmp_path / "run"
    proc = FORK.Process(target=_child_killed_between_last_and_best, args=(photos, run))
    proc.start()
    proc.join(60)
    assert proc.exitcode == -signal.SIGKILL
    last = load_checkpoint(run / "last.safetensors")
    assert last["meta"]["epoch"] == last["meta"]["best_epoch"] == 1
    assert load_checkpoint(run / "best.safetensors")["meta"]["epoch"] == 0  # one improvement behind
    res = train(_train_cfg(photos, run, epochs=2, plot=False, min_delta=-1e9))  # nothing left to train
    assert res.resumed_from_epoch == 1 and res.best_epoch == 1
    best = load_checkpoint(run / "best.safetensors")
    assert best["meta"]["epoch"] == 1
    for k, v in last["model_state"].items():
        assert torch.equal(best["model_state"][k], v), k
    assert all(torch.equal(v, best["model_state"][k]) for k, v in load_model(run).state_dict().items())


# ----------------------------------------------------------------------------- every writer


def _writers(tmp_path):
    """(name, path, write(version)) for every kind of file fastcolor writes."""
    from fastcolor.app.colorize_files import write_new_file
    from fastcolor.data import ImageItem, save_split
    from fastcolor.metrics import comparison_grid
    from fastcolor.models import EmbeddingCache, build_model, model_state
    from fastcolor.train import plot_loss_curve

    net = build_model("zhang_tiny")
    opt = torch.optim.Adam(net.parameters())
    img = tmp_path / "img.png"
    if not img.exists():
        img.write_bytes(b"x")
    cache = EmbeddingCache(tmp_path / "cache", identity={"test": 1})

    def grid(v):
        return comparison_grid([[np.full((8, 8, 3), 40 * v, np.uint8)]], ["t"], tmp_path / "grid.png")

    return [
        ("checkpoint", tmp_path / "last.safetensors",
         lambda v: fio.save_checkpoint(tmp_path / "last.safetensors", model_state(net), net.config, opt, epoch=v)),
        ("model", tmp_path / "model.safetensors", lambda v: save_model(tmp_path / "model.safetensors", net)),
        ("metrics.jsonl", tmp_path / "metrics.jsonl",
         lambda v: fio.append_jsonl(tmp_path / "metrics.jsonl", [{"epoch": e} for e in range(v + 1)])),
        ("json", tmp_path / "result.json", lambda v: fio.atomic_write_json(tmp_path / "result.json", {"v": v})),
        ("split", tmp_path / "split.json",
         lambda v: save_split(tmp_path / "split.json", {"train": [ImageItem(f"{v}.png", "a")], "val": [], "test": []})),
        ("loss curve png", tmp_path / "loss_curve.png",
         lambda v: plot_loss_curve([{"epoch": 0, "train_loss": 1.0 + v, "val_loss": 2.0}],
                                   tmp_path / "loss_curve.png")),
        ("comparison png", tmp_path / "grid.png", grid),
        ("colorized image", tmp_path / "colorized.png",
         lambda v: write_new_file(tmp_path / "colorized.png", b"PNG version %d" % v, overwrite=True)),
        ("embedding cache", cache._file(img), lambda v: cache.put(img, torch.full((4,), float(v)))),
    ]


def test_failed_replace_keeps_every_previous_file(tmp_path, monkeypatch):
    for name, path, write in _writers(tmp_path):
        write(1)
        before = path.read_bytes()

        def boom(*a, **k):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(os, "replace", boom)
        monkeypatch.setattr(os, "link", boom)
        with pytest.raises(OSError, match="No space left"):
            write(2)
        monkeypatch.undo()
        assert path.read_bytes() == before, name
        assert not [p for p in path.parent.iterdir() if p.name.endswith((".tmp", ".part"))], name


def _killed_writer(tmp_path, index, where):
    name, path, write = _writers(tmp_path)[index]
    real = getattr(os, where)

    def die(*a, **k):
        os.kill(os.getpid(), signal.SIGKILL)
        return real(*a, **k)
    setattr(os, where, die)
    write(2)


@pytest.mark.parametrize("where", ["fsync", "replace"])
def test_sigkill_in_the_middle_of_each_write_keeps_the_previous_file(tmp_path, where):
    """The writing process dies while the new bytes are being flushed (fsync) or just before the
    rename (os.replace): the destination still holds the previous, complete file."""
    writers = _writers(tmp_path)
    for i, (name, path, write) in enumerate(writers):
        write(1)
        before = path.read_bytes()
        proc = FORK.Process(target=_killed_writer, args=(tmp_path, i, where))
        proc.start()
        proc.join(60)
        assert proc.exitcode == -signal.SIGKILL, name
        assert path.read_bytes() == before, name
    # what stays behind is only hidden temp files, never a half-written destination
    assert load_checkpoint(tmp_path / "last.safetensors")["meta"]["epoch"] == 1
    assert json.loads((tmp_path / "result.json").read_text()) == {"v": 1}


def test_atomic_writes_get_the_mode_of_any_new_file(tmp_path):
    import os

    from fastcolor.io import atomic_write_bytes, umask

    path = atomic_write_bytes(tmp_path / "metrics.json", b"{}")
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask()  # not mkstemp's private 0o600
