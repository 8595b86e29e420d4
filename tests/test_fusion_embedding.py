"""The fusion model's embedding as Deep Koalarization built it (issue 15 point 3): the backbone
classifier's logits by default, computed by one function (FusionNet.embed) from exactly the L
the network sees, in training (cached without augmentation, per batch from the augmented L
with it), evaluation and colorization."""
import json
import sys
import warnings
from pathlib import Path

import pytest
import torch

from fastcolor.color import gray_rgb
from fastcolor.colorize import colorize_image
from fastcolor.data import ColorizationDataset, index_images, load_l
from fastcolor.io import save_tensors
from fastcolor.models import EMBEDDINGS, PRESETS, EmbeddingCache, FusionNet, build_model, model_state
from fastcolor.models.serialization import load_model
from fastcolor.train import TrainConfig, train

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_train import make_photo_folder, one_thread  # noqa: E402,F401  (autouse: one intra-op thread)

SIZE = 32  # the network's input size
EMBED = 48  # the backbone's: not SIZE, so an embedding of another L than the network's would show
# resnet18 with random weights gives logits of order 1 (mobilenet_v3_small's are ~1e-10, which
# would make a 1e-5 comparison meaningless)
CONFIG = {"arch": "fusion", "input_size": SIZE, "width": 0.125, "backbone": "resnet18", "embed_size": EMBED}


def _close(got, want, tol=1e-5, min_scale=0.1):
    """Equal to ``tol`` relative to the embedding's scale (logits of a random backbone)."""
    scale = float(want.abs().max())
    assert scale > min_scale, "the embedding is too small for the comparison to mean anything"
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * scale)


@pytest.fixture(scope="module")
def models():
    """One fusion model per embedding kind (the same seed-0 random backbone in each)."""
    return {k: build_model({**CONFIG, "embedding": k}).eval() for k in EMBEDDINGS}


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """10 photos of exactly the network's input size, so one image gives one network input in
    every path (the dataset and colorize resize differently: RGB vs L)."""
    return make_photo_folder(tmp_path_factory.mktemp("photos32"), per_photo=2, size=SIZE)


class _Recorder:
    """Wraps FusionNet.forward: records (phase, L, embedding used) of every call."""

    def __init__(self, monkeypatch):
        self.phase, self.calls = "", []
        orig = FusionNet.forward

        def forward(net, L, embedding=None):
            if L.device.type == "meta":  # colorize's memory estimate traces the model: not a real call
                return orig(net, L, embedding)
            used = net.embed(L) if embedding is None else embedding  # what the original computes
            self.calls.append((self.phase, L.detach().float().clone(), used.detach().float().clone(),
                               net.embed(L.detach()).float()))
            return orig(net, L, used)

        monkeypatch.setattr(FusionNet, "forward", forward)

    def of(self, phase):
        return [(L, used, ref) for p, L, used, ref in self.calls if p == phase]


def _cfg(photos, run, **kw):
    base = dict(data_dir=str(photos), run_dir=str(run), model=CONFIG, loss="mse", batch_size=4, epochs=1,
                lr=1e-3, workers=0, progress=False, plot=False, embedding_cache=str(run / "emb"))
    return TrainConfig(**{**base, **kw})


def test_training_embedding_equals_colorize_and_eval(photos, tmp_path, monkeypatch):
    from fastcolor.metrics import evaluate

    rec = _Recorder(monkeypatch)
    rec.phase = "train"
    run = tmp_path / "run"
    train(_cfg(photos, run, augment=False))
    # without augmentation the cache serves all splits, computed from the dataset's own L
    assert len(list((run / "emb").glob("*.safetensors"))) == 10
    model = load_model(run / "model.safetensors")
    assert model.config["embedding"] == "logits"
    trained = rec.of("train")
    assert trained
    for _L, used, ref in trained:  # the cached embedding is that of the L the network saw
        _close(used, ref)
    rows = [(L[i], used[i]) for L, used, _ in trained for i in range(L.shape[0])]

    images = sorted(photos.glob("*.png"))
    test_split = {p for p, _ in json.loads((run / "split.json").read_text())["test"]}
    rec.phase = "colorize"
    for p in images[:4]:
        colorize_image(model, p)
    rec.phase = "eval"
    evaluate(run, photos, out_dir=tmp_path / "eval", splits=("all",), device="cpu", grid_images=0)

    for phase, seen in (("colorize", images[:4]), ("eval", images)):
        calls = rec.of(phase)
        assert sum(L.shape[0] for L, _, _ in calls) == len(seen)
        matched = 0
        for L, used, ref in calls:
            _close(used, ref)  # computed from the L the network sees
            for j in range(L.shape[0]):
                same = [e for Lt, e in rows if (Lt - L[j]).abs().max() < 1e-3]  # the same image in training
                if same:
                    matched += 1
                    _close(used[j], same[0])
        # every image training saw (train and validation splits; not the test split)
        assert matched == sum(p.name not in test_split for p in seen) > 0


def test_augmented_training_bypasses_the_cache(photos, tmp_path, monkeypatch):
    rec = _Recorder(monkeypatch)
    rec.phase = "train"
    run = tmp_path / "run"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(_cfg(photos, run, augment=True))
    said = [str(w.message) for w in caught if "embedding cache" in str(w.message)]
    assert len(said) == 1 and "augmentation is on" in said[0] and "augmented L" in said[0]
    split = json.loads((run / "split.json").read_text())
    # only the splits without augmentation are cached
    assert len(list((run / "emb").glob("*.safetensors"))) == len(split["val"]) + len(split["test"])
    plain = {p: load_l(photos / p, SIZE) for p, _ in split["train"]}
    augmented = 0
    for L, used, ref in rec.of("train"):
        _close(used, ref)  # every batch: the embedding of the L the network saw
        for Li in L:
            augmented += min((Li - Lp).abs().max().item() for Lp in plain.values()) > 1.0
    assert augmented >= len(split["train"]) // 2  # those L really were augmented
    # a cache together with augmentation is refused by the dataset itself
    cache = EmbeddingCache(tmp_path / "c", build_model(CONFIG).embedder, image_size=SIZE)
    with pytest.raises(ValueError, match="embeddings: a cache holds embeddings of the un-augmented"):
        ColorizationDataset(photos, index_images(photos), size=SIZE, augment=True, embeddings=cache)


def test_cache_is_computed_from_the_dataset_L(photos, tmp_path, models):
    model = models["logits"]
    ds = ColorizationDataset(photos, index_images(photos), size=SIZE, target_stride=1)
    cache = EmbeddingCache(tmp_path / "c", model.embedder, image_size=SIZE)
    paths = [photos / it.path for it in ds.items]
    assert cache.precompute(paths, lambda p: load_l(p, SIZE), batch_size=4) == len(paths)
    cached = ColorizationDataset(photos, ds.items, size=SIZE, target_stride=1, embeddings=cache)
    for i in range(len(ds)):
        s = cached[i]
        torch.testing.assert_close(load_l(paths[i], SIZE), s["L"], rtol=0, atol=0)  # the same L tensor
        _close(s["embedding"][None], model.embed(s["L"][None]))
    # another network input size, embedding kind or backbone input size is another cache entry
    ids = {EmbeddingCache(tmp_path / "c", model.embedder, image_size=64).identity, cache.identity,
           EmbeddingCache(tmp_path / "c", models["probs"].embedder, image_size=SIZE).identity}
    assert len(ids) == 3


def test_logits_is_the_default_and_the_kinds_against_hand_computation(models):
    assert EMBEDDINGS == ("logits", "probs", "features")
    assert FusionNet(backbone=None, embed_dim=4).config["embedding"] == "logits"
    for preset in ("fusion", "fusion_small", "fusion_tiny"):
        assert "embed_softmax" not in PRESETS[preset]
    L = torch.rand(2, 1, SIZE, SIZE) * 100
    assert build_model(CONFIG).config["embedding"] == "logits"
    default = models["logits"]
    net = default.embedder.net
    # by hand: grey sRGB of L in 3 channels, resized to the backbone's size, ImageNet mean/std
    x = torch.nn.functional.interpolate(gray_rgb(L), size=(EMBED, EMBED), mode="bilinear", antialias=True)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    x = (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    with torch.no_grad():
        logits = net(x)
        features = torch.nn.Sequential(*list(net.children())[:-1])(x).flatten(1)  # all but resnet's fc
    _close(default.embed(L), logits)
    _close(models["probs"].embed(L), logits.softmax(1), min_scale=1e-3)  # same seed-0 backbone in each
    _close(models["features"].embed(L), features)
    assert models["features"].config["embed_dim"] == 512 and models["features"](L).shape == (2, 2, SIZE, SIZE)
    # the same in a bf16 autocast region (a bf16 training step): the embedding stays float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf = default.embed(L)
    assert bf.dtype == torch.float32
    _close(bf, logits)
    with pytest.raises(ValueError, match=r"embedding must be one of \('logits', 'probs', 'features'\), got 'pool'"):
        FusionNet(backbone=None, embed_dim=4, embedding="pool")


def _v1_file(tmp_path, m, embed_softmax):
    """A model file as fastcolor v1 wrote it: the config has embed_softmax and no embedding."""
    v1 = {k: v for k, v in m.config.items() if k != "embedding"}
    if embed_softmax is not None:
        v1["embed_softmax"] = embed_softmax
    path = tmp_path / f"v1_{embed_softmax}.safetensors"
    save_tensors(path, model_state(m), {"format": "fastcolor-model-1", "model_config": v1})
    return path


def test_v1_configs_load_with_the_embedding_they_were_trained_with(tmp_path):
    m = FusionNet.tiny()
    probs = load_model(_v1_file(tmp_path, m, True))
    assert probs.config["embedding"] == "probs" and "embed_softmax" not in probs.config
    L = torch.rand(2, 1, 32, 32) * 100
    torch.testing.assert_close(probs.embed(L).sum(1), torch.ones(2))  # softmax probabilities
    assert load_model(_v1_file(tmp_path, m, False)).config["embedding"] == "logits"
    # every v1 file recorded embed_softmax (v1's default True); a config with neither key is a
    # new one and means logits
    assert build_model({k: v for k, v in m.config.items() if k != "embedding"}).config["embedding"] == "logits"
    with pytest.raises(ValueError, match="embedding='logits' contradicts embed_softmax=True"):
        build_model({**m.config, "embed_softmax": True})
