"""Named training recipes (issue 15, point 1): complete and documented, recorded in the run,
listed in --help, applied by the CLI with every value overridable, and reaching the loss."""
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import skimage.color
import skimage.data
import torch
from PIL import Image
from test_train import one_thread  # noqa: F401  (autouse: one intra-op thread)

import fastcolor.train as ft
from fastcolor.app.cli import main
from fastcolor.data import load_split
from fastcolor.recipes import HYPERPARAMETERS, RECIPES, recipe_values
from fastcolor.train import TrainConfig, train

SIZE = 32  # the images on disk are SIZE x SIZE, so the dataset's resize leaves them as they are


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Eight colour crops and two grey ones (R = G = B), SIZE x SIZE."""
    root = tmp_path_factory.mktemp("recipe_photos")
    for i, name in enumerate(["astronaut", "chelsea", "coffee", "rocket", "astronaut", "chelsea", "coffee",
                              "rocket", "astronaut", "coffee"]):
        img = getattr(skimage.data, name)()
        s = min(img.shape[:2]) // 2
        off = 40 * (i // 4)
        crop = Image.fromarray(img[off:off + s, off:off + s]).resize((SIZE, SIZE))
        if i >= 8:
            crop = crop.convert("L").convert("RGB")
        crop.save(root / f"im{i}.png")
    return root


class LossSpy:
    """Wraps the trainer's rebalanced_cross_entropy: records each call's target ab and options."""

    def __init__(self, monkeypatch):
        self.calls = []
        real = ft.rebalanced_cross_entropy

        def spy(logits, target, **kw):
            self.calls.append({"logits": tuple(logits.shape), "ab": target.detach().clone(),
                               "grad": torch.is_grad_enabled(), **{k: v for k, v in kw.items() if k != "weights"}})
            return real(logits, target, **kw)

        monkeypatch.setattr(ft, "rebalanced_cross_entropy", spy)

    def validation(self):
        return [c for c in self.calls if not c["grad"]]


def _lab(path: Path) -> np.ndarray:
    """(3, H, W) Lab of an image file, computed with scikit-image (not fastcolor)."""
    return skimage.color.rgb2lab(np.asarray(Image.open(path).convert("RGB"))).transpose(2, 0, 1)


def _run(photos, run, *flags):
    args = ["train", str(photos), "--out", str(run), "--model", "zhang-tiny", "--size", str(SIZE), "--workers", "0",
            "--batch-size", "4", "--epochs", "1", "--max-steps-per-epoch", "2", *flags]
    assert main(args) == 0
    return json.loads((run / "train_config.json").read_text())


def test_every_recipe_sets_every_hyper_parameter_with_a_source():
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert set(HYPERPARAMETERS) <= fields
    for name, r in RECIPES.items():
        assert set(r.values) == set(HYPERPARAMETERS), name
        assert all(isinstance(r.sources[k], str) and len(r.sources[k]) > 10 for k in HYPERPARAMETERS), name
        cfg = TrainConfig.from_recipe(name, data_dir="d", run_dir="r")
        assert cfg.recipe == name
        assert {k: getattr(cfg, k) for k in HYPERPARAMETERS} == dict(r.values)
        with pytest.raises(TypeError):
            r.values["lr"] = 1.0  # frozen
        with pytest.raises(dataclasses.FrozenInstanceError):
            r.name = "x"
    z, s = RECIPES["zhang2016"].values, RECIPES["study"].values
    # the facts of issue 15 (the authors' solver and training net; the study's report)
    assert (z["lr"], z["betas"], z["weight_decay"], z["batch_size"]) == (3e-5, (0.9, 0.99), 1e-3, 40)
    assert (z["lr_milestones"], z["lr_gamma"], z["max_steps"]) == ((225_000,), 0.1, 500_000)
    assert (z["crop_size"], z["mirror"], z["nongray"], z["target_reduction"]) == (176, True, True, "subsample")
    assert (z["prior_lam"], z["prior_sigma"], z["loss"], z["model"]) == (0.5, 5.0, "rebalanced", "zhang")
    assert (s["lr"], s["betas"], s["batch_size"], s["epochs"]) == (1e-3, (0.9, 0.999), 100, 40)
    assert (s["patience"], s["min_delta"], s["keep_best"], s["split"], s["augment"]) == (7, 1e-3, True,
                                                                                          (0.8, 0.1, 0.1), True)
    assert s["model"] == "zhang_small" and recipe_values("study", model="fusion_small")["loss"] == "mse"
    with pytest.raises(ValueError, match="recipe: expected one of zhang2016, study, default, got 'adam'"):
        recipe_values("adam")
    with pytest.raises(ValueError, match="recipe"):
        TrainConfig(data_dir="d", run_dir="r", recipe="adam")


def test_default_recipe_is_v1s_fastcolor_train():
    """'default' is what fastcolor train did in v1: TrainConfig's field defaults (v1's) but batch 32."""
    v1 = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.name in HYPERPARAMETERS}
    d = dict(RECIPES["default"].values)
    assert {k for k in v1 if v1[k] != d[k]} == {"batch_size"}
    assert d["batch_size"] == 32 and v1["batch_size"] == 100


def test_help_lists_each_recipe_on_one_line(capsys):
    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    for name, r in RECIPES.items():
        lines = [ln for ln in out.splitlines() if ln.split()[:1] == [name]]
        assert len(lines) == 1 and r.summary in lines[0], name
    assert "--nongray, --no-nongray" in out and "--target-reduction {subsample,area}" in out


def test_zhang2016_from_the_cli_subsamples_masks_grey_crops_and_is_recorded(photos, tmp_path, monkeypatch, capsys):
    spy = LossSpy(monkeypatch)
    got = _run(photos, tmp_path / "run", "--recipe", "zhang2016", "--crop-size", "24", "--lr", "1e-4")
    err = capsys.readouterr().err
    # recorded: the recipe's values, the overrides on top
    assert got["recipe"] == "zhang2016" and got["lr"] == 1e-4 and got["crop_size"] == 24
    assert (got["nongray"], got["target_reduction"], got["weight_decay"], got["betas"]) == (True, "subsample", 1e-3,
                                                                                            [0.9, 0.99])
    assert got["lr_milestones"] == [225000] and got["max_steps"] == 500000 and got["mirror"] is True
    assert "recipe zhang2016:" in err and "lr=0.0001" in err and "nongray=true" in err
    # the loss saw the non-grey mask, and training crops of 24 px (24 / 4 = 6 target pixels a side)
    train_calls = [c for c in spy.calls if c["grad"]]
    assert train_calls and all(c["nongray"] is True for c in spy.calls)
    assert all(c["logits"][2:] == (6, 6) and c["ab"].shape[2:] == (6, 6) for c in train_calls)
    # validation: the centre 24 x 24 crop, target = the top-left pixel of each 4 x 4 block
    val_items = [it.path for it in load_split(tmp_path / "run" / "split.json")["val"]]
    ab = torch.cat([c["ab"] for c in spy.validation()])
    assert ab.shape == (len(val_items), 2, 6, 6)
    for i, path in enumerate(val_items):
        centre = _lab(photos / path)[1:, 4:28, 4:28]
        np.testing.assert_allclose(ab[i].numpy(), centre[:, ::4, ::4], atol=2e-3)
        area = centre.reshape(2, 6, 4, 6, 4).mean(axis=(2, 4))
        assert np.abs(area - centre[:, ::4, ::4]).max() > 0.5  # the check can tell the two apart


def test_overrides_beat_the_recipe_and_reach_the_loss(photos, tmp_path, monkeypatch):
    spy = LossSpy(monkeypatch)
    got = _run(photos, tmp_path / "run", "--recipe", "zhang2016", "--no-nongray", "--target-reduction", "area",
               "--crop-size", "none", "--no-mirror", "--betas", "0.8", "0.9", "--patience", "3")
    assert (got["nongray"], got["target_reduction"], got["crop_size"], got["mirror"]) == (False, "area", None, False)
    assert got["betas"] == [0.8, 0.9] and got["patience"] == 3 and got["lr"] == 3e-5  # the rest: the recipe's
    assert spy.calls and all(c["nongray"] is False for c in spy.calls)
    val_items = [it.path for it in load_split(tmp_path / "run" / "split.json")["val"]]
    ab = torch.cat([c["ab"] for c in spy.validation()])
    assert ab.shape == (len(val_items), 2, SIZE // 4, SIZE // 4)
    for i, path in enumerate(val_items):
        full = _lab(photos / path)[1:]
        np.testing.assert_allclose(ab[i].numpy(), full.reshape(2, 8, 4, 8, 4).mean(axis=(2, 4)), atol=2e-3)


def test_grey_images_get_no_loss_with_nongray(photos, tmp_path, monkeypatch):
    """With nongray the trainer's loss of a batch of grey images is zero (and not without)."""
    from fastcolor.data import ColorizationDataset, ImageItem

    losses = {}
    for nongray in (True, False):
        cfg = TrainConfig(data_dir=str(photos), run_dir=str(tmp_path / f"r{nongray}"), model="zhang_tiny",
                          nongray=nongray, workers=0, progress=False, plot=False)
        t = ft._Trainer(cfg, ft._Dist())
        t.build("zhang_tiny")
        ds = ColorizationDataset(photos, [ImageItem("im8.png", ""), ImageItem("im9.png", "")], SIZE, 4)
        batch = torch.utils.data.default_collate([ds[0], ds[1]])
        losses[nongray] = float(t.loss(t.model, batch, None).detach())
    assert losses[True] == 0.0 and losses[False] > 1.0


def test_lr_steps_down_at_each_milestone_and_max_steps_ends_the_run(photos, tmp_path, monkeypatch):
    seen = []
    real_step = torch.optim.Adam.step

    def step(self, *a, **k):
        seen.append(self.param_groups[0]["lr"])
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.Adam, "step", step)
    kw = dict(data_dir=str(photos), run_dir=str(tmp_path / "run"), model="zhang_tiny", batch_size=4, workers=0,
              progress=False, plot=False, epochs=None, max_steps_per_epoch=2, lr=1e-3, lr_milestones=(3, 5))
    res = train(TrainConfig(max_steps=6, **kw))
    assert seen == pytest.approx([1e-3, 1e-3, 1e-3, 1e-4, 1e-4, 1e-5])
    assert res.epochs_completed == 3 and res.history[-1]["step"] == 6
    # resumed, the schedule carries on from the recorded step count
    seen.clear()
    res = train(TrainConfig(max_steps=7, **kw))
    assert seen == pytest.approx([1e-5]) and res.resumed_from_epoch == 2 and res.history[-1]["step"] == 7


def test_bad_recipe_settings_are_refused_naming_the_flag(photos, tmp_path, capsys):
    assert main(["train", str(photos), "--out", str(tmp_path / "r"), "--recipe", "zhang2016", "--max-steps",
                 "none"]) == 2
    assert "--epochs: epochs: None (no epoch limit) needs max_steps" in capsys.readouterr().err
    assert main(["train", str(photos), "--out", str(tmp_path / "r"), "--recipe", "nope"]) == 2
    assert "--recipe" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
