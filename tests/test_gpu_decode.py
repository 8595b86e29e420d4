"""GPU decode (issue 20.4): workers read bytes, the batch is decoded where the model is. The same
code runs here on CPU tensors (torchvision's batched ``decode_jpeg`` on the CPU), with a corrupt
file, a non-JPEG, a PNG, a turned, a grayscale and a CMYK JPEG in the batch, against the PIL path."""
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image
from torch.utils.data import DataLoader

from fastcolor.data import (
    ColorizationDataset,
    CropMirror,
    DeviceStage,
    ImageItem,
    UnreadableImageError,
    collate_bytes,
    decode_batch,
    load_square,
    read_bytes,
    resolve_decode,
)
from fastcolor.data.decode import is_jpeg

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_train import one_thread  # noqa: E402,F401  (autouse: one intra-op thread)

SIZE = 176


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """ImageNet-like JPEGs (500 x 375), a turned one (EXIF orientation 6), a grayscale and a CMYK
    JPEG, a PNG, a truncated JPEG and a text file named .jpg; the readable ones and the bad ones."""
    root = tmp_path_factory.mktemp("mixed")
    photo = lambda name: Image.fromarray(getattr(skimage.data, name)()).convert("RGB").resize((500, 375))  # noqa: E731
    photo("astronaut").save(root / "astronaut.jpg", quality=90)
    exif = Image.Exif()
    exif[0x0112] = 6
    photo("coffee").save(root / "turned.jpg", quality=90, exif=exif)
    photo("rocket").convert("L").save(root / "gray.jpg", quality=90)
    photo("chelsea").convert("CMYK").save(root / "cmyk.jpg", quality=90)
    photo("chelsea").save(root / "chelsea.png")
    whole = (root / "astronaut.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(whole[: len(whole) // 3])
    (root / "notes.jpg").write_text("not a jpeg at all " * 20)
    good = ["astronaut.jpg", "turned.jpg", "gray.jpg", "cmyk.jpg", "chelsea.png"]
    return root, good, ["truncated.jpg", "notes.jpg"]


def _batch(root, names):
    """The files' bytes as they are (read_bytes would refuse the text file named .jpg)."""
    return ([torch.frombuffer(bytearray((root / n).read_bytes()), dtype=torch.uint8) for n in names],
            [str(root / n) for n in names])


def test_a_mixed_batch_decodes_like_the_pil_path_and_drops_only_the_unreadable(mixed):
    """Measured on the CPU: torchvision's libjpeg-turbo and PIL's give the same pixels (difference
    0 for every file here; the stated tolerance is 2 levels, what nvjpeg's IDCT may add)."""
    root, good, bad = mixed
    names = [good[0], bad[0], good[1], good[2], bad[1], good[3], good[4]]
    data, paths = _batch(root, names)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        x, kept = decode_batch(data, paths, SIZE, "cpu")
    assert [names[i] for i in kept] == good
    assert x.dtype == torch.uint8 and x.shape == (len(good), 3, SIZE, SIZE)
    msgs = [str(m.message) for m in w if "skipping unreadable image" in str(m.message)]
    assert len(msgs) == 2 and "truncated.jpg" in msgs[0] and "notes.jpg" in msgs[1]
    for img, name in zip(x, good, strict=True):
        want = load_square(root / name, SIZE)
        assert (img.int() - want.int()).abs().max() <= 2, name
        assert img.float().std() > 10, name  # a picture, not a grey stand-in
    turned = x[good.index("turned.jpg")]
    assert not torch.equal(turned, load_square(root / "astronaut.jpg", SIZE))


def test_a_jpeg_the_batched_decoder_refuses_is_decoded_by_pil(mixed, monkeypatch):
    """nvjpeg refuses some JPEGs PIL reads (e.g. arithmetic coding): those fall back to PIL alone."""
    import torchvision.io

    root, good, _ = mixed
    data, paths = _batch(root, good[:3])
    real = torchvision.io.decode_jpeg

    def refuses_the_second(x, **kw):
        if any(t is data[1] for t in (x if isinstance(x, list) else [x])):
            raise RuntimeError("unsupported JPEG process")
        return real(x, **kw)

    monkeypatch.setattr(torchvision.io, "decode_jpeg", refuses_the_second)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        x, kept = decode_batch(data, paths, SIZE, "cpu")
    assert kept == [0, 1, 2] and not [m for m in w if "skipping" in str(m.message)]
    assert torch.equal(x[1], load_square(root / good[1], SIZE))


def test_each_unreadable_file_is_reported_once(mixed):
    root, good, bad = mixed
    data, paths = _batch(root, [good[0], bad[0]])
    reported: set[str] = set()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        decode_batch(data, paths, 32, "cpu", reported)
        decode_batch(data, paths, 32, "cpu", reported)
    assert sum("skipping unreadable image" in str(m.message) for m in w) == 1
    assert reported == {paths[1]}


def test_a_batch_of_unreadable_files_raises_naming_the_reason(mixed):
    root, _, bad = mixed
    data, paths = _batch(root, bad)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(UnreadableImageError, match="none of the 2 image"):
            decode_batch(data, paths, 32, "cpu")
    with pytest.raises(ValueError, match="same length"):
        decode_batch(data, paths[:1], 32, "cpu")


def test_bytes_dataset_and_device_stage_give_the_rgb_path_batch(mixed):
    """Workers read bytes only (output="bytes"); the device stage decodes, centre-crops and
    converts: the same L and ab as the uint8 worker path (output="rgb"). A file whose header is
    no image (notes.jpg) is replaced in the worker by the next readable one (the dataset's rule);
    one that only the decoders find broken (truncated.jpg) is dropped by the device stage."""
    root, good, bad = mixed
    items = [ImageItem(n, "x") for n in [*good, *bad]]
    crop = CropMirror(128, random_crop=False)
    raw = ColorizationDataset(root, items, SIZE, 4, output="bytes")
    sample = raw[0]
    assert sample["data"].dtype == torch.uint8 and sample["data"].dim() == 1 and is_jpeg(sample["data"])
    with pytest.warns(UserWarning, match="skipping unreadable image 'notes.jpg'"):
        batch = next(iter(DataLoader(raw, batch_size=len(items), collate_fn=collate_bytes)))
    assert isinstance(batch["data"], list) and batch["index"].tolist() == [*range(len(items) - 1), 0]
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        out = DeviceStage("cpu", 4, size=SIZE, crop_mirror=crop)(batch)
    assert out["index"].tolist() == [*range(len(good)), 0]
    assert ["truncated.jpg" in str(m.message) for m in w if "skipping" in str(m.message)] == [True]
    rgb = ColorizationDataset(root, items[: len(good)], SIZE, 4, crop, output="rgb")
    want = DeviceStage("cpu", 4)(next(iter(DataLoader(rgb, batch_size=len(good)))))
    torch.testing.assert_close(out["L"][: len(good)], want["L"], atol=1e-4, rtol=0)
    torch.testing.assert_close(out["ab"][: len(good)], want["ab"], atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="augment must be off"):
        ColorizationDataset(root, items, SIZE, 4, augment=True, output="bytes")
    with pytest.raises(ValueError, match="size"):
        DeviceStage("cpu", 4)(batch)


def test_resolve_decode(monkeypatch):
    import fastcolor.data.decode as dec

    problem: list[str | None] = [None]  # what nvjpeg_problem says on the (here pretended) CUDA device
    monkeypatch.setattr(dec, "nvjpeg_problem", lambda device: problem[0])
    jpgs, pngs = ["a.jpg", "b.JPEG", "c.png"], ["a.png", "b.png", "c.jpg"]
    assert resolve_decode("auto", "cpu", jpgs) == "cpu"
    assert resolve_decode("auto", "cuda", jpgs) == "gpu"
    assert resolve_decode("auto", "cuda", pngs) == "cpu"  # PIL in the workers beats PIL in the trainer
    assert resolve_decode("cpu", "cuda", jpgs) == "cpu"
    assert resolve_decode("gpu", "cuda:0", pngs) == "gpu"
    with pytest.raises(ValueError, match="decode: 'gpu' decodes JPEGs with nvjpeg on a CUDA device"):
        resolve_decode("gpu", "cpu", jpgs)
    with pytest.raises(ValueError, match="decode must be one of"):
        resolve_decode("nvjpeg", "cuda", jpgs)
    problem[0] = "RuntimeError: no nvjpeg in this build"
    with pytest.warns(UserWarning, match="decoded by PIL in the workers.*no nvjpeg in this build"):
        assert resolve_decode("auto", "cuda", jpgs) == "cpu"
    with pytest.raises(ValueError, match="decode: 'gpu' needs torchvision's nvjpeg decoder.*no nvjpeg"):
        resolve_decode("gpu", "cuda", jpgs)


def test_nvjpeg_problem_names_what_fails():
    from fastcolor.data.decode import nvjpeg_problem

    assert nvjpeg_problem("cpu") is None  # the probe itself works (torchvision's CPU decoder)
    if not torch.cuda.is_available():
        assert nvjpeg_problem("cuda") is not None  # no CUDA here: a reason, not a crash


def test_read_bytes_refuses_what_is_no_regular_file(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(UnreadableImageError, match="empty file"):
        read_bytes(tmp_path / "empty.jpg")
    with pytest.raises(UnreadableImageError, match="not a regular file"):
        read_bytes(tmp_path)
    (tmp_path / "x.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a JPEG after all")
    with pytest.raises(UnreadableImageError, match="x.jpg: not a readable image"):
        read_bytes(tmp_path / "x.jpg")
    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(tmp_path / "ok.jpg")
    assert read_bytes(tmp_path / "ok.jpg").tolist() == list((tmp_path / "ok.jpg").read_bytes())


def test_read_bytes_keeps_the_pixel_limit(tmp_path, monkeypatch):
    """nvjpeg would decode a decompression bomb; read_bytes refuses it from its header, as PIL does."""
    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(tmp_path / "big.jpg")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(UnreadableImageError, match="40x30 = 1200 pixels is over the limit of 1000"):
        read_bytes(tmp_path / "big.jpg")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (nvjpeg); the same code runs above on CPU")
def test_nvjpeg_batch_matches_the_pil_path(mixed):
    root, good, bad = mixed
    data, paths = _batch(root, [*good, *bad])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        x, kept = decode_batch(data, paths, SIZE, "cuda")
    assert x.is_cuda and kept == list(range(len(good)))
    for img, name in zip(x.cpu(), good, strict=True):
        assert (img.int() - load_square(root / name, SIZE).int()).abs().float().mean() <= 2, name


def test_eval_reads_a_folder_through_the_same_decode(mixed, tmp_path):
    """fastcolor eval on a folder: decode "cpu" (PIL) drops nothing readable, skips the bad files
    with a warning; decode "gpu" needs a CUDA device and says so."""
    import shutil

    from fastcolor.metrics import evaluate
    from fastcolor.models import build_model
    from fastcolor.models.serialization import save_model

    root, good, bad = mixed
    data = tmp_path / "data"
    data.mkdir()
    for name in [*good, *bad]:
        shutil.copy(root / name, data / name)
    torch.manual_seed(0)
    model = save_model(tmp_path / "m.safetensors", build_model("zhang_tiny"))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        report = evaluate(model, data, out_dir=tmp_path / "eval", grid_images=0, device="cpu", decode="cpu")
    # notes.jpg fails the listing's header check; truncated.jpg passes it and is skipped at load
    # (replaced by the next readable image, the dataset's rule), with a warning naming it
    assert [r["images"] for r in report["rows"] if r["class"] == "(all)"] == [len(good) + 1]
    assert any("truncated.jpg" in str(m.message) for m in w)
    with warnings.catch_warnings(), pytest.raises(ValueError, match="decode: 'gpu'"):
        warnings.simplefilter("ignore")
        evaluate(model, data, out_dir=tmp_path / "eval2", grid_images=0, device="cpu", decode="gpu")


def test_colorize_decodes_jpegs_on_the_device_as_pil_does(mixed, tmp_path):
    """fastcolor colorize --decode gpu: a JPEG's full-size L made from the device's decode equals
    PIL's (torchvision's and PIL's libjpeg-turbo agree here), so the files written are the same;
    other files are read by PIL either way."""
    from fastcolor.app.cli import main
    from fastcolor.app.colorize_files import Job, _read_image, colorize_files
    from fastcolor.models import build_model
    from fastcolor.models.serialization import save_model

    root, good, _ = mixed
    for name in good:
        on_device, pil = _read_image(root / name, "cpu"), _read_image(root / name)
        torch.testing.assert_close(on_device[0], pil[0], atol=1e-4, rtol=0)
        torch.testing.assert_close(on_device[1], pil[1], atol=1e-4, rtol=0)
        assert on_device[2] is None and pil[2] is None
    torch.manual_seed(0)
    model = build_model("zhang_tiny").eval()
    for out, dev in (("pil", None), ("device", "cpu")):
        (tmp_path / out).mkdir()
        jobs = [Job(root / n, tmp_path / out / n, n) for n in ("astronaut.jpg", "turned.jpg", "chelsea.png")]
        assert len(colorize_files(model, jobs, 32, progress=False, decode_device=dev)) == 3
    for n in ("astronaut.jpg", "turned.jpg", "chelsea.png"):
        assert (tmp_path / "pil" / n).read_bytes() == (tmp_path / "device" / n).read_bytes(), n
    weights = save_model(tmp_path / "m.safetensors", model)
    args = ["colorize", str(root / "astronaut.jpg"), "-o", str(tmp_path / "cli"), "--weights", str(weights),
            "--device", "cpu", "-q"]
    assert main([*args, "--decode", "gpu"]) == 2  # one line: nvjpeg needs a CUDA device
    assert main([*args, "--decode", "auto"]) == 0 and (tmp_path / "cli").is_dir()
