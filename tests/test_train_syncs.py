"""The trainer without per-step host syncs (issue 12, point 2): a training step reads nothing on
the host (tests/host_reads.py records every read); the loss is read, and checked to be finite,
every log_every steps and at epoch end; a non-finite loss still stops the run with the last good
checkpoint kept, and says so."""
import math
import sys
from pathlib import Path

import pytest
import torch

import fastcolor.train as ft
from fastcolor.app.cli import main
from fastcolor.io import load_checkpoint
from fastcolor.ops import _common
from fastcolor.train import TrainConfig, train

sys.path.insert(0, str(Path(__file__).resolve().parent))
from host_reads import record_host_reads  # noqa: E402
from test_train import make_photo_folder, one_thread  # noqa: E402,F401  (autouse: one intra-op thread)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return make_photo_folder(tmp_path_factory.mktemp("sync_photos"), per_photo=2, size=32)


def _cfg(photos, run, **kw):
    base = dict(data_dir=str(photos), run_dir=str(run), model="zhang_tiny", batch_size=2, epochs=2, workers=0,
                progress=False, plot=False, device="cpu", lr=1e-3)
    base.update(kw)
    return TrainConfig(**base)


def test_the_recorder_sees_a_host_read():
    """The check below can fail: the recorder catches what the trainer used to do every step."""
    loss = torch.ones(()) * 2
    with record_host_reads() as reads:
        torch.isfinite(loss).item()
        float(loss)
    assert reads == ["aten._local_scalar_dense", "aten._local_scalar_dense"]


@pytest.mark.parametrize("model, loss", [("zhang_tiny", "rebalanced"), ("zhang_tiny", "ce")])
def test_a_training_step_reads_nothing_on_the_host(photos, tmp_path, monkeypatch, model, loss):
    step_reads, n_steps, n_reads = [], [0], [0]
    real_step, real_read = ft._Trainer.train_step, ft._LossMeter.read

    def watched_step(self, *a, **k):
        with record_host_reads() as reads:
            real_step(self, *a, **k)
        step_reads.extend(reads.sites)
        n_steps[0] += 1

    def counted_read(self, d):
        n_reads[0] += 1
        return real_read(self, d)

    monkeypatch.setattr(ft._Trainer, "train_step", watched_step)
    monkeypatch.setattr(ft._LossMeter, "read", counted_read)
    # the ops read CPU tensors on the host on purpose (no sync there); answering "not host readable"
    # sends these CPU tensors down the GPU route, as tests/test_syncs.py does for the ops alone
    asked = []
    monkeypatch.setattr(_common, "host_readable", lambda t: asked.append(t.device.type) is not None)
    res = train(_cfg(photos, tmp_path / "run", model=model, loss=loss, log_every=3, max_steps_per_epoch=4,
                     nongray=True, weight_decay=1e-3, lr_milestones=(2,)))
    assert n_steps[0] == 8 and step_reads == []
    assert asked  # the ops did consult it: otherwise the check above would prove less
    # per epoch: reads after steps 3 and 4 (the epoch's end), and one for validation
    assert n_reads[0] == 2 * 3
    assert all(math.isfinite(h["train_loss"]) for h in res.history)


def _poison(monkeypatch, at_step: int):
    """The trainer's loss becomes NaN at optimiser step ``at_step`` (0-based, over the run)."""
    real = ft._Trainer.loss

    def loss(self, model, batch, weights):
        out = real(self, model, batch, weights)
        return out * float("nan") if model.training and self.step == at_step else out

    monkeypatch.setattr(ft._Trainer, "loss", loss)


@pytest.mark.parametrize("log_every", [1, 50])
def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(photos, tmp_path, monkeypatch, log_every):
    _poison(monkeypatch, at_step=3)  # epoch 1 (2 steps an epoch), its step 1
    run = tmp_path / "run"
    with pytest.raises(FloatingPointError) as info:
        train(_cfg(photos, run, epochs=3, max_steps_per_epoch=2, log_every=log_every))
    msg = str(info.value)
    assert "training loss became nan at epoch 1, step 1" in msg
    assert f"{run / 'last.safetensors'} holds the last good checkpoint (epoch 0)" in msg
    ck = load_checkpoint(run / "last.safetensors")
    assert ck["meta"]["epoch"] == 0 and ck["meta"]["step"] == 2
    assert all(torch.isfinite(v).all() for v in ck["model_state"].values() if v.is_floating_point())
    # and the run resumes from it
    monkeypatch.undo()
    res = train(_cfg(photos, run, epochs=2, max_steps_per_epoch=2, log_every=log_every))
    assert res.resumed_from_epoch == 0 and res.epochs_completed == 2


def test_the_cli_says_the_checkpoint_is_kept(photos, tmp_path, monkeypatch, capsys):
    _poison(monkeypatch, at_step=2)
    run = tmp_path / "run"
    rc = main(["train", str(photos), "--out", str(run), "--model", "zhang-tiny", "--workers", "0", "--epochs", "3",
               "--batch-size", "2", "--max-steps-per-epoch", "2", "--device", "cpu", "-q"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "training loss became nan at epoch 1, step 0" in err and "last good checkpoint (epoch 0)" in err
