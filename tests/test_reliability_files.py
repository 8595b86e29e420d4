"""Untrusted files: broken and oversized images (dataset and command line), damaged, foreign and
malicious weights files (every loader, the command line's --weights). Nothing from a user's
file is ever unpickled."""
import json
import pickle
import struct
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save, save_file

from fastcolor.app import cli
from fastcolor.colorize import to_l_tensor
from fastcolor.data import ColorizationDataset, UnreadableImageError, index_images, load_rgb
from fastcolor.io import load_checkpoint, load_state_file, load_tensors, read_checkpoint_meta, save_checkpoint
from fastcolor.models import FusionNet, build_model, model_state
from fastcolor.models.serialization import load_model, save_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_train import one_thread  # noqa: E402,F401  (autouse: one intra-op thread)

# ----------------------------------------------------------------------------- image files


def _png_header(w: int, h: int) -> bytes:
    """A PNG that announces w x h grey pixels in a few dozen bytes (a decompression bomb's header)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def _photo(path: Path, seed: int, size=(40, 32)):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


BAD_IMAGES = {  # name -> (bytes maker, words the report must contain)
    "zero.png": (lambda good: b"", "empty file"),
    "text.jpg": (lambda good: b"just some text, not a JPEG " * 20, "not a readable image"),
    "truncated.png": (lambda good: good["png"][: len(good["png"]) // 2], "truncated"),
    "truncated.jpg": (lambda good: good["jpg"][: len(good["jpg"]) // 2], "truncated"),
    "corrupt.png": (lambda good: good["png"][:120] + bytes(200) + good["png"][320:], "corrupt"),
    "bomb.png": (lambda good: _png_header(100_000, 100_000), "decompression bomb"),
    "big.png": (lambda good: _png_header(12_000, 10_000), "over the limit of"),  # 1x..2x PIL's limit
}


@pytest.fixture()
def image_folder(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    good = {"png": _photo(root / "good0.png", 0).read_bytes()}
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(
        root / "good1.jpg", quality=90)
    good["jpg"] = (root / "good1.jpg").read_bytes()
    _photo(root / "good2.png", 2)
    for name, (make, _) in BAD_IMAGES.items():
        (root / name).write_bytes(make(good))
    (root / "notes.txt").write_text("not an image, not an image name: ignored")
    return root


@pytest.mark.parametrize("name", sorted(BAD_IMAGES))
def test_load_rgb_refuses_bad_images_naming_file_and_reason(image_folder, name):
    with pytest.raises(UnreadableImageError, match="over the limit|decompression bomb" if "b" in name[:2]
                       else BAD_IMAGES[name][1]) as e:
        load_rgb(image_folder / name)
    assert str(image_folder / name) in str(e.value)
    assert isinstance(e.value, OSError)
    with pytest.raises(UnreadableImageError):  # what the command line and colorize_image use
        to_l_tensor(image_folder / name)


def test_dataset_reports_and_skips_every_bad_image(image_folder):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        items = index_images(image_folder)
    msgs = [str(x.message) for x in w if "unreadable" in str(x.message)]
    assert len(msgs) == 1, msgs
    # JPEG has no cheap integrity check (PIL's verify() is a no-op for it): a truncated JPEG
    # passes indexing and is skipped when it is loaded instead.
    for name in set(BAD_IMAGES) - {"truncated.jpg"}:
        assert name in msgs[0] and BAD_IMAGES[name][1] in msgs[0].split(name, 1)[1], (name, msgs[0])
    assert sorted(it.path for it in items) == ["good0.png", "good1.jpg", "good2.png", "truncated.jpg"]
    ds = ColorizationDataset(image_folder, items, size=16)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        batches = list(torch.utils.data.DataLoader(ds, batch_size=2, num_workers=0))
    skipped = [str(x.message) for x in w if "skipping unreadable image" in str(x.message)]
    assert len(skipped) == 1 and "truncated.jpg" in skipped[0] and "truncated" in skipped[0]
    assert sum(b["L"].shape[0] for b in batches) == len(ds)  # the slot is filled by the next good image
    assert all(torch.isfinite(b["ab"]).all() for b in batches)


def test_pixel_limit_follows_pil_setting(image_folder, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 40 * 32 - 1)  # good0.png is 40 x 32
    with pytest.raises(UnreadableImageError, match=r"40x32 = 1280 pixels is over the limit of 1279 pixels"):
        load_rgb(image_folder / "good0.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # PIL's way to switch the guard off
    assert load_rgb(image_folder / "good0.png").size == (40, 32)


@pytest.fixture(scope="module")
def zhang_file(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("w") / "zhang" / "model.safetensors"
    save_model(path, build_model("zhang_tiny"))
    return path


def _run(capsys, *argv):
    capsys.readouterr()
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_refuses_each_bad_image_alone_and_skips_it_among_good_ones(capsys, image_folder, zhang_file, tmp_path):
    for name in sorted(BAD_IMAGES):
        rc, out, err = _run(capsys, "colorize", image_folder / name, "-o", tmp_path / "single", "--weights",
                            zhang_file, "-q")
        errors = [ln for ln in err.splitlines() if ln.startswith("fastcolor: error:")]
        assert rc == 2 and len(errors) == 1 and "nothing was colorized" in errors[0], err
        assert name in err and "Traceback" not in err
    assert not (tmp_path / "single").exists() or not any((tmp_path / "single").iterdir())
    rc, out, err = _run(capsys, "colorize", image_folder, "-o", tmp_path / "all", "--weights", zhang_file)
    assert rc == 0, err
    assert sorted(p.name for p in (tmp_path / "all").iterdir()) == ["good0.png", "good1.jpg", "good2.png"]
    assert f"skipped {len(BAD_IMAGES)} unreadable" in out
    for name in BAD_IMAGES:
        assert name in err


# ----------------------------------------------------------------------------- weights files


@pytest.fixture(scope="module")
def weight_files(zhang_file, tmp_path_factory):
    """Damaged and foreign weights files, each with a substring its refusal must contain."""
    d = tmp_path_factory.mktemp("bad_weights")
    raw = zhang_file.read_bytes()
    tiny = build_model("zhang_tiny")
    small = build_model("zhang_small")
    cfg = json.dumps(tiny.config)
    files = {
        "truncated.safetensors": (raw[: len(raw) // 2], "truncated"),
        "header_only.safetensors": (raw[:6], "truncated"),
        "empty.safetensors": (b"", "empty"),
        # seeded: urandom bytes opening with a pickle opcode (0x80, "(", "}", "]") are a pickle
        "random.safetensors": (np.random.default_rng(7).bytes(4096), "not a valid safetensors file"),
        "foreign.safetensors": (save({"x": torch.zeros(3)}, metadata={"format": "pt"}), "not a fastcolor file"),
        "wrong_arch.safetensors": (save(model_state(small), metadata={"format": json.dumps("fastcolor-model-1"),
                                                                      "model_config": cfg}), "do not fit"),
        "bad_config.safetensors": (save(model_state(tiny), metadata={"format": json.dumps("fastcolor-model-1"),
                                                                     "model_config": json.dumps({**tiny.config,
                                                                                                 "layers": 9})}),
                                   "invalid model_config"),
        # A config asking for a ~1.7 TB network next to tiny tensors: refused from the shapes,
        # before anything is allocated.
        "huge_config.safetensors": (save(model_state(tiny), metadata={
            "format": json.dumps("fastcolor-model-1"),
            "model_config": json.dumps({**tiny.config, "base": 4096, "mid_width": 65536})}), "do not fit"),
    }
    for name, (data, _) in files.items():
        (d / name).write_bytes(data)
    return {d / name: words for name, (_, words) in files.items()}


def test_every_damaged_or_foreign_weights_file_is_refused_with_a_message(weight_files):
    for path, words in weight_files.items():
        with pytest.raises(ValueError, match=words) as e:
            load_model(path)
        assert str(path) in str(e.value)
        with pytest.raises(ValueError):
            load_checkpoint(path)
        if words in ("truncated", "empty", "not a valid safetensors file"):
            for loader in (load_state_file, load_tensors, read_checkpoint_meta):
                with pytest.raises(ValueError, match=words):
                    loader(path)


def test_checkpoint_with_foreign_tensors_or_bad_optimizer_is_refused(tmp_path):
    net = build_model("zhang_tiny")
    path = save_checkpoint(tmp_path / "ck.safetensors", model_state(net), net.config, epoch=1)
    assert load_checkpoint(path)["meta"]["epoch"] == 1
    meta = {"format": json.dumps("fastcolor-checkpoint-1"), "model_config": json.dumps(net.config)}
    (tmp_path / "a.safetensors").write_bytes(save({"evil": torch.zeros(1)}, metadata=meta))
    with pytest.raises(ValueError, match="unexpected tensor 'evil'"):
        load_checkpoint(tmp_path / "a.safetensors")
    (tmp_path / "b.safetensors").write_bytes(save({"optim.state.0.exp_avg": torch.zeros(1)},
                                                  metadata={**meta, "optimizer": json.dumps([1, 2])}))
    with pytest.raises(ValueError, match="optimizer state does not parse"):
        load_checkpoint(tmp_path / "b.safetensors")
    (tmp_path / "c.safetensors").write_bytes(save({"model.x": torch.zeros(1)},
                                                  metadata={**meta, "model_config": json.dumps("zhang")}))
    with pytest.raises(ValueError, match="expected JSON objects for model_config"):
        load_checkpoint(tmp_path / "c.safetensors")


def test_backbone_weights_of_another_network_are_refused(tmp_path):
    other = tmp_path / "resnet_head.safetensors"
    save_file({"fc.weight": torch.zeros(10, 5)}, other)
    with pytest.raises(ValueError, match=r"does not fit the mobilenet_v3_small backbone"):
        FusionNet(input_size=32, width=0.125, backbone="mobilenet_v3_small", backbone_weights=other, embed_size=32)


def test_cli_weights_refusals_are_one_line(capsys, weight_files, image_folder, tmp_path):
    for path in weight_files:
        rc, _, err = _run(capsys, "colorize", image_folder / "good0.png", "-o", tmp_path / "o.png", "--weights", path)
        lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("fastcolor: warning:")]
        assert rc == 2 and len(lines) == 1 and lines[0].startswith("fastcolor: error:"), (path.name, err)
        assert "Traceback" not in err and path.name in lines[0]
    assert not (tmp_path / "o.png").exists()


# ----------------------------------------------------------------------------- malicious pickles


class _Payload:
    """Unpickling this runs code: it creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


@pytest.fixture()
def evil_files(tmp_path):
    marker = tmp_path / "PWNED"
    payload = {"state_dict": {"weight": torch.zeros(2)}, "x": _Payload(marker)}
    plain = pickle.dumps(payload, protocol=2)
    pickle.loads(plain)  # the payload is live: plain unpickling does run it...
    assert marker.exists()
    marker.unlink()  # ...and from here on nothing may
    d = tmp_path / "evil"
    d.mkdir()
    files = []
    for name in ("weights.pt", "weights.pth", "model.safetensors", "last.safetensors", "weights.bin"):
        p = d / name
        torch.save(payload, p)  # torch's zip format, pickle inside
        files.append(p)
    for name in ("plain.pkl", "plain.safetensors"):
        (d / name).write_bytes(plain)
        files.append(d / name)
    run = d / "run"  # a run directory whose model.safetensors is a pickle
    run.mkdir()
    torch.save(payload, run / "model.safetensors")
    return marker, files, run


def test_malicious_pickle_is_never_executed_by_any_loader(evil_files, tmp_path, capsys):
    marker, files, run = evil_files
    loaders = {
        "load_model": load_model,
        "load_state_file": load_state_file,
        "load_checkpoint": load_checkpoint,
        "load_tensors": load_tensors,
        "read_checkpoint_meta": read_checkpoint_meta,
        "backbone weights": lambda p: FusionNet(input_size=32, width=0.125, backbone="mobilenet_v3_small",
                                                backbone_weights=p, embed_size=32),
    }
    for path in files:
        for name, loader in loaders.items():
            with pytest.raises(ValueError) as e:
                loader(path)
            msg = str(e.value)
            assert str(path) in msg, (name, msg)
            assert "pickle" in msg or "refused" in msg or "not a valid safetensors" in msg, (name, msg)
            assert not marker.exists(), f"{name} executed the pickle in {path.name}"
    with pytest.raises(ValueError, match="never unpickles"):
        load_model(run)
    for weights in [*files, run]:
        rc, _, err = _run(capsys, "colorize", tmp_path, "-o", tmp_path / "out", "--weights", weights)
        assert rc == 2 and "fastcolor: error: --weights" in err and "Traceback" not in err, err
    assert not marker.exists()


def test_resume_refuses_a_pickled_or_damaged_last_checkpoint(evil_files, tmp_path):
    from fastcolor.train import TrainConfig, train

    marker, files, _ = evil_files
    data = tmp_path / "data"
    data.mkdir()
    for i in range(4):
        _photo(data / f"{i}.png", i, size=(32, 32))
    run = tmp_path / "run"
    run.mkdir()
    last = run / "last.safetensors"
    for bad in (files[3].read_bytes(), b"", (files[3].read_bytes() * 2)[:100]):
        last.write_bytes(bad)
        cfg = TrainConfig(data_dir=str(data), run_dir=str(run), model="zhang_tiny", epochs=1, batch_size=2,
                          workers=0, progress=False, plot=False)
        with pytest.raises(ValueError, match=str(last)):
            train(cfg)
        assert last.read_bytes() == bad  # left as it was for the user to inspect, never overwritten
    assert not marker.exists()
