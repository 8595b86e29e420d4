import json
import sys
from pathlib import Path

import pytest
import torch

from fastcolor.models import BACKBONES, Embedder, EmbeddingCache, FusionNet, ZhangNet, build_model, model_state
from fastcolor.models.serialization import load_model, save_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_train import one_thread  # noqa: E402,F401  (autouse: one intra-op thread)


def _n_params(m, skip="embedder."):
    return sum(p.numel() for n, p in m.named_parameters() if not n.startswith(skip))


def test_zhang_eccv16_shapes_and_size():
    m = ZhangNet()
    assert 31e6 < _n_params(m) < 33e6  # the released ECCV16 net has ~32M parameters
    convs = [x for x in m.modules() if isinstance(x, torch.nn.Conv2d)]
    assert len(convs) == 2 + 2 + 3 + 4 * 3 + 2 + 1
    assert [c.dilation[0] for c in convs if c.in_channels == 512 and c.out_channels == 512].count(2) == 6
    assert sum(isinstance(x, torch.nn.BatchNorm2d) for x in m.modules()) == 7
    with torch.no_grad():
        out = m.eval()(torch.rand(1, 1, 64, 48) * 100)
    assert out.shape == (1, 313, 16, 12)


def test_zhang_small_is_128_to_32():
    m = ZhangNet.small().eval()
    with torch.no_grad():
        assert m(torch.rand(2, 1, 128, 128) * 100).shape == (2, 313, 32, 32)
    assert m.config["input_size"] == 128 and m.config["mid_width"] == 256
    assert _n_params(m) < _n_params(ZhangNet()) / 5


def test_input_is_centred():
    m = ZhangNet.tiny().eval()
    seen = {}
    m.encoder[0][0].register_forward_hook(lambda mod, inp, out: seen.update(x=inp[0]))
    m(torch.full((1, 1, 32, 32), 75.0))
    torch.testing.assert_close(seen["x"], torch.full((1, 1, 32, 32), 0.25))


def test_fusion_shapes_and_embedding_paths():
    m = FusionNet.tiny(input_size=32).eval()
    L = torch.rand(3, 1, 32, 32) * 100
    with torch.no_grad():
        out = m(L)
        emb = m.embed(L)
        torch.testing.assert_close(m(L, emb), out)
    assert out.shape == (3, 2, 32, 32) and out.abs().max() <= 1
    assert emb.shape == (3, 1000)
    assert m.config["embedding"] == "logits"  # Deep Koalarization's; the kinds: tests/test_fusion_embedding.py
    assert not any(p.requires_grad for p in m.embedder.parameters())
    m.train()
    assert not m.embedder.net.training  # the backbone stays in eval mode
    with pytest.raises(ValueError, match="embedding"):
        m(L, torch.zeros(3, 10))
    headless = FusionNet(input_size=32, width=0.125, backbone=None, embed_dim=7)
    assert headless(L, torch.rand(3, 7)).shape == (3, 2, 32, 32)
    with pytest.raises(ValueError, match="embedding"):
        headless(L)


def test_fusion_layer_widths_follow_the_paper():
    m = FusionNet(backbone=None, embed_dim=1000)
    enc = [c for c in m.encoder if isinstance(c, torch.nn.Conv2d)]
    assert [c.out_channels for c in enc] == [64, 128, 128, 256, 256, 512, 512, 256]
    assert [c.stride[0] for c in enc] == [2, 1, 2, 1, 2, 1, 1, 1]
    assert m.fusion[0].in_channels == 256 + 1000 and m.fusion[0].out_channels == 256
    dec = [c.out_channels for c in m.decoder if isinstance(c, torch.nn.Conv2d)]
    assert dec == [128, 64, 64, 32, 2]
    assert sum(isinstance(c, torch.nn.Upsample) for c in m.decoder) == 3


def test_backbone_weights_load_from_local_file(tmp_path):
    from safetensors.torch import save_file

    e1 = Embedder("mobilenet_v3_small", input_size=64)
    sd = {k: v.clone() + 0.01 for k, v in e1.net.state_dict().items() if v.is_floating_point()}
    sd.update({k: v for k, v in e1.net.state_dict().items() if not v.is_floating_point()})
    save_file(sd, str(tmp_path / "w.safetensors"))
    torch.save(sd, tmp_path / "w.pth")
    for f in ("w.safetensors", "w.pth"):
        e2 = Embedder("mobilenet_v3_small", weights=tmp_path / f, input_size=64)
        torch.testing.assert_close(e2.net.features[0][0].weight, sd["features.0.0.weight"])
    # embeddings cached with other backbone weights are not reused
    assert EmbeddingCache(tmp_path / "c", e1).identity != EmbeddingCache(tmp_path / "c", e2).identity
    with pytest.raises(ValueError, match="backbone"):
        Embedder("vgg999")
    assert set(BACKBONES) >= {"resnet50", "mobilenet_v3_small", "inception_v3"}


def test_config_round_trip_and_save_load(tmp_path):
    for m in (ZhangNet.tiny(), FusionNet.tiny()):
        m.eval()
        rebuilt = build_model(json.loads(json.dumps(m.config)))
        assert type(rebuilt) is type(m) and rebuilt.config == m.config
        save_model(tmp_path / "m.safetensors", m)
        assert json.loads((tmp_path / "m.json").read_text()) == m.config
        loaded = load_model(tmp_path / "m.safetensors")
        assert not any(k.startswith("embedder.") for k in model_state(m))
        L = torch.rand(2, 1, 32, 32) * 100
        with torch.no_grad():
            if isinstance(m, FusionNet):
                emb = m.embed(L)
                torch.testing.assert_close(loaded(L, emb), m(L, emb))
            else:
                torch.testing.assert_close(loaded(L), m(L))
    with pytest.raises(ValueError, match="arch"):
        build_model({"arch": "unet"})


def test_embedding_cache_keys_on_mtime(tmp_path):
    import numpy as np
    from PIL import Image

    img = tmp_path / "x.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(img)
    e = Embedder("mobilenet_v3_small", input_size=32)
    cache = EmbeddingCache(tmp_path / "cache", e)
    assert cache.get(img) is None
    calls = []

    def load_l(p):
        calls.append(p)
        return torch.full((1, 32, 32), 50.0)

    assert cache.precompute([img], load_l) == 1
    assert cache.get(img).shape == (1000,)
    assert cache.precompute([img], load_l) == 0 and len(calls) == 1
    import os
    st = img.stat()
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert cache.get(img) is None


def test_bad_inputs_name_the_argument():
    with pytest.raises(ValueError, match="L"):
        ZhangNet.tiny()(torch.rand(1, 3, 32, 32))
    with pytest.raises(ValueError, match="divisible"):
        ZhangNet.tiny()(torch.rand(1, 1, 30, 32))
    with pytest.raises(ValueError, match="mid_dilations"):
        ZhangNet(mid_dilations=())


def test_colorize_keeps_full_resolution_l():
    import numpy as np
    import skimage.data

    from fastcolor.color import rgb_to_l
    from fastcolor.colorize import colorize_image, colorize_tensor, predict_ab

    torch.manual_seed(0)
    img = skimage.data.coffee()[::4, ::4]  # (100, 150, 3): not the model's size, not square
    L = rgb_to_l(torch.from_numpy(img.copy()).permute(2, 0, 1))
    for model in (ZhangNet.tiny(), FusionNet.tiny()):
        rgb = colorize_tensor(model, L)
        assert rgb.shape == (3, 100, 150) and 0 <= rgb.min() and rgb.max() <= 1
        # the output's lightness is the input's (the model only supplies ab); out-of-gamut
        # colours clipped to [0, 1] shift L a little at a few pixels
        diff = (rgb_to_l(rgb) - L).abs()
        assert diff.median() < 0.05 and (diff > 1.5).float().mean() < 0.05
        out = colorize_image(model, img)
        assert out.shape == (100, 150, 3) and out.dtype == np.uint8
    m = ZhangNet.tiny().eval()
    with torch.no_grad():
        ab = predict_ab(m, torch.full((1, 1, 32, 32), 50.0), T=1e-3)
    assert ab.shape == (1, 2, 8, 8)
    with pytest.raises(TypeError, match="model"):
        colorize_tensor(torch.nn.Conv2d(1, 1, 1), L)
    with pytest.raises(ValueError, match="L_full"):
        colorize_tensor(m, torch.zeros(3, 8, 8))
