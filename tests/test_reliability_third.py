"""Reliability, third pass (issue 23): weights files told apart by what they hold, files that are
not regular files, colorize_image's input ranges and non-finite pixels, broken weights refused at
load, zip bombs, long output names, class weights past float32. Each test failed before its fix."""
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save

from fastcolor.io import load_state_file, weights_format
from fastcolor.models import build_model, model_state
from fastcolor.models.released import looks_like_torch_file
from fastcolor.models.serialization import load_model

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
