"""Reliability, third pass (issue 23): weights files told apart by what they hold, files that are
not regular files, colorize_image's input ranges and non-finite pixels, broken weights refused at
load, zip bombs, long output names, class weights past float32. Each test failed before its fix."""
import copy
import io
import json
import os
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save

from fastcolor.colorize import colorize_image, colorize_tensor, to_l_tensor
from fastcolor.io import load_state_file, weights_format
from fastcolor.metrics import evaluate
from fastcolor.models import build_model, model_state
from fastcolor.models.released import looks_like_torch_file
from fastcolor.models.serialization import load_model, save_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_train import one_thread  # noqa: E402,F401  (autouse: one intra-op thread)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_model("zhang_tiny").eval()


# ----------------------------------------------------------------------------- 23.2: formats


def _model_meta(net) -> dict[str, str]:
    return {"format": json.dumps("fastcolor-model-1"), "model_config": json.dumps(net.config)}


def _with_low_byte(tensors: dict, meta: dict[str, str], byte: int) -> bytes:
    """A safetensors file of ``tensors`` and ``meta`` whose 8-byte header length starts with ``byte``
    (an extra metadata entry pads the header; safetensors pads it to a multiple of 8 itself)."""
    for pad in range(0, 2048):
        raw = save(tensors, metadata={**meta, "pad": json.dumps("x" * pad)})
        if raw[0] == byte:
            return raw
    raise AssertionError(f"no padding gives a header length whose low byte is {byte:#x}")


@pytest.mark.parametrize("byte", [0x80, ord("(")])  # the pickle openers that are multiples of 8
def test_safetensors_whose_header_length_starts_like_a_pickle_loads(tiny, tmp_path, byte):
    """About 1 in 32 header lengths (a multiple of 8) ends in 0x80, a pickle's first byte: such a
    model file, checkpoint or state file was refused as a pickle (before)."""
    raw = _with_low_byte(model_state(tiny), _model_meta(tiny), byte)
    path = tmp_path / "model.safetensors"
    path.write_bytes(raw)
    assert weights_format(path) == "safetensors" and not looks_like_torch_file(path)
    net = load_model(path)
    assert torch.equal(net.classifier.weight, tiny.classifier.weight)
    assert load_model(tmp_path).config == tiny.config  # a run directory
    pth = tmp_path / "state.pth"  # any name: judged by what it holds
    pth.write_bytes(raw)
    assert torch.equal(load_state_file(pth)["classifier.weight"], tiny.classifier.weight)
    ckpt = {f"model.{k}": v for k, v in model_state(tiny).items()}
    meta = {"format": json.dumps("fastcolor-checkpoint-1"), "model_config": json.dumps(tiny.config),
            "meta": json.dumps({"epoch": 3})}
    (tmp_path / "last.safetensors").write_bytes(_with_low_byte(ckpt, meta, byte))
    assert load_model(tmp_path / "last.safetensors").config == tiny.config


def test_torch_files_are_still_told_apart(tiny, tmp_path):
    torch.save(model_state(tiny), tmp_path / "zip.pth")
    torch.save(model_state(tiny), tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    (tmp_path / "model.safetensors").write_bytes(save(model_state(tiny), metadata=_model_meta(tiny)))
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "model.safetensors").read_bytes()[:100])
    kinds = {p.name: weights_format(p) for p in sorted(tmp_path.iterdir())}
    assert kinds == {"cut.safetensors": "safetensors", "legacy.pth": "pickle", "model.safetensors": "safetensors",
                     "zip.pth": "zip"}
    with pytest.raises(ValueError, match="truncated"):
        load_model(tmp_path / "cut.safetensors")


# ----------------------------------------------------------------------------- 23.3: not regular files


def _not_regular(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    fifo = tmp_path / "fifo.safetensors"
    os.mkfifo(fifo)
    run = tmp_path / "run"
    run.mkdir()
    os.mkfifo(run / "model.safetensors")
    loop = tmp_path / "loop.safetensors"
    loop.symlink_to(loop.name)
    dangling = tmp_path / "dangling.pth"
    dangling.symlink_to("nowhere.pth")
    return {"fifo": (fifo, "FIFO"), "run": (run, "FIFO"), "zero": (Path("/dev/zero"), "character device"),
            "null": (Path("/dev/null"), "character device"), "loop": (loop, "symbolic links"),
            "dangling": (dangling, "symbolic link to 'nowhere.pth', which does not exist")}


@pytest.mark.timeout(30)
def test_load_model_refuses_fifos_devices_and_link_loops_without_reading(tmp_path):
    """Before: a FIFO (or a run dir whose model.safetensors is one) hung forever; /dev/zero, /dev/null
    and a loop of links were 'no such safetensors file'."""
    for _name, (path, words) in _not_regular(tmp_path).items():
        with pytest.raises(ValueError, match=words) as e:
            load_model(path)
        assert str(path.name) in str(e.value) and "no such" not in str(e.value)
        with pytest.raises(ValueError, match="a directory" if path.is_dir() else words):
            load_state_file(path)
        with pytest.raises(ValueError, match=words):
            evaluate(path, tmp_path)


# ----------------------------------------------------------------------------- 23.4, 23.5: colorize_image input


def _gradient_u8(h=24, w=32) -> np.ndarray:
    rng = np.random.default_rng(3)
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def test_colorize_image_reads_each_dtype_on_its_own_scale(tiny):
    """Before: every non-uint8 array was read as [0, 1], so uint16, int64 and 0..255 floats came out
    near white."""
    u8 = _gradient_u8()
    want = colorize_image(tiny, u8)
    u16 = u8.astype(np.uint16) * 257  # the same image in 16 bits
    for same in (u16, u8.astype(np.int64), u8.astype(np.int32), u8 / 255.0, (u8 / 255.0).astype(np.float32),
                 Image.fromarray(u16[..., 0]).convert("I;16")):
        got = to_l_tensor(same)
        ref = to_l_tensor(u8 if not isinstance(same, Image.Image) else u8[..., 0])
        assert torch.allclose(got.float(), ref, atol=1e-3), type(same)
    np.testing.assert_allclose(colorize_image(tiny, u16).astype(int), want.astype(int), atol=1)
    np.testing.assert_array_equal(colorize_image(tiny, u8.astype(np.int64)), want)
    i16 = Image.fromarray(u16[..., 0]).convert("I;16")
    assert i16.mode == "I;16"
    np.testing.assert_allclose(colorize_image(tiny, i16).astype(int), colorize_image(tiny, u8[..., 0]).astype(int),
                               atol=1)


@pytest.mark.parametrize(("image", "words"), [
    (np.full((8, 8, 3), 200.0), r"float64 values are read in \[0, 1\], got values in 200..200; divide 8-bit"),
    (np.full((8, 8), 4000, dtype=np.int64), "int64 values are read as 8-bit values 0..255, got values in 4000..4000"),
    (np.full((8, 8), -1, dtype=np.int16), "got values in -1..-1"),
    (np.zeros((0, 0), dtype=np.uint8), r"expected at least one pixel, got shape \(0, 0, 1\)"),
    (np.zeros((5, 0, 3), dtype=np.float32), "at least one pixel"),
], ids=["float-0..255", "int64-16bit", "negative", "0x0", "5x0"])
def test_colorize_image_refuses_what_it_cannot_tell(tiny, image, words):
    with pytest.raises(ValueError, match=words):
        colorize_image(tiny, image)


def test_colorize_image_keeps_floats_a_step_past_the_range(tiny):
    x = np.linspace(0, 1, 64 * 3).reshape(8, 8, 3)
    over = x.copy()
    over[0, 0] = [1 + 0.5 / 255, 1, 1]
    over[0, 1] = [-0.5 / 255, 0, 0]
    clipped = np.clip(over, 0, 1)
    np.testing.assert_array_equal(colorize_image(tiny, over), colorize_image(tiny, clipped))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_one_non_finite_pixel_is_named_not_a_black_image(tiny, bad):
    """Before: one NaN/Inf pixel spread through the network and the whole output came back black."""
    x = _gradient_u8() / 255.0
    x[5, 7, 1] = bad
    with pytest.raises(ValueError, match="1 of 2304 values are NaN or Inf"):
        colorize_image(tiny, x)
    L = to_l_tensor(_gradient_u8())
    L[0, 3, 3] = bad
    with pytest.raises(ValueError, match="input L holds NaN/Inf"):
        colorize_tensor(tiny, L)


def test_a_pil_image_is_read_as_its_file_is(tiny, tmp_path):
    """Before: a PIL image object skipped the EXIF rotation and the alpha compositing of the path route."""
    u8 = _gradient_u8(12, 20)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to show
    buf = io.BytesIO()
    Image.fromarray(u8).save(buf, format="JPEG", exif=exif.tobytes(), quality=95)
    (tmp_path / "rotated.jpg").write_bytes(buf.getvalue())
    from_file = colorize_image(tiny, tmp_path / "rotated.jpg")
    assert from_file.shape == (20, 12, 3)
    np.testing.assert_array_equal(colorize_image(tiny, Image.open(io.BytesIO(buf.getvalue()))), from_file)
    rgba = np.zeros((12, 20, 4), dtype=np.uint8)  # transparent black: white once composited over white
    rgba[:, :10, 3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    L = to_l_tensor(Image.fromarray(rgba, "RGBA"))
    assert torch.equal(L, to_l_tensor(tmp_path / "alpha.png"))
    assert L[0, :, 10:].min() > 99.9 and L[0, :, :10].max() < 0.1


# ----------------------------------------------------------------------------- 23.6: broken weights


def _broken(net, how: str):
    net = copy.deepcopy(net)
    with torch.no_grad():
        if how == "nan":
            net.classifier.weight[3, 2, 0, 0] = float("nan")
        elif how == "inf":
            net.encoder[1][0].bias[0] = float("-inf")
        elif how == "x1e30":
            for p in net.parameters():
                p.mul_(1e30)
        elif how == "negative-var":
            net.encoder[0][4].running_var[2] = -0.5
        elif how == "x1e9":  # under the load bound, yet the forward pass overflows
            for p in net.parameters():
                p.mul_(1e9)
    return net


@pytest.mark.parametrize(("how", "words"), [
    ("nan", r"classifier.weight has 1 NaN/Inf value\(s\) of"),
    ("inf", r"encoder.1.0.bias has 1 NaN/Inf value\(s\) of 16"),
    ("x1e30", r"classifier.bias has values up to .*e\+29 in magnitude, past 1e\+10; .*\(and 29 more tensors\)"),
    ("negative-var", r"encoder.0.4.running_var has 1 negative variance\(s\) of 8"),
])
def test_broken_weights_are_refused_at_load_naming_the_tensor(tiny, tmp_path, how, words):
    """Before: they loaded silently and colorize_image returned black."""
    path = save_model(tmp_path / "model.safetensors", _broken(tiny, how))
    with pytest.raises(ValueError, match=f"{tmp_path}/model.safetensors holds broken weights: {words}"):
        load_model(path)
    with pytest.raises(ValueError, match="holds broken weights"):
        load_model(tmp_path)  # the run directory


def test_broken_weights_in_a_torch_file_are_refused_too(tmp_path):
    torch.save({"model1.0.weight": torch.full((64, 1, 3, 3), float("nan"))}, tmp_path / "eccv16.pth")
    with pytest.raises(ValueError, match=r"holds broken weights: model1.0.weight has 576 NaN/Inf"):
        load_model(tmp_path / "eccv16.pth")


def test_a_model_that_overflows_is_named_not_a_black_image(tiny):
    with pytest.raises(ValueError, match="predicted ab values are NaN/Inf .its weights are broken"):
        colorize_image(_broken(tiny, "x1e9"), _gradient_u8())


def test_export_of_nan_weights_fails_and_writes_nothing(tiny, tmp_path, capsys):
    """Before: 'fastcolor export' wrote a NaN ONNX model and exited 0."""
    from fastcolor.app.cli import main

    path = save_model(tmp_path / "model.safetensors", _broken(tiny, "nan"))
    assert main(["export", str(path), "-o", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err
    assert "classifier.weight has 1 NaN/Inf" in err and err.count("\n") == 1, err
    assert not (tmp_path / "m.onnx").exists()


def test_eval_of_a_model_that_overflows_names_it(tiny, tmp_path):
    """Before: eval ended in a torch.bincount error."""
    data = tmp_path / "photos"
    data.mkdir()
    for i in range(2):
        Image.fromarray(_gradient_u8(32, 32)[:, ::-1 if i else 1]).save(data / f"p{i}.png")
    path = save_model(tmp_path / "run" / "model.safetensors", _broken(tiny, "x1e9"))
    with pytest.raises(ValueError, match="model.safetensors: the model predicts NaN/Inf colours for finite inputs"):
        evaluate(path, data, out_dir=tmp_path / "eval")


# ----------------------------------------------------------------------------- 23.14: zip bombs


def _rezip(src: Path, dst: Path, compression=zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(src) as z, zipfile.ZipFile(dst, "w", compression) as out:
        for info in z.infolist():
            out.writestr(info.filename, z.read(info.filename))
    return dst


@pytest.mark.timeout(60)
def test_a_zip_bomb_torch_file_is_refused_from_its_directory(tmp_path):
    """Before: torch.load decompressed it (a 4 MB file: 4.8 GB and 17 s) before anything refused it."""
    torch.save({"model1.0.weight": torch.zeros(25_000_000)}, tmp_path / "plain.pth")  # 100 MB stored
    bomb = _rezip(tmp_path / "plain.pth", tmp_path / "bomb.pth")
    (tmp_path / "plain.pth").unlink()
    assert bomb.stat().st_size < 200_000
    for load in (load_state_file, load_model):
        with pytest.raises(ValueError, match=r"zip entries declare 95.4 MiB from a .* file .*more than 10x its size"):
            load(bomb)
    torch.manual_seed(0)  # real weights hardly compress: a recompressed file still loads
    state = {"w": torch.randn(1000, 100)}
    torch.save(state, tmp_path / "w.pth")
    assert torch.equal(load_state_file(_rezip(tmp_path / "w.pth", tmp_path / "w_deflated.pth"))["w"], state["w"])


def test_a_zip_that_is_not_a_torch_file_is_named(tmp_path):
    with zipfile.ZipFile(tmp_path / "photos.pth", "w") as z:
        z.writestr("a.txt", "hello")
        z.writestr("b/c.txt", "world")
    with pytest.raises(ValueError, match=r"is a zip archive but not a torch.save file .*2 entries"):
        load_state_file(tmp_path / "photos.pth")


# ----------------------------------------------------------------------------- 23.15, --skip-existing race


def test_file_names_up_to_name_max_are_written(tiny, tmp_path, capsys):
    """Before: the temporary names (".<name>.<pid>.part.<random>.tmp") passed NAME_MAX for names of
    230-255 bytes, so colorize could not write a legal name."""
    from fastcolor.app.cli import main
    from fastcolor.io import atomic_write_text

    for n in (230, 255):
        assert atomic_write_text(tmp_path / ("t" * (n - 4) + ".txt"), "ok").read_text() == "ok"
    weights = save_model(tmp_path / "model.safetensors", tiny)
    Image.fromarray(_gradient_u8()).save(tmp_path / "in.png")
    out = tmp_path / "out" / ("é" * 100 + "c" * 51 + ".png")  # 255 bytes in UTF-8
    assert len(os.fsencode(out.name)) == 255
    assert main(["colorize", str(tmp_path / "in.png"), "-o", str(out), "--weights", str(weights), "-q"]) == 0, \
        capsys.readouterr().err
    assert Image.open(out).size == (32, 24)
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]  # no temporary file left


@pytest.mark.parametrize("skip", [True, False])
def test_an_output_that_appears_meanwhile_is_skipped_with_skip_existing(tiny, tmp_path, capsys, monkeypatch, skip):
    """Before: --skip-existing said 'pass --overwrite' when another process wrote the output meanwhile."""
    from fastcolor.app import colorize_files as cf
    from fastcolor.app.cli import main

    weights = save_model(tmp_path / "model.safetensors", tiny)
    src = tmp_path / "in"
    src.mkdir()
    for name in ("a.png", "b.png"):
        Image.fromarray(_gradient_u8()).save(src / name)
    out = tmp_path / "out"
    encode = cf._encode

    def racing_encode(rgb_u8, alpha, dst):  # another process writes b.png just before we do
        if dst.name == "b.png":
            dst.write_bytes(b"theirs")
        return encode(rgb_u8, alpha, dst)

    monkeypatch.setattr(cf, "_encode", racing_encode)
    rc = main(["colorize", str(src), "-o", str(out), "--weights", str(weights), *(["--skip-existing"] if skip else [])])
    captured = capsys.readouterr()
    assert (out / "b.png").read_bytes() == b"theirs"  # never replaced
    if skip:
        assert rc == 0, captured.err
        assert "colorized 1 image(s)" in captured.out and "left 1 existing" in captured.out
        assert Image.open(out / "a.png").size == (32, 24)
    else:
        assert rc != 0
        assert "appeared while colorizing" in captured.err and "--skip-existing" in captured.err


# ----------------------------------------------------------------------------- 23.16: class weights past float32


@pytest.mark.parametrize("as_type", ["tensor", "numpy", "list"])
def test_class_weights_past_float32_are_refused(as_type):
    """Before: finite in float64, inf once cast to float32: the loss was inf, silently."""
    import fastcolor as fc
    from fastcolor.gamut import Q

    w = np.ones(Q)
    w[7] = 1e39
    weights = {"tensor": torch.from_numpy(w), "numpy": w, "list": w.tolist()}[as_type]
    torch.manual_seed(0)
    logits, ab = torch.randn(1, Q, 2, 2), torch.randn(1, 2, 2, 2) * 20
    with pytest.raises(ValueError, match=r"weights: expected values within float32's range \(at most 3.4e\+38\), "
                                         r"got 1 of 313 past it \(largest 1e\+39\)"):
        fc.rebalanced_cross_entropy(logits, ab, weights=weights, backend="torch")
    w[7] = 3e38  # within float32: accepted (no refusal)
    assert fc.rebalanced_cross_entropy(logits, ab, weights=torch.from_numpy(w), backend="torch").shape == ()


@pytest.mark.timeout(60)
def test_cli_names_fifos_devices_and_link_loops_given_as_weights(tmp_path, capsys):
    """Before: a loop of links was 'no such file or directory', /dev/zero and /dev/null 'not a fastcolor model'."""
    from fastcolor.app.cli import main

    Image.fromarray(_gradient_u8()).save(tmp_path / "in.png")
    for name, (path, words) in _not_regular(tmp_path).items():
        rc = main(["colorize", str(tmp_path / "in.png"), "-o", str(tmp_path / "out"), "--weights", str(path)])
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1 and words in err and "no such" not in err, (name, err)
        assert f"--weights {path}" in err, err
    assert not (tmp_path / "out").exists()


def test_eval_and_export_name_their_own_argument_for_a_link_loop(tmp_path, capsys):
    """Before: eval said 'no such run directory' for a loop of links."""
    from fastcolor.app.cli import main

    loop = tmp_path / "loop.safetensors"
    loop.symlink_to(loop.name)
    (tmp_path / "photos").mkdir()
    Image.fromarray(_gradient_u8()).save(tmp_path / "photos" / "a.png")
    for argv, arg in ((["eval", str(loop), str(tmp_path / "photos")], "RUN_DIR_or_WEIGHTS"),
                      (["eval", str(loop), str(loop), str(tmp_path / "photos")], "RUN_DIR_or_WEIGHTS"),
                      (["export", str(loop), "-o", str(tmp_path / "m.onnx")], "RUN_OR_WEIGHTS")):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"{arg} {loop}: cannot read {loop}: cannot be opened" in err and "symbolic links" in err, err
        assert "--weights" not in err and "no such" not in err, err
