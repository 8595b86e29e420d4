"""fastcolor.monitor.TensorBoardMonitor: event files TensorBoard reads back, and the one-line
error when the tensorboard extra is missing."""
import sys

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from fastcolor.color import l_ab_to_rgb, rgb_to_lab
from fastcolor.colorize import colorize_tensor
from fastcolor.models import ZhangNet
from fastcolor.monitor import IMAGE_TAG, MissingExtraError, TensorBoardMonitor

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


@pytest.fixture(scope="module")
def samples():
    """Two 32 px validation crops (L in 0..100, ab at full size) of scikit-image photos."""
    imgs = [skimage.data.astronaut()[100:356:8, 150:406:8], skimage.data.coffee()[50:306:8, 200:456:8]]
    rgb = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 255  # (2, 3, 32, 32)
    lab = rgb_to_lab(rgb)
    return {"L": lab[:, :1].contiguous(), "ab": lab[:, 1:].contiguous()}


def _read(log_dir):
    acc = event_accumulator.EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def test_two_epochs_of_scalars_and_images_read_back(tmp_path, samples):
    torch.manual_seed(0)
    model = ZhangNet.tiny(32)
    model.train()
    with TensorBoardMonitor(tmp_path / "tb", T=0.38) as mon:
        mon.log_epoch(0, {"loss/train": 3.5, "loss/val": 3.75, "lr": 3e-4}, model=model, samples=samples)
        mon.log_epoch(1, {"loss/train": 3.25, "loss/val": 3.5, "lr": torch.tensor(1.5e-4)}, model=model,
                      samples={"L": samples["L"], "ab": samples["ab"][..., ::4, ::4]})  # ab at the logits' size
    assert model.training  # put back in the mode it was in
    acc = _read(tmp_path / "tb")
    tags = acc.Tags()
    assert {"loss/train", "loss/val", "lr"} <= set(tags["scalars"])
    assert [(e.step, e.value) for e in acc.Scalars("loss/train")] == [(0, 3.5), (1, 3.25)]
    assert [(e.step, e.value) for e in acc.Scalars("loss/val")] == [(0, 3.75), (1, 3.5)]
    assert [e.step for e in acc.Scalars("lr")] == [0, 1]
    assert acc.Scalars("lr")[1].value == pytest.approx(1.5e-4)
    assert tags["images"] == [IMAGE_TAG]
    images = acc.Images(IMAGE_TAG)
    assert [e.step for e in images] == [0, 1]
    # the image: 2 rows (samples) x 3 columns (gray | predicted | truth), each 32 x 32
    import io

    grid = np.asarray(Image.open(io.BytesIO(images[0].encoded_image_string)).convert("RGB")).astype(np.float64)
    assert grid.shape == (64, 96, 3)
    model.eval()
    L, ab = samples["L"], samples["ab"]
    expect = {"gray": l_ab_to_rgb(L, torch.zeros_like(ab)), "predicted": colorize_tensor(model, L, T=0.38),
              "truth": l_ab_to_rgb(L, ab)}
    for i in range(2):
        for j, name in enumerate(("gray", "predicted", "truth")):
            cell = grid[32 * i:32 * (i + 1), 32 * j:32 * (j + 1)] / 255
            want = expect[name][i].permute(1, 2, 0).double().numpy()
            assert np.abs(cell - want).max() < 2.5 / 255, (i, name)
    gray = grid[:32, :32]
    assert np.ptp(gray, axis=2).max() <= 1  # the gray column has no colour
    assert np.abs(grid[:32, 64:] - gray).max() > 20  # the truth column has


def test_scalars_only_and_bad_arguments(tmp_path, samples):
    mon = TensorBoardMonitor(tmp_path / "tb")
    mon.log_epoch(3, {"loss/train": 1.0})
    with pytest.raises(ValueError, match="epoch"):
        mon.log_epoch(-1, {})
    with pytest.raises(TypeError, match="scalars"):
        mon.log_epoch(4, {"loss": "high"})
    with pytest.raises(ValueError, match="model"):
        mon.log_epoch(4, {}, samples=samples)
    with pytest.raises(ValueError, match=r"samples\['ab'\]"):
        mon.log_epoch(4, {}, model=ZhangNet.tiny(32), samples={"L": samples["L"], "ab": samples["ab"][:1]})
    mon.close()
    mon.close()  # twice is fine
    acc = _read(tmp_path / "tb")
    assert acc.Tags()["images"] == [] and [e.step for e in acc.Scalars("loss/train")] == [3]
    with pytest.raises(ValueError, match="T must be"):
        TensorBoardMonitor(tmp_path / "tb2", T=0)


def test_missing_tensorboard_is_one_line_naming_the_extra(tmp_path, monkeypatch):
    # make "import tensorboard" (which torch.utils.tensorboard does) fail as if it were not installed
    loaded = [m for m in sys.modules if m == "tensorboard" or m.startswith(("tensorboard.", "torch.utils.tensorboard"))]
    for name in loaded:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(MissingExtraError) as info:
        TensorBoardMonitor(tmp_path / "tb")
    msg = str(info.value)
    assert "\n" not in msg and "pip install 'fastcolor[tensorboard]'" in msg
    assert isinstance(info.value, ImportError)
    assert not (tmp_path / "tb").exists()  # nothing written before the check
