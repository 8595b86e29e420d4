import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import skimage.metrics
import torch
from PIL import Image

import fastcolor
from fastcolor.color import rgb_to_lab
from fastcolor.data import index_images
from fastcolor.gamut import AB_BINS
from fastcolor.metrics import (
    AucAccumulator,
    ab_mse,
    ab_r2,
    ab_r2_per_channel,
    ab_r2_pooled,
    auc,
    bin_accuracy,
    bin_cross_entropy,
    coarse_accuracy,
    coarse_bin_map,
    colorfulness,
    evaluate,
    hard_cross_entropy,
    psnr,
    soft_cross_entropy,
    ssim,
)
from fastcolor.reference import regression_loss

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_train import make_photo_folder, one_thread  # noqa: E402,F401


@pytest.fixture(scope="module")
def chelsea():
    rgb = torch.from_numpy(skimage.data.chelsea()[::8, ::8].copy()).permute(2, 0, 1)[None]  # (1, 3, 38, 57)
    return rgb.float() / 255, rgb_to_lab(rgb)[:, 1:]


def _one_hot_logits(ab, shift=0):
    q = (fastcolor.nearest_bin(ab) + shift) % 313
    return torch.nn.functional.one_hot(q, 313).permute(0, 3, 1, 2).float() * 50


def test_bin_accuracy_and_cross_entropy(chelsea):
    _, ab = chelsea
    good, bad = _one_hot_logits(ab), _one_hot_logits(ab, shift=100)
    assert bin_accuracy(good, ab).item() == 1.0
    assert bin_accuracy(bad, ab).item() == 0.0
    assert bin_cross_entropy(good, ab).item() < 1e-6
    assert bin_cross_entropy(torch.zeros_like(good), ab).item() == pytest.approx(math.log(313), rel=1e-5)
    with pytest.raises(ValueError, match="logits"):
        bin_accuracy(torch.zeros(1, 312, 2, 2), ab)


def _np_log_softmax(logits: np.ndarray) -> np.ndarray:
    """(N, 313, h, w) float64 -> log softmax over the bins."""
    x = logits - logits.max(1, keepdims=True)
    return x - np.log(np.exp(x).sum(1, keepdims=True))


def _np_soft_target(ab: np.ndarray, k: int = 5, sigma: float = 5.0) -> np.ndarray:
    """(N, 2, h, w) -> (N, 313, h, w): Gaussian weights on the k nearest bins, normalised (Zhang et al.)."""
    d2 = ((ab[:, None] - AB_BINS[None, :, :, None, None]) ** 2).sum(2)  # (N, 313, h, w)
    near = np.argsort(d2, axis=1, kind="stable")[:, :k]
    z = np.zeros_like(d2)
    np.put_along_axis(z, near, np.exp(-np.take_along_axis(d2, near, 1) / (2 * sigma ** 2)), 1)
    return z / z.sum(1, keepdims=True)


def test_soft_and_hard_cross_entropy_against_numpy(chelsea):
    _, ab = chelsea
    ab = torch.cat([ab[..., :8, :8], ab[..., 8:16, 20:28]])  # (2, 2, 8, 8): two images
    logits = torch.randn(2, 313, 8, 8, generator=torch.Generator().manual_seed(3)) * 3
    logp = _np_log_softmax(logits.double().numpy())
    z = _np_soft_target(ab.double().numpy())
    soft = -(z * logp).sum(1).reshape(2, -1).mean(1)
    hard = -np.take_along_axis(logp, np.argmin(((ab.double().numpy()[:, None] - AB_BINS[None, :, :, None, None]) ** 2)
                                                .sum(2), 1)[:, None], 1)[:, 0].reshape(2, -1).mean(1)
    np.testing.assert_allclose(soft_cross_entropy(logits, ab, reduction="none").numpy(), soft, rtol=1e-5)
    np.testing.assert_allclose(hard_cross_entropy(logits, ab, "none").numpy(), hard, rtol=1e-5)
    assert soft_cross_entropy(logits, ab).item() == pytest.approx(soft.mean(), rel=1e-5)
    assert abs(soft.mean() - hard.mean()) > 0.05  # the two metrics are not the same number
    # the old name is the hard one
    assert torch.equal(bin_cross_entropy(logits, ab, "none"), hard_cross_entropy(logits, ab, "none"))
    # a prediction equal to the soft target scores its entropy, not 0
    zt = torch.from_numpy(z).float()
    exact = soft_cross_entropy(zt.clamp(min=1e-30).log(), ab, reduction="none").numpy()
    entropy = -(z * np.log(np.where(z > 0, z, 1))).sum(1).reshape(2, -1).mean(1)
    np.testing.assert_allclose(exact, entropy, rtol=1e-4)
    assert (entropy > 0.1).all()
    with pytest.raises(ValueError, match="reduction"):
        soft_cross_entropy(logits, ab, reduction="sum")
    with pytest.raises(ValueError, match="target_ab"):
        soft_cross_entropy(logits, ab[:, :1])


def test_r2_pooled_and_per_channel_against_numpy():
    rng = np.random.default_rng(5)
    # a around +30, b around -20: the channel means differ, the spread within each is small
    t = np.stack([30 + 3 * rng.standard_normal((6, 9)), -20 + 3 * rng.standard_normal((6, 9))])[None]
    p = t + 4 * rng.standard_normal(t.shape)  # errors larger than the spread within a channel
    ss_res = ((t - p) ** 2).sum()
    pooled = 1 - ss_res / ((t - t.mean()) ** 2).sum()
    per_channel = 1 - ss_res / ((t - t.mean((2, 3), keepdims=True)) ** 2).sum()
    tt, pt = torch.from_numpy(t), torch.from_numpy(p)
    assert ab_r2_pooled(pt, tt).item() == pytest.approx(pooled, rel=1e-12)
    assert ab_r2_per_channel(pt, tt).item() == pytest.approx(per_channel, rel=1e-12)
    assert pooled > 0.9 and per_channel < 0  # the two disagree wildly on such an image
    assert ab_r2(pt, tt).item() == ab_r2_per_channel(pt, tt).item()  # the old name is the per-channel one
    # per image over a batch; scale-free; constant truth gives NaN
    two = torch.cat([tt, tt.flip(-1)])
    np.testing.assert_allclose(ab_r2_pooled(torch.cat([pt, pt.flip(-1)]), two).numpy(), [pooled, pooled])
    assert ab_r2_pooled(pt / 128, tt / 128).item() == pytest.approx(pooled, rel=1e-12)
    assert math.isnan(ab_r2_pooled(torch.zeros(1, 2, 4, 4), torch.full((1, 2, 4, 4), 7.0)).item())
    with pytest.raises(ValueError, match="pred_ab"):
        ab_r2_pooled(torch.zeros(1, 3, 4, 4), tt)


def test_coarse_bins_merge_neighbours(chelsea):
    cmap = coarse_bin_map(20)
    assert cmap.shape == (313,) and 60 < cmap.max() + 1 < 120
    # bins in one coarse cell are at most one fine step apart in a and in b
    for c in np.unique(cmap):
        pts = AB_BINS[cmap == c]
        assert np.ptp(pts[:, 0]) <= 10 and np.ptp(pts[:, 1]) <= 10
    _, ab = chelsea
    # a prediction one bin off in b is wrong at 313 bins but often right on the coarse grid
    q = fastcolor.nearest_bin(ab)
    nb = torch.from_numpy(np.array([np.argmin(((AB_BINS - AB_BINS[i] - [0, 10]) ** 2).sum(1)) for i in range(313)]))
    logits = torch.nn.functional.one_hot(nb[q], 313).permute(0, 3, 1, 2).float() * 50
    fine, coarse = bin_accuracy(logits, ab).item(), coarse_accuracy(logits, ab).item()
    assert fine < 0.05 and coarse > 0.3
    assert coarse_accuracy(_one_hot_logits(ab), ab).item() == 1.0


def test_mse_matches_reference_and_r2(chelsea):
    _, ab = chelsea
    pred = ab * 0.5 + 3
    np.testing.assert_allclose(ab_mse(pred, ab).numpy(), regression_loss(pred.numpy() / 128, ab.numpy() / 128, "none"),
                               rtol=1e-5)
    assert ab_r2(ab, ab).item() == pytest.approx(1.0)
    mean = ab.mean((2, 3), keepdim=True).expand_as(ab)
    assert ab_r2(mean, ab).item() == pytest.approx(0.0, abs=1e-9)
    assert ab_r2(pred, ab).item() < 1
    assert math.isnan(ab_r2(torch.zeros(1, 2, 4, 4), torch.zeros(1, 2, 4, 4)).item())


def test_auc_raw_and_rebalanced():
    assert auc(torch.zeros(1, 2, 4, 4) + 10, torch.zeros(1, 2, 4, 4) + 10) == (1.0, 1.0)
    truth = torch.zeros(1, 2, 1, 10)
    pred = truth.clone()
    pred[:, 0] += 50  # every pixel 50 off: cumulative share is 0 below 50, 1 from 50
    raw, rebal = auc(pred, truth)
    assert raw == pytest.approx(100.5 / 150) and rebal == pytest.approx(raw)
    # 9 common grey pixels exact, 1 rare saturated pixel far off: rebalancing weighs the rare one up
    truth = torch.zeros(1, 2, 1, 10)
    truth[0, :, 0, 9] = torch.tensor([60.0, 60.0])
    pred = truth.clone()
    pred[0, :, 0, 9] = 0
    raw, rebal = auc(pred, truth)
    assert raw > 0.9 and rebal < raw - 0.2
    # streaming equals one shot
    acc = AucAccumulator()
    acc.update(pred[..., :5], truth[..., :5]).update(pred[..., 5:], truth[..., 5:])
    assert acc.result() == (raw, rebal)


def test_psnr_ssim_match_skimage(chelsea):
    rgb, _ = chelsea
    noisy = (rgb + 0.05 * torch.randn_like(rgb, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    a, b = rgb[0].permute(1, 2, 0).double().numpy(), noisy[0].permute(1, 2, 0).double().numpy()
    assert psnr(noisy, rgb)[0] == pytest.approx(skimage.metrics.peak_signal_noise_ratio(a, b, data_range=1.0))
    assert ssim(noisy, rgb)[0] == pytest.approx(
        skimage.metrics.structural_similarity(a, b, data_range=1.0, channel_axis=-1))
    assert ssim(rgb, rgb)[0] == pytest.approx(1.0)
    assert np.isinf(psnr(rgb, rgb)[0])


def test_colorfulness():
    img = skimage.data.astronaut().astype(np.float64)
    rg = img[..., 0] - img[..., 1]
    yb = 0.5 * (img[..., 0] + img[..., 1]) - img[..., 2]
    expect = np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean())
    t = torch.from_numpy(img / 255).permute(2, 0, 1)[None]
    assert colorfulness(t).item() == pytest.approx(expect)
    gray = t.mean(1, keepdim=True).expand_as(t)
    assert colorfulness(gray).item() == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(TypeError, match="rgb"):
        colorfulness(img)


def test_evaluate_writes_per_class_tables_and_grid(tmp_path):
    from fastcolor.train import TrainConfig, train

    data = make_photo_folder(tmp_path / "photos", per_photo=4, size=32, classes=True)
    common = dict(data_dir=str(data), batch_size=8, epochs=1, lr=1e-3, workers=0, progress=False, plot=False)
    train(TrainConfig(run_dir=str(tmp_path / "zhang"), model="zhang_tiny", **common))
    train(TrainConfig(run_dir=str(tmp_path / "fusion"), model="fusion_tiny", loss="mse", **common))
    report = evaluate(tmp_path / "zhang", data, compare=tmp_path / "fusion")
    out = tmp_path / "zhang" / "eval"
    rows = json.loads((out / "metrics.json").read_text())["rows"]
    assert {(r["class"], r["split"]) for r in rows} >= {("chelsea", "train"), ("chelsea", "test"), ("(all)", "test")}
    # 5 classes x 4 images: 2 train + 1 val + 1 test per class
    assert sum(r["images"] for r in rows if r["class"] != "(all)" and r["split"] == "test") == 5
    for r in rows:
        assert 0 <= r["acc313"] <= 1 and 0 <= r["acc_coarse20"] <= 1 and 0 < r["auc"] <= 1
    assert all("acc313" not in r for r in report["models"]["compare"]["rows"])
    md = (out / "metrics.md").read_text()
    assert "| chelsea | test |" in md and "auc_rebal" in md
    grid = np.asarray(Image.open(out / "comparison.png"))
    assert grid.shape[1] > grid.shape[0] / 2  # 4 columns, 5 rows
    # a bare model file (no split.json beside it): every image in one "all" split
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "m.safetensors").write_bytes((tmp_path / "fusion" / "model.safetensors").read_bytes())
    single = evaluate(tmp_path / "bare" / "m.safetensors", data, out_dir=tmp_path / "e2", grid_images=0)
    assert {r["split"] for r in single["rows"]} == {"all"}
    assert [r["images"] for r in single["rows"] if r["class"] == "(all)"] == [20]
    assert not (tmp_path / "e2" / "comparison.png").exists()
    with pytest.raises(FileNotFoundError, match="run_dir_or_weights"):
        evaluate(tmp_path / "nope", data)
    # splits: "all" in a run directory ignores its split.json; a mapping is evaluated as given
    run_model = tmp_path / "zhang" / "model.safetensors"
    every = evaluate(run_model, data, out_dir=tmp_path / "e3", splits=("all",), grid_images=0)
    assert [r["images"] for r in every["rows"] if r["class"] == "(all)"] == [20]
    assert every["source"] == str(run_model) and str(run_model) in (tmp_path / "e3" / "metrics.md").read_text()
    some = index_images(data)[:3]
    mine = evaluate(run_model, data, out_dir=tmp_path / "e4", splits={"mine": some}, grid_images=0)
    assert {(r["class"], r["split"], r["images"]) for r in mine["rows"]} >= {("(all)", "mine", 3)}
    with pytest.raises(ValueError, match="no split.json"):
        evaluate(tmp_path / "bare" / "m.safetensors", data, splits=("test",))
    with pytest.raises(ValueError, match="not in"):
        evaluate(tmp_path / "zhang", data, splits=("holdout",))
    with pytest.raises(TypeError, match="not a string"):
        evaluate(tmp_path / "zhang", data, splits="test")
