"""The class prior of a run (issue 20.1): from the data, from a seeded sample, or the authors'
published ImageNet prior (a fact table, checked against their file where ../shared/reference holds it)."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_reliability_runs import _cfg, _one_error_line, _photos, _run, _train_argv  # noqa: E402
from test_train import one_thread  # noqa: E402,F401  (autouse: one intra-op thread)
from test_validation_bounds import _Loads  # noqa: E402

import fastcolor  # noqa: E402
from fastcolor.data.prior import imagenet_prior, parse_prior, sample_items  # noqa: E402
from fastcolor.io import load_tensors  # noqa: E402
from fastcolor.recipes import RECIPES  # noqa: E402
from fastcolor.train import TrainConfig, train  # noqa: E402

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"


def test_imagenet_prior_is_the_authors_file_in_fastcolors_bin_order():
    if not (REFERENCE / "prior_probs.npy").is_file():
        pytest.skip(f"{REFERENCE} holds no prior_probs.npy (the authors' published file)")
    theirs = np.load(REFERENCE / "prior_probs.npy")
    bins = np.load(REFERENCE / "pts_in_hull.npy")  # their bin order: (a, b) of each entry
    ours = imagenet_prior()
    index = {tuple(ab): q for q, ab in enumerate(fastcolor.AB_BINS.astype(int).tolist())}
    mapped = np.array([ours[index[tuple(ab)]] for ab in bins.tolist()])
    np.testing.assert_allclose(mapped, theirs / theirs.sum(), rtol=1e-5, atol=0)


def test_imagenet_rarity_weights_have_the_published_statistics():
    """README of the reference data: lambda 0.5 gives min 0.0965, max 6.1749, median 5.9987."""
    p = imagenet_prior()
    assert p.shape == (313,) and p.dtype == np.float64 and abs(p.sum() - 1) < 1e-12 and (p > 0).all()
    w = fastcolor.rarity_weights(p, lam=0.5)
    assert (round(w.min(), 4), round(w.max(), 4), round(float(np.median(w)), 4)) == (0.0965, 6.1749, 5.9987)
    assert tuple(fastcolor.AB_BINS[p.argmax()]) == (0.0, 0.0) and round(p.max(), 4) == 0.2012


@pytest.mark.parametrize("spec, parsed", [("data", ("data", None)), ("imagenet", ("imagenet", None)),
                                          ("sample:1", ("sample", 1)), ("sample:5000", ("sample", 5000))])
def test_prior_specs(spec, parsed):
    assert parse_prior(spec) == parsed


@pytest.mark.parametrize("spec", ["", "sample", "sample:", "sample:0", "sample:-3", "sample:1.5", "Data", 5, None])
def test_bad_prior_specs_are_refused_naming_prior(spec):
    with pytest.raises(ValueError, match="prior: expected 'data', 'sample:N'"):
        parse_prior(spec)


def test_a_sample_is_seeded_the_same_every_time_and_all_when_small():
    items = list(range(100))
    a, b = sample_items(items, 10, seed=3), sample_items(list(items), 10, seed=3)
    assert a == b and len(set(a)) == 10 and a == sorted(a)
    assert sample_items(items, 10, seed=4) != a
    assert sample_items(items, 100, seed=3) == items and sample_items(items, 1000, seed=3) == items


def test_a_sample_prior_reads_only_its_sample_and_records_it(tmp_path, monkeypatch):
    data, run = _photos(tmp_path / "data", 30), tmp_path / "run"
    loads = _Loads(monkeypatch)
    train(_cfg(data, run, prior="sample:5", epochs=None, max_steps=1, batch_size=2))
    tensors, meta = load_tensors(run / "prior.safetensors")
    assert meta["prior"] == "sample:5" and meta["images"] == 5 and meta["seed"] == 0
    # the pass read 5 images (the step 2, the bounded validation 2): not the 24 training images
    assert len(loads.paths) == 5 + 2 + 2, loads.paths
    # a resumed run reuses the file (no pass); another sample is refused while a checkpoint was trained on this one
    assert not torch.equal(tensors["prior"], torch.from_numpy(imagenet_prior()))
    loads.paths.clear()
    train(_cfg(data, run, prior="sample:5", epochs=None, max_steps=2, batch_size=2))
    assert len(loads.paths) == 2 + 2  # one more step and its validation
    with pytest.raises(ValueError, match=r"prior 'sample:5' -> 'sample:7'"):
        train(_cfg(data, run, prior="sample:7", epochs=None, max_steps=3, batch_size=2))


def test_the_default_prior_of_a_small_folder_is_all_of_it(tmp_path):
    data, run = _photos(tmp_path / "data", 12), tmp_path / "run"
    train(_cfg(data, run))
    assert TrainConfig(data_dir="d", run_dir="r").prior == "sample:5000"
    _, meta = load_tensors(run / "prior.safetensors")
    assert meta["prior"] == "data" and meta["images"] == 10  # the 10 training images of 12


def test_the_imagenet_prior_needs_no_pass_and_zhang2016_uses_it(tmp_path, monkeypatch):
    assert RECIPES["zhang2016"].values["prior"] == "imagenet"
    data, run = _photos(tmp_path / "data", 12), tmp_path / "run"
    loads = _Loads(monkeypatch)
    train(_cfg(data, run, prior="imagenet", epochs=None, max_steps=1, batch_size=2))
    assert len(loads.paths) == 2 + 1  # one step, its validation (1 image of 12): no prior pass
    tensors, meta = load_tensors(run / "prior.safetensors")
    assert meta["prior"] == "imagenet" and "ImageNet" in meta["images"]
    np.testing.assert_array_equal(tensors["prior"].numpy(), imagenet_prior())
    np.testing.assert_allclose(tensors["weights"].numpy(), fastcolor.rarity_weights(imagenet_prior(), 0.5))


def test_prior_lambda_0_names_the_option_and_the_cause(capsys, tmp_path):
    """Before: `--prior-lambda 0` ended in NaN weights, naming neither."""
    data = _photos(tmp_path / "data", 12)
    rc, _, err = _run(capsys, *_train_argv(data, tmp_path / "r", "--prior-lambda", "0"))
    line = _one_error_line(rc, err, "--prior-lambda", "beyond float32's range", "use prior_lam > 0")
    assert "warning" not in err and "nan" not in line.lower()
    assert not (tmp_path / "r" / "prior.safetensors").exists() and not (tmp_path / "r" / "train_config.json").exists()
    # and the library op says which bin and why, instead of returning NaN
    p = np.full(313, 1e-320)
    p[120] = 1.0
    with pytest.raises(ValueError, match=r"lam: 0 weighs bin \d+ \(prior 1e-320\).*overflows"):
        fastcolor.rarity_weights(p / p.sum(), lam=0)


def test_bad_prior_flag_is_one_line_naming_it(capsys, tmp_path):
    data = _photos(tmp_path / "data", 12)
    rc, _, err = _run(capsys, *_train_argv(data, tmp_path / "r", "--prior", "sample:lots"))
    _one_error_line(rc, err, "--prior", "sample:N", "'sample:lots'")
    assert not (tmp_path / "r").exists()
