"""Bounded validation and the file index kept in the run directory (issue 20.1, 20.2): a short run
validates no more batches than it trained, --val-images is a fixed subset, --val-every validates and
checkpoints by steps (a resumed run continues in the middle of an epoch), --val-data validates on a
folder of its own, and a resumed run does not list the data folder again."""
import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_reliability_runs import _cfg, _one_error_line, _photos, _run, _train_argv  # noqa: E402
from test_train import one_thread  # noqa: E402,F401  (autouse: one intra-op thread)

import fastcolor.train as ft  # noqa: E402
from fastcolor.data import ColorizationDataset, list_images, load_split  # noqa: E402
from fastcolor.io import load_checkpoint  # noqa: E402
from fastcolor.train import train  # noqa: E402


class _Loads:
    """The images every ColorizationDataset loads, in order."""

    def __init__(self, monkeypatch):
        self.paths: list[str] = []
        real = ColorizationDataset.load

        def load(ds, index):
            self.paths.append(ds.items[index].path)
            return real(ds, index)

        monkeypatch.setattr(ColorizationDataset, "load", load)


@pytest.fixture(scope="module")
def hundred(tmp_path_factory):
    return _photos(tmp_path_factory.mktemp("data"), 100)  # split 80/10/10


def test_a_3_step_run_validates_3_batches_not_the_whole_validation_set(hundred, tmp_path, monkeypatch):
    """Before: `--max-steps 3` decoded the whole validation split (2,000 images, 285 s, on 20k)."""
    loads = _Loads(monkeypatch)
    res = train(_cfg(hundred, tmp_path / "run", epochs=None, max_steps=3, batch_size=2, max_steps_per_epoch=None,
                     prior="imagenet"))
    val = set(load_split(tmp_path / "run" / "split.json")["val"])
    validated = [p for p in loads.paths if p in {it.path for it in val}]
    assert len(val) == 10 and len(validated) == 3 * 2 and res.history[-1]["val_images"] == 6
    assert len(loads.paths) == 3 * 2 + 3 * 2  # 3 steps of 2 images, 3 validation batches of 2: nothing else


def test_val_images_is_a_fixed_subset_the_same_every_time(hundred, tmp_path, monkeypatch):
    seen = []
    for run in ("a", "b"):
        loads = _Loads(monkeypatch)
        res = train(_cfg(hundred, tmp_path / run, epochs=1, batch_size=4, max_steps_per_epoch=None, val_images=4,
                         prior="imagenet"))
        val = {it.path for it in load_split(tmp_path / run / "split.json")["val"]}
        seen.append(sorted(p for p in loads.paths if p in val))
        assert res.history[-1]["val_images"] == 4
        monkeypatch.undo()
    assert len(seen[0]) == 4 and seen[0] == seen[1]
    with pytest.raises(ValueError, match="val_images must be a positive int or None, got 0"):
        _cfg(hundred, tmp_path / "c", val_images=0)


def test_val_every_validates_by_steps_and_a_resumed_run_continues_mid_epoch(hundred, tmp_path, monkeypatch):
    order = {}
    real = ft._Trainer.train_step

    def step(self, model, opt, batch, *a, **k):
        order.setdefault(self.run_dir.name, []).append(batch["index"].tolist())
        return real(self, model, opt, batch, *a, **k)

    monkeypatch.setattr(ft._Trainer, "train_step", step)
    kw = dict(epochs=None, batch_size=8, max_steps_per_epoch=None, val_every=4, prior="imagenet", val_images=8)
    whole = train(_cfg(hundred, tmp_path / "whole", max_steps=14, **kw))
    assert [h["step"] for h in whole.history] == [4, 8, 12, 14]  # an epoch is 10 steps: periods cross it
    train(_cfg(hundred, tmp_path / "cut", max_steps=8, **kw))
    assert load_checkpoint(tmp_path / "cut" / "last.safetensors")["meta"]["step"] == 8
    resumed = train(_cfg(hundred, tmp_path / "cut", max_steps=14, **kw))
    assert resumed.resumed_from_epoch == 1 and [h["step"] for h in resumed.history] == [4, 8, 12, 14]
    assert order["cut"] == order["whole"]  # the same batches in the same order: from batch 8 of epoch 0 on


def test_val_data_validates_on_its_folder_and_every_data_image_trains(tmp_path, capsys):
    data, val = _photos(tmp_path / "data", 12), _photos(tmp_path / "val", 5, start=50)
    res = train(_cfg(data, tmp_path / "run", val_data=str(val), max_steps_per_epoch=None, prior="imagenet"))
    split = load_split(tmp_path / "run" / "split.json")
    assert len(split["train"]) == 12 and [it.path for it in split["val"]] == [f"im{i}.png" for i in range(50, 55)]
    assert split["test"] == [] and res.history[-1]["val_images"] == 5
    source = json.loads((tmp_path / "run" / "split.json").read_text())["source"]
    assert source["val_data"] == os.path.abspath(val) and source["val_files"] == 5
    # another validation folder for the same run is a change the resume refuses, naming it
    other = _photos(tmp_path / "val2", 3, start=70)
    with pytest.raises(ValueError, match="val_data .*val -> .*val2"):
        train(_cfg(data, tmp_path / "run", val_data=str(other), epochs=2, prior="imagenet"))
    rc, _, err = _run(capsys, *_train_argv(data, tmp_path / "r2", "--val-data", tmp_path / "nope"))
    _one_error_line(rc, err, "--val-data", "no such folder")
    assert not (tmp_path / "r2" / "split.json").exists()


def test_a_resumed_run_does_not_list_the_data_folder_again(tmp_path, monkeypatch):
    data, run = _photos(tmp_path / "data", 12), tmp_path / "run"
    train(_cfg(data, run))
    import fastcolor.training.source as source

    listed, scanned = [], []
    real_list, real_scandir = source.list_folder, os.scandir
    monkeypatch.setattr(source, "list_folder", lambda *a, **k: listed.append(a) or real_list(*a, **k))
    monkeypatch.setattr(os, "scandir", lambda p=".": scanned.append(str(p)) or real_scandir(p))
    res = train(_cfg(data, run, epochs=2))
    assert res.resumed_from_epoch == 0 and res.epochs_completed == 2
    assert listed == [] and not [p for p in scanned if str(data) in p]
    # a file added changes the folder's time: then it is listed (once) and the change named
    _photos(data, 1, start=40)
    with pytest.raises(ValueError, match=r"1 image file\(s\) added \(im40.png\)"):
        train(_cfg(data, run, epochs=3))
    assert len(listed) == 1


def test_no_file_is_opened_before_step_1(tmp_path, monkeypatch):
    """The index is a listing: a file that cannot be decoded is found (and skipped, with one
    warning) when it is loaded, not by a pass over every file before training."""
    import fastcolor.data.folder as folder

    data = _photos(tmp_path / "data", 12)
    (data / "broken.png").write_bytes(b"not a png" * 10)
    verified = []
    monkeypatch.setattr(folder, "_verify", lambda p: verified.append(p))
    with pytest.warns(UserWarning, match=r"skipping unreadable image 'broken.png'"):
        train(_cfg(data, tmp_path / "run", max_steps_per_epoch=None, epochs=2, batch_size=13, prior="data"))
    assert verified == []
    assert "broken.png" in {it.path for k, v in load_split(tmp_path / "run" / "split.json").items() for it in v}


def test_images_beside_class_subfolders_are_one_more_class(tmp_path):
    """Before: DATA with top-level images and one subfolder trained on the subfolder alone, silently."""
    data = _photos(tmp_path / "data", 3)
    _photos(data / "beach", 4, start=10)
    with pytest.warns(UserWarning, match=r"3 image file\(s\) at its top level beside the class subfolders"):
        items = list_images(data)
    assert sorted({it.label for it in items}) == ["beach", "data"] and len(items) == 7
    assert {it.path for it in items if it.label == "data"} == {"im00.png", "im01.png", "im02.png"}


def test_val_data_with_shards_is_refused_before_anything_is_written(tmp_path):
    """Shards carry their own validation set: a --val-data beside them would be ignored, so it is refused."""
    from fastcolor.data import write_shards

    data, val = _photos(tmp_path / "data", 12), _photos(tmp_path / "val", 3, start=50)
    write_shards(data, tmp_path / "shards", 4, progress=False)
    with pytest.raises(ValueError, match=r"val_data \(--val-data\): tar shards carry their own validation set"):
        train(_cfg(tmp_path / "shards", tmp_path / "run", val_data=str(val)))
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".fastcolor.lock"]
