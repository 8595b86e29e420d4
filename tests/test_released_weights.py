"""The authors' released ECCV16 PyTorch weights (``colorization_release_v2-9b330a0b.pth``) load
into ZhangNet and colorize exactly as the authors' own forward does (issue 15, point 5).

The real file is not available here (nothing is downloaded), so :class:`AuthorsECCV16` below is
the authors' network written in this file from the published facts (issue 15: the blocks, their
layer indices, dilation 2 in model5/6, the ConvTranspose in model8, model_out = 1x1 conv 313 -> 2
without bias holding the bin centres / 110; forward: (L - 50) / 100, softmax, model_out,
bilinear x4, x 110). It shares no code with fastcolor.models. Its random weights (BatchNorm
running statistics included) are saved with ``torch.save(state_dict)``, as the authors' file is.
"""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

import fastcolor
import fastcolor.colorize as fc_colorize
from fastcolor.app import colorize_files as fc_files
from fastcolor.app.cli import main
from fastcolor.color import l_ab_to_rgb
from fastcolor.colorize import colorize_image, predict_ab, to_l_tensor
from fastcolor.gamut import AB_BINS
from fastcolor.models import ZhangNet
from fastcolor.models.serialization import load_model, save_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_train import one_thread  # noqa: E402,F401  (autouse: one intra-op thread)

SIZE = 64  # the network sees 64 x 64 (the full 32M-parameter net, a fraction of a second on a CPU)


# ----------------------------------------------------------------------------- the authors' network


def _convs(*specs, bn: int) -> torch.nn.Sequential:
    """3x3 convs with bias, ReLU after each, then BatchNorm: specs are (c_in, c_out, stride, dilation)."""
    layers: list[torch.nn.Module] = []
    for c_in, c_out, stride, dil in specs:
        layers += [torch.nn.Conv2d(c_in, c_out, 3, stride=stride, padding=dil, dilation=dil), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers, torch.nn.BatchNorm2d(bn))


class AuthorsECCV16(torch.nn.Module):
    """The authors' ECCV16 key layout and forward, from the facts of issue 15."""

    def __init__(self):
        super().__init__()
        self.model1 = _convs((1, 64, 1, 1), (64, 64, 2, 1), bn=64)
        self.model2 = _convs((64, 128, 1, 1), (128, 128, 2, 1), bn=128)
        self.model3 = _convs((128, 256, 1, 1), (256, 256, 1, 1), (256, 256, 2, 1), bn=256)
        self.model4 = _convs((256, 512, 1, 1), (512, 512, 1, 1), (512, 512, 1, 1), bn=512)
        self.model5 = _convs(*[(512, 512, 1, 2)] * 3, bn=512)
        self.model6 = _convs(*[(512, 512, 1, 2)] * 3, bn=512)
        self.model7 = _convs(*[(512, 512, 1, 1)] * 3, bn=512)
        self.model8 = torch.nn.Sequential(
            torch.nn.ConvTranspose2d(512, 256, 4, stride=2, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(256, 256, 3, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(256, 256, 3, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(256, 313, 1))
        self.model_out = torch.nn.Conv2d(313, 2, 1, bias=False)

    def logits(self, L: torch.Tensor) -> torch.Tensor:
        x = (L - 50.0) / 100.0
        for i in range(1, 9):
            x = getattr(self, f"model{i}")(x)
        return x

    def forward(self, L: torch.Tensor) -> torch.Tensor:
        ab = self.model_out(torch.softmax(self.logits(L), dim=1))
        return F.interpolate(ab, scale_factor=4, mode="bilinear", align_corners=False) * 110.0


def _photo() -> np.ndarray:
    import skimage.data

    return np.array(Image.fromarray(skimage.data.astronaut()).resize((SIZE, SIZE), Image.BICUBIC))


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    return _photo()


@pytest.fixture(scope="module")
def authors(photo) -> AuthorsECCV16:
    """The network with random weights and BatchNorm statistics, model_out = bins / 110, in eval mode."""
    torch.manual_seed(15)
    net = AuthorsECCV16().eval()
    with torch.no_grad():
        x = (to_l_tensor(photo)[None] - 50.0) / 100.0
        for i in range(1, 8):  # random BatchNorm parameters and statistics, near the photo's own
            block = getattr(net, f"model{i}")
            bn = block[-1]
            h = block[:-1](x)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0.0, 0.2)
            bn.running_mean.copy_(h.mean((0, 2, 3)) * torch.empty(bn.num_features).uniform_(0.5, 1.5))
            bn.running_var.copy_(h.var((0, 2, 3)) * torch.empty(bn.num_features).uniform_(0.5, 2.0) + 1e-6)
            bn.num_batches_tracked.fill_(12345)
            x = bn(h)
        net.model_out.weight.copy_(torch.as_tensor(AB_BINS.T / 110.0, dtype=torch.float32)[..., None, None])
        # scale the last conv so that the softmax is neither flat nor one-hot on the test photo:
        # then every bin's centre matters, and so does T
        z = net.logits(to_l_tensor(photo)[None])
        s = 3.0 / float(z.std())
        net.model8[6].weight.mul_(s)
        net.model8[6].bias.mul_(s)
    return net


@pytest.fixture(scope="module")
def reference(authors, photo):
    """(L (1, 1, H, W), the authors' forward ab (1, 2, H, W), its logits) on the test photo."""
    L = to_l_tensor(photo)[None]
    with torch.no_grad():
        return L, authors(L), authors.logits(L)


def _permuted_state(net: AuthorsECCV16, perm: torch.Tensor) -> dict[str, torch.Tensor]:
    """The same function with its 313 classes in another order: class j of the result is class
    perm[j] of ``net`` (the rows of model8.6 and the columns of model_out move together)."""
    sd = {k: v.clone() for k, v in net.state_dict().items()}
    sd["model8.6.weight"] = sd["model8.6.weight"][perm]
    sd["model8.6.bias"] = sd["model8.6.bias"][perm]
    sd["model_out.weight"] = sd["model_out.weight"][:, perm]
    return sd


@pytest.fixture(scope="module")
def released_file(authors, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("released") / "colorization_release_v2-9b330a0b.pth"
    torch.save(authors.state_dict(), path)
    return path


def _ab_of(model, L) -> torch.Tensor:
    """fastcolor's ab for L at the network's input size, upsampled to L's size as colorize does."""
    with torch.no_grad():
        ab = predict_ab(model, L)
    return F.interpolate(ab, size=L.shape[-2:], mode="bilinear", align_corners=False)


def _rgb_u8(L: torch.Tensor, ab: torch.Tensor) -> np.ndarray:
    rgb = l_ab_to_rgb(L[0], ab[0]).permute(1, 2, 0).numpy()
    return (rgb * 255.0 + 0.5).astype(np.uint8)


def _assert_same_image(got: np.ndarray, want: np.ndarray) -> None:
    """8-bit images from ab that agree to 1e-4: equal but where a value sits on a rounding edge."""
    diff = np.abs(got.astype(int) - want.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (diff.max(), (diff > 0).mean())


# ----------------------------------------------------------------------------- the round trip


def test_the_reference_is_not_trivial(reference):
    _, ab, logits = reference
    assert ab.shape == (1, 2, SIZE, SIZE)
    assert float(ab.std()) > 3.0  # colours vary over the image: a wrong bin or class order shows
    p = torch.softmax(logits, 1)
    assert 0.02 < float(p.max(1).values.mean()) < 0.9  # neither flat nor one-hot


@pytest.fixture(scope="module")
def loaded(released_file) -> ZhangNet:
    return fastcolor.load_model(released_file)


def test_load_model_reproduces_the_authors_forward(loaded, reference, photo, monkeypatch):
    L, ab_ref, _ = reference
    model = loaded
    assert isinstance(model, ZhangNet) and not model.training
    assert model.config["decode_temperature"] == 1.0 and model.config["input_size"] == 256
    torch.testing.assert_close(_ab_of(model, L), ab_ref, atol=1e-4, rtol=0)

    # colorize_image: the ab it computes (recorded on its way) and the 8-bit result it returns
    seen = []
    real = fc_colorize.predict_ab
    monkeypatch.setattr(fc_colorize, "predict_ab", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    rgb = colorize_image(model, photo, size=SIZE)
    assert len(seen) == 1 and seen[0].shape == (1, 2, SIZE // 4, SIZE // 4)
    up = F.interpolate(seen[0], size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    torch.testing.assert_close(up, ab_ref, atol=1e-4, rtol=0)
    _assert_same_image(rgb, _rgb_u8(L, ab_ref))

    # the temperature still overrides (the paper's 0.38 gives other, bolder colours)
    with torch.no_grad():
        bold = F.interpolate(predict_ab(model, L, T=0.38), size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    assert float((bold - ab_ref).abs().max()) > 5.0


def _state_for(authors, order: str) -> dict[str, torch.Tensor]:
    if order == "fastcolor":
        return authors.state_dict()
    return _permuted_state(authors, torch.randperm(313, generator=torch.Generator().manual_seed(3)))


@pytest.mark.parametrize("container, order", [("legacy", "shuffled"), ("safetensors", "fastcolor")])
def test_other_containers_and_bin_orders(container, order, authors, reference, tmp_path):
    """A file whose classes are in another order is reordered (the function is the same, so the
    ab is too); the legacy torch.save format and a safetensors copy of the keys also load, with or
    without num_batches_tracked."""
    L, ab_ref, _ = reference
    sd = _state_for(authors, order)
    if container == "legacy":
        path = tmp_path / "w.pth"
        torch.save(sd, path, _use_new_zipfile_serialization=False)
        assert path.read_bytes()[:1] == b"\x80"
    else:
        path = tmp_path / "w.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items() if not k.endswith("num_batches_tracked")}, str(path))
    model = load_model(path)
    torch.testing.assert_close(_ab_of(model, L), ab_ref, atol=1e-4, rtol=0)
    if order == "shuffled":  # taken in the file's order, the classes would give other colours
        naive = ZhangNet(decode_temperature=1.0).eval()
        naive.load_state_dict({**model.state_dict(),
                               "classifier.weight": sd["model8.6.weight"], "classifier.bias": sd["model8.6.bias"]})
        assert float((_ab_of(naive, L) - ab_ref).abs().max()) > 5.0
    if container == "safetensors":  # saved in fastcolor's own format, it keeps decoding at T = 1
        save_model(tmp_path / "m.safetensors", model)
        again = load_model(tmp_path / "m.safetensors")
        assert again.config["decode_temperature"] == 1.0
        torch.testing.assert_close(_ab_of(again, L), ab_ref, atol=1e-4, rtol=0)


def test_model_out_that_is_not_the_bins_warns(authors, reference, tmp_path):
    sd = {k: v.clone() for k, v in authors.state_dict().items()}
    sd["model_out.weight"] = sd["model_out.weight"] * 1.5  # bin centres / 110 * 1.5: not the bins
    torch.save(sd, tmp_path / "w.pth")
    with pytest.warns(UserWarning, match="model_out does not hold the 313 ab bin centres .* from the nearest bin"):
        model = load_model(tmp_path / "w.pth")
    torch.testing.assert_close(_ab_of(model, reference[0]), reference[1], atol=1e-4, rtol=0)  # fastcolor's bins
    sd["model_out.weight"] = authors.state_dict()["model_out.weight"][:, torch.arange(313) // 2 * 2]  # repeats
    torch.save(sd, tmp_path / "w.pth")
    with pytest.warns(UserWarning, match="model_out does not hold .* only 157 distinct bins"):
        load_model(tmp_path / "w.pth")


# ----------------------------------------------------------------------------- refusals


def _one_line_value_error(fn, *fragments) -> str:
    with pytest.raises(ValueError) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg, msg
    for f in fragments:
        assert f in msg, (f, msg)
    return msg


def test_other_layouts_are_one_line_errors(authors, tmp_path):
    torch.save({"conv.weight": torch.zeros(3, 3)}, tmp_path / "other.pth")
    _one_line_value_error(lambda: load_model(tmp_path / "other.pth"), "neither a fastcolor model",
                          "colorization_release_v2-9b330a0b.pth", "model1.*", "model_out.weight", "missing",
                          "1 unexpected (e.g. ['conv.weight'])")
    sd = dict(authors.state_dict())
    sd["model_out.weight"] = torch.zeros(2, 300, 1, 1)
    torch.save(sd, tmp_path / "shape.pth")
    _one_line_value_error(lambda: load_model(tmp_path / "shape.pth"), "shape mismatch", "model_out.weight",
                          "(2, 300, 1, 1)")
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    _one_line_value_error(lambda: load_model(tmp_path / "list.pth"), "expected a state dict")
    (tmp_path / "junk.bin").write_bytes(b"\x00" * 64)
    _one_line_value_error(lambda: load_model(tmp_path / "junk.bin"), "expected a fastcolor model or checkpoint",
                          "colorization_release_v2-9b330a0b.pth")


class _RunsCode:
    """A pickle payload: unpickling it runs code (it creates ``marker``)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


def test_a_pickle_with_code_is_refused_and_not_run(authors, tmp_path):
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.pth"
    torch.save({**authors.state_dict(), "extra": _RunsCode(marker)}, path)
    _one_line_value_error(lambda: load_model(path), "refused", "weights_only", "exec")
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the payload is real: loading without weights_only runs it
    assert marker.exists()


# ----------------------------------------------------------------------------- the command line


def _run(capsys, *argv):
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _assert_one_line_error(rc, err, *fragments):
    assert rc == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("fastcolor: warning")]
    assert len(lines) == 1 and lines[0].startswith("fastcolor: error: "), err
    for f in fragments:
        assert f in lines[0], (f, err)


def test_cli_colorizes_with_the_released_file(released_file, loaded, reference, photo, tmp_path, capsys,
                                              monkeypatch):
    L, ab_ref, _ = reference
    Image.fromarray(photo).save(tmp_path / "photo.png")
    seen = []
    real = fc_files.predict_ab
    monkeypatch.setattr(fc_files, "predict_ab", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    rc, out, err = _run(capsys, "colorize", tmp_path / "photo.png", "-o", tmp_path / "out.png",
                        "--weights", released_file, "--size", SIZE, "--device", "cpu")
    assert rc == 0, err
    assert "zhang model, size 64, T 1," in out
    up = F.interpolate(seen[0], size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    torch.testing.assert_close(up, ab_ref, atol=1e-4, rtol=0)
    with Image.open(tmp_path / "out.png") as im:
        _assert_same_image(np.asarray(im.convert("RGB")), _rgb_u8(L, ab_ref))

    rc, out, err = _run(capsys, "colorize", tmp_path / "photo.png", "-o", tmp_path / "bold.png",
                        "--weights", released_file, "--size", SIZE, "--device", "cpu", "-T", "0.38")
    assert rc == 0 and "T 0.38," in out, err
    with torch.no_grad():
        bold = predict_ab(loaded, L, T=0.38)
    # 1/T = 2.6 amplifies float32 rounding (the CLI runs on other threads): 1e-3 of ab ~ 100 here
    torch.testing.assert_close(seen[1], bold, atol=1e-3, rtol=0)
    assert float((seen[1] - seen[0]).abs().max()) > 5.0


def test_cli_refuses_other_torch_files_in_one_line(authors, tmp_path, capsys):
    Image.fromarray(_photo()).save(tmp_path / "photo.png")
    torch.save({"conv.weight": torch.zeros(3, 3)}, tmp_path / "other.pth")
    rc, _, err = _run(capsys, "colorize", tmp_path / "photo.png", "-o", tmp_path / "o", "--weights",
                      tmp_path / "other.pth")
    _assert_one_line_error(rc, err, "--weights", "colorization_release_v2-9b330a0b.pth", "missing")
    marker = tmp_path / "code_ran"
    torch.save({"model1.0.weight": torch.zeros(1), "x": _RunsCode(marker)}, tmp_path / "evil.pth")
    rc, _, err = _run(capsys, "colorize", tmp_path / "photo.png", "-o", tmp_path / "o", "--weights",
                      tmp_path / "evil.pth")
    _assert_one_line_error(rc, err, "--weights", "refused")
    assert not marker.exists() and not (tmp_path / "o").exists()


def test_loading_warnings_point_at_the_callers_line(authors, tmp_path):
    import fastcolor
    from fastcolor.models import serialization

    sd = {k: v.clone() for k, v in authors.state_dict().items()}
    sd["model_out.weight"] = sd["model_out.weight"] * 1.5
    torch.save(sd, tmp_path / "w.pth")
    for entry in (fastcolor.load_model, serialization.load_model):  # the wrapper adds a frame: still ours
        with pytest.warns(UserWarning, match="model_out does not hold") as record:
            entry(tmp_path / "w.pth")
        assert {w.filename for w in record} == {__file__}, entry
