import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

import fastcolor
from fastcolor.io import (
    atomic_write_bytes,
    flatten_optimizer_state,
    load_checkpoint,
    load_tensors,
    unflatten_optimizer_state,
)
from fastcolor.models.serialization import load_model
from fastcolor.reference import regression_loss as ref_regression_loss
from fastcolor.train import TrainConfig, regression_loss, train

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models on a shared 2-core box: intra-op threads only add contention (6x slower under load)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_photo_folder(root: Path, per_photo: int = 4, size: int = 40, classes: bool = False) -> Path:
    """Random crops of skimage photos (one class per photo with ``classes``)."""
    rng = np.random.default_rng(0)
    for name in ["astronaut", "chelsea", "coffee", "rocket", "cat"]:
        img = getattr(skimage.data, name)()
        folder = root / name if classes else root
        folder.mkdir(parents=True, exist_ok=True)
        H, W = img.shape[:2]
        for j in range(per_photo):
            s = min(H, W) // 2
            y, x = rng.integers(0, H - s), rng.integers(0, W - s)
            Image.fromarray(img[y:y + s, x:x + s]).resize((size, size)).save(folder / f"{name}_{j}.png")
    return root


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return make_photo_folder(tmp_path_factory.mktemp("photos"))


def _cfg(data, run, **kw):
    base = dict(data_dir=str(data), run_dir=str(run), model="zhang_tiny", batch_size=4, epochs=5, lr=3e-3,
                workers=0, progress=False, plot=False)
    base.update(kw)
    return TrainConfig(**base)


def test_zhang_training_lowers_validation_loss_and_writes_the_run(photos, tmp_path):
    res = train(_cfg(photos, tmp_path / "run", epochs=5, plot=True))
    val = [h["val_loss"] for h in res.history]
    assert len(val) == 5 and val[-1] < val[0] - 0.1
    assert res.best_val_loss == min(val)
    run = tmp_path / "run"
    for f in ("split.json", "prior.safetensors", "last.safetensors", "best.safetensors", "model.safetensors",
              "model.json", "metrics.jsonl", "loss_curve.png", "train_config.json"):
        assert (run / f).is_file(), f
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == list(range(5))
    split = json.loads((run / "split.json").read_text())
    assert (len(split["train"]), len(split["val"]), len(split["test"])) == (16, 2, 2)
    prior, meta = load_tensors(run / "prior.safetensors")
    p, w = prior["prior"].numpy(), prior["weights"].numpy()
    assert abs(p.sum() - 1) < 1e-9 and abs((p * w).sum() - 1) < 1e-6 and meta["lam"] == 0.5
    np.testing.assert_allclose(w, fastcolor.rarity_weights(p, lam=0.5))
    # the saved best model reproduces the best validation loss
    model = load_model(run)
    assert model.config == res.model.config
    from fastcolor.data import ColorizationDataset, load_split

    val_ds = ColorizationDataset(photos, load_split(run / "split.json")["val"], 32, 4, target_reduction="area")
    batch = torch.utils.data.default_collate([val_ds[i] for i in range(len(val_ds))])
    with torch.no_grad():
        loss = fastcolor.rebalanced_cross_entropy(model(batch["L"]), batch["ab"], weights=prior["weights"].float())
    assert loss.item() == pytest.approx(res.best_val_loss, rel=1e-4)


def test_fusion_training_with_cached_embeddings(photos, tmp_path):
    res = train(_cfg(photos, tmp_path / "run", model="fusion_tiny", loss="mse", epochs=2, lr=1e-3, augment=False,
                     embedding_cache=str(tmp_path / "emb")))
    val = [h["val_loss"] for h in res.history]
    assert val[-1] < val[0]
    assert len(list((tmp_path / "emb").glob("*.safetensors"))) == 20
    assert not (tmp_path / "run" / "prior.safetensors").exists()
    model = load_model(tmp_path / "run" / "model.safetensors")
    assert model.config["arch"] == "fusion"


def test_loss_must_fit_the_model(photos, tmp_path):
    with pytest.raises(ValueError, match="loss"):
        train(_cfg(photos, tmp_path / "a", model="zhang_tiny", loss="mse"))
    with pytest.raises(ValueError, match="loss"):
        TrainConfig(data_dir=".", run_dir=".", loss="l1")
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(data_dir=".", run_dir=".", batch_size=0)
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(data_dir=".", run_dir=".", precision="fp16")


def test_early_stopping(photos, tmp_path):
    # a learning rate this small leaves the validation loss flat: no improvement >= min_delta
    res = train(_cfg(photos, tmp_path / "run", epochs=40, lr=1e-12, patience=2, augment=False, loss="ce"))
    assert res.stopped_early and res.epochs_completed == 3 and res.best_epoch == 0
    # resuming a finished run trains no further
    again = train(_cfg(photos, tmp_path / "run", epochs=40, lr=1e-12, patience=2, loss="ce"))
    assert again.epochs_completed == 3 and again.resumed_from_epoch == 2


def test_regression_loss_matches_reference():
    rng = np.random.default_rng(0)
    p, t = rng.uniform(-1, 1, (3, 2, 5, 4)), rng.uniform(-1, 1, (3, 2, 5, 4))
    got = regression_loss(torch.from_numpy(p), torch.from_numpy(t))
    assert got.item() == pytest.approx(ref_regression_loss(p, t), rel=1e-6)
    np.testing.assert_allclose(regression_loss(torch.from_numpy(p), torch.from_numpy(t), "none").numpy(),
                               ref_regression_loss(p, t, "none"), rtol=1e-6)
    with pytest.raises(ValueError, match="pred"):
        regression_loss(torch.zeros(1, 2, 3, 3), torch.zeros(1, 2, 3, 4))


def test_optimizer_state_round_trips_without_pickle():
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 3)
    opt = torch.optim.Adam(net.parameters(), lr=0.1, betas=(0.8, 0.9))
    for _ in range(3):
        opt.zero_grad()
        net(torch.randn(5, 4)).square().sum().backward()
        opt.step()
    tensors, rest = flatten_optimizer_state(opt.state_dict())
    tensors = {k: v.clone() for k, v in tensors.items()}  # state_dict() shares the live tensors
    rest = json.loads(json.dumps(rest))  # must be plain JSON
    net2 = torch.nn.Linear(4, 3)
    net2.load_state_dict(net.state_dict())
    opt2 = torch.optim.Adam(net2.parameters(), lr=1.0)
    opt2.load_state_dict(unflatten_optimizer_state(tensors, rest))
    x = torch.randn(5, 4)
    for n, o in ((net, opt), (net2, opt2)):
        o.zero_grad()
        n(x).square().sum().backward()
        o.step()
    torch.testing.assert_close(net.weight, net2.weight)


def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "f.bin"
    atomic_write_bytes(target, b"old")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        atomic_write_bytes(target, b"new" * 1000)
    monkeypatch.undo()
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]


_CHILD = """
import sys, time
from fastcolor.train import TrainConfig, train
import fastcolor.io as fio
_orig = fio.save_tensors
def slow_save(*a, **k):  # widen the window in which a kill lands mid-checkpoint
    time.sleep(0.02)
    return _orig(*a, **k)
fio.save_tensors = slow_save
import fastcolor.train as ft
ft.save_checkpoint.__globals__["save_tensors"] = slow_save
train(TrainConfig(data_dir=sys.argv[1], run_dir=sys.argv[2], model="zhang_tiny", batch_size=4, epochs=500,
                  lr=1e-3, workers=0, progress=False, plot=False, patience=500))
"""


def test_killed_run_resumes_from_last_complete_checkpoint(photos, tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(photos), str(run)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    last = run / "last.safetensors"
    deadline = time.time() + 90
    try:
        while time.time() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"training exited early: {proc.stderr.read().decode()[-2000:]}")
            if last.is_file():
                try:
                    if load_checkpoint(last)["meta"]["epoch"] >= 1:
                        break
                except Exception:  # noqa: BLE001 - a reader may race the writer's os.replace
                    pass
            time.sleep(0.05)
        else:
            pytest.fail("no checkpoint of epoch 1 within 90 s")
        time.sleep(0.13)  # land somewhere inside a later epoch or checkpoint write
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    ck = load_checkpoint(last)  # intact after the kill
    killed_at = ck["meta"]["epoch"]
    assert killed_at >= 1 and ck["optimizer_state"]["state"]
    res = train(_cfg(photos, run, epochs=killed_at + 2, lr=1e-3, patience=500))
    assert res.resumed_from_epoch == killed_at
    assert [h["epoch"] for h in res.history] == list(range(killed_at + 2))
    assert load_checkpoint(last)["meta"]["epoch"] == killed_at + 1
    assert not list(run.glob(".*.tmp"))
    # the resumed optimizer carried on: Adam's step count kept growing
    steps = [v["step"] for v in load_checkpoint(last)["optimizer_state"]["state"].values()]
    assert float(steps[0]) > float(next(iter(ck["optimizer_state"]["state"].values()))["step"])


def test_tensorboard_gets_losses_lr_and_images_each_epoch(photos, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from fastcolor.app.cli import main

    run = tmp_path / "run"
    assert main(["train", str(photos), "--out", str(run), "--model", "zhang-tiny", "--workers", "0", "--epochs", "2",
                 "--batch-size", "4", "--max-steps-per-epoch", "2", "--device", "cpu", "-q", "--tensorboard"]) == 0
    assert json.loads((run / "train_config.json").read_text())["tensorboard"] == str(run / "tensorboard")
    events = list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1
    acc = EventAccumulator(str(events[0]))
    acc.Reload()
    tags = acc.Tags()
    assert {"loss/train", "loss/val", "lr", "step", "time/epoch_seconds"} <= set(tags["scalars"])
    history = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    val = acc.Scalars("loss/val")
    assert [e.step for e in val] == [0, 1]
    assert [e.value for e in val] == pytest.approx([h["val_loss"] for h in history], rel=1e-6)
    assert len(tags["images"]) == 1 and len(acc.Images(tags["images"][0])) == 2


def test_tensorboard_missing_is_one_line_naming_the_extra(photos, tmp_path, monkeypatch, capsys):
    import importlib.util

    from fastcolor.app.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    assert main(["train", str(photos), "--out", str(tmp_path / "run"), "--tensorboard"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'fastcolor[tensorboard]'" in err[0] and "--tensorboard" in err[0]
    assert not (tmp_path / "run").exists()
