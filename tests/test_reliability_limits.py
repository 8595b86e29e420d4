"""Limits: photos of any pixel count are colourised in bounded memory; sizes and batches too big
for the device's memory are refused up front with a message naming the size and the limit;
allocator failures become the same clear error."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import fastcolor.colorize as C
from fastcolor.color import rgb_to_l
from fastcolor.colorize import (
    MemoryLimitError,
    activation_bytes,
    available_memory,
    colorize_image,
    colorize_tensor,
    memory_guard,
)
from fastcolor.models import build_model
from fastcolor.train import TrainConfig, train

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_train import make_photo_folder, one_thread  # noqa: E402,F401  (autouse: one intra-op thread)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_model("zhang_tiny").eval()


def test_available_memory_is_sane():
    avail = available_memory("cpu")
    with open("/proc/meminfo") as f:
        total = int(next(ln for ln in f if ln.startswith("MemTotal:")).split()[1]) * 1024
    assert 0 < avail <= total
    assert available_memory("meta") is None


def test_activation_estimate_scales_with_batch_and_size(tiny):
    a = activation_bytes(tiny, 2, 64, training=True)
    assert activation_bytes(tiny, 4, 64, training=True) == 2 * a
    assert activation_bytes(tiny, 2, 128, training=True) == 4 * a
    assert 0 < activation_bytes(tiny, 2, 64) < a  # inference keeps far less than training
    fusion = build_model("fusion_tiny")
    assert activation_bytes(fusion, 1, 32, training=True) > 0


def test_a_12_megapixel_photo_is_colorized_in_strips(tiny, monkeypatch):
    """4000 x 3000 through colorize_image: only L, the upsampled ab and the output are full size
    (the L and Lab -> RGB conversions see at most STRIP_PIXELS pixels at a time)."""
    H, W = 3000, 4000
    yy, xx = np.mgrid[0:H, 0:W]
    img = np.stack([(xx * 255 // W), (yy * 255 // H), ((xx + yy) % 256)], -1).astype(np.uint8)
    seen = []
    for name in ("l_ab_to_rgb", "rgb_to_l"):
        orig = getattr(C, name)

        def spy(*args, _orig=orig):
            seen.append(args[0].shape[-2] * args[0].shape[-1])
            return _orig(*args)
        monkeypatch.setattr(C, name, spy)
    out = colorize_image(tiny, img)
    assert out.shape == (H, W, 3) and out.dtype == np.uint8
    assert seen and max(seen) <= C.STRIP_PIXELS
    # the output keeps the input's lightness (sampled rows; 8-bit rounding and gamut clipping aside)
    rows = slice(0, H, 97)
    L_in = rgb_to_l(torch.from_numpy(img[rows]).permute(2, 0, 1))
    L_out = rgb_to_l(torch.from_numpy(out[rows]).permute(2, 0, 1))
    assert (L_in - L_out).abs().median() < 1.0


def test_strips_give_the_same_image_as_one_pass(tiny, monkeypatch):
    img = np.random.default_rng(0).integers(0, 256, (150, 110, 3), dtype=np.uint8)
    whole = colorize_image(tiny, img)
    monkeypatch.setattr(C, "STRIP_PIXELS", 1000)  # 9 rows a strip
    assert np.array_equal(colorize_image(tiny, img), whole)
    t = colorize_tensor(tiny, rgb_to_l(torch.from_numpy(img).permute(2, 0, 1)))
    np.testing.assert_allclose((t.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8), whole, atol=1)


def test_too_many_pixels_for_memory_are_refused_before_any_work(tiny):
    huge_l = torch.zeros(1, 1, 1, 1).expand(1, 1, 100_000, 100_000)  # 1e10 pixels, no memory behind it
    with pytest.raises(MemoryLimitError, match=r"100000x100000 = 10000000000 pixels.*needs about [0-9.]+ GiB of "
                                               r"cpu memory, but only [0-9.]+ GiB is available"):
        colorize_tensor(tiny, huge_l)
    huge_img = np.broadcast_to(np.zeros((1, 1, 3), np.uint8), (100_000, 100_000, 3))
    with pytest.raises(MemoryLimitError, match="10000000000 pixels"):
        colorize_image(tiny, huge_img)
    assert isinstance(MemoryLimitError("x"), MemoryError)


def test_refusal_names_size_and_limit(tiny, monkeypatch):
    monkeypatch.setattr(C, "available_memory", lambda device: 10 << 20)
    img = np.zeros((1000, 1500, 3), np.uint8)
    with pytest.raises(MemoryLimitError, match=r"1500x1000 = 1500000 pixels \(network input 32x32\) needs about "
                                               r"[0-9]+ MiB of cpu memory, but only 10 MiB is available"):
        colorize_image(tiny, img)
    with pytest.raises(MemoryLimitError, match=r"colorizing 3 image\(s\) of 64x64"):
        colorize_tensor(tiny, torch.zeros(3, 1, 64, 64), size=4096)


def test_allocator_failures_become_clear_errors(tiny, monkeypatch):
    def oom_cuda(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    def oom_cpu(*a, **k):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 80000000000 bytes. Error code 12 (Cannot allocate memory)")

    img = np.zeros((40, 48, 3), np.uint8)
    for fake in (oom_cuda, oom_cpu):
        monkeypatch.setattr(C, "predict_ab", fake)
        with pytest.raises(MemoryLimitError, match=r"ran out of cpu memory colorizing 1 image\(s\) of 48x40 pixels "
                                                   r"\(network input 32x32\).*available now.*allocate") as e:
            colorize_image(tiny, img)
        assert isinstance(e.value.__cause__, (torch.OutOfMemoryError, RuntimeError))

    def other(*a, **k):
        raise RuntimeError("shape mismatch somewhere")

    monkeypatch.setattr(C, "predict_ab", other)
    with pytest.raises(RuntimeError, match="shape mismatch"):  # not an OOM: untouched
        colorize_image(tiny, img)
    with pytest.raises(MemoryLimitError, match="ran out of cpu memory doing X"):
        with memory_guard("cpu", "doing X", "try less"):
            raise MemoryError()


# ----------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return make_photo_folder(tmp_path_factory.mktemp("photos"), per_photo=2, size=32)


def _cfg(photos, run, **kw):
    base = dict(data_dir=str(photos), run_dir=str(run), model="zhang_tiny", batch_size=4, epochs=2, lr=1e-3,
                workers=0, progress=False, plot=False)
    return TrainConfig(**{**base, **kw})


def test_training_batch_too_big_for_memory_is_refused(photos, tmp_path, monkeypatch):
    # a genuinely impossible size: ~115 GiB of activations for 4 images of 8192 x 8192
    with pytest.raises(MemoryLimitError, match=r"training with batches of 4 image\(s\) at image_size=8192 .*needs "
                                               r"about [0-9.]+ GiB of cpu memory, but only [0-9.]+ GiB is available; "
                                               r"lower batch_size \(now 4\) or image_size \(now 8192\)"):
        train(_cfg(photos, tmp_path / "a", image_size=8192))
    assert not (tmp_path / "a" / "prior.safetensors").exists()  # refused before reading the data at that size
    # the batch a rank really sees: batch_size=10**6 over 8 training images is a batch of 8
    monkeypatch.setattr(C, "available_memory", lambda device: 1 << 20)
    with pytest.raises(MemoryLimitError, match=r"batches of 8 image\(s\) at image_size=32.*only 1 MiB is available"):
        train(_cfg(photos, tmp_path / "b", batch_size=10**6))


def test_out_of_memory_mid_training_is_a_clear_error_and_keeps_the_checkpoint(photos, tmp_path, monkeypatch):
    from fastcolor.io import load_checkpoint
    from fastcolor.models import ZhangNet

    run = tmp_path / "run"
    train(_cfg(photos, run, epochs=1))
    assert load_checkpoint(run / "last.safetensors")["meta"]["epoch"] == 0

    def oom(self, L):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(ZhangNet, "forward", oom)
    with pytest.raises(MemoryLimitError, match=r"ran out of cpu memory in epoch 1 \(batches of 4 at 32x32\).*"
                                               r"lower batch_size \(now 4\).*"
                                               r"last.safetensors holds the last completed epoch"):
        train(_cfg(photos, run, epochs=3))
    assert load_checkpoint(run / "last.safetensors")["meta"]["epoch"] == 0
    monkeypatch.undo()
    res = train(_cfg(photos, run, epochs=2))  # and it resumes from there
    assert res.resumed_from_epoch == 0 and res.epochs_completed == 2


def test_cli_train_too_big_is_one_line_error(photos, tmp_path, capsys):
    from fastcolor.app import cli

    capsys.readouterr()
    rc = cli.main(["train", str(photos), "--model", "zhang-tiny", "--size", "8192", "--batch-size", "4",
                   "--workers", "0", "--epochs", "1", "--out", str(tmp_path / "run"), "-q"])
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if ln.startswith("fastcolor: error:")]
    assert rc == 1 and len(errors) == 1 and "Traceback" not in err, err
    assert "image_size=8192" in errors[0] and "GiB is available" in errors[0] and "lower batch_size" in errors[0]
