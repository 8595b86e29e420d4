"""Sharded datasets (issue 20.5): written and read back, split by rank and worker, damaged and missing shards."""
import errno
import json
import sys
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from fastcolor.data import ColorizationDataset, index_images, split_items
from fastcolor.data.shards import (
    SHARD_INDEX,
    ShardDataset,
    ShardError,
    is_shard_source,
    read_shard_index,
    resolve_shards,
    sample_shards,
    write_shards,
)
from fastcolor.io import DiskFullError

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_train import make_photo_folder, one_thread  # noqa: E402,F401  (autouse: one intra-op thread)

pytest.importorskip("webdataset")

PER_SHARD = 3


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """5 classes x 6 photos (PNG) and one JPEG per class: 35 images, 25 of them for training."""
    root = make_photo_folder(tmp_path_factory.mktemp("photos"), per_photo=6, size=32, classes=True)
    from PIL import Image

    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        Image.open(next(d.glob("*.png"))).convert("RGB").save(d / "extra.jpg", quality=90)
    return root


@pytest.fixture(scope="module")
def shards(photos, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards") / "out"
    write_shards(photos, out, PER_SHARD, seed=3, progress=False)
    return out


def _copy(shards: Path, to: Path) -> Path:
    """A copy of the shard folder, to damage."""
    to.mkdir()
    for p in shards.iterdir():
        (to / p.name).write_bytes(p.read_bytes())
    return to


def _indices(batches) -> list[int]:
    return [int(i) for b in batches for i in b["index"]]


def test_written_as_the_folder_split_with_the_files_own_bytes(photos, shards):
    index = read_shard_index(shards)
    items = index_images(photos)
    split = split_items(items, seed=3)
    assert index["classes"] == sorted({it.label for it in items}) and index["seed"] == 3
    assert index["suffixes"] == {"jpg": 5, "png": 30}
    names = sorted(p.name for p in shards.iterdir())
    assert SHARD_INDEX in names and not [n for n in names if n.endswith(".tmp")]
    for name in ("train", "val", "test"):
        entries = index["splits"][name]
        assert [e["name"] for e in entries] == [f"{name}-{i:06d}.tar" for i in range(len(entries))]
        assert [e["images"] for e in entries[:-1]] == [PER_SHARD] * (len(entries) - 1)
        stored = {}
        for e in entries:
            with tarfile.open(shards / e["name"]) as tar:
                members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
            got = [json.loads(v) for k, v in members.items() if k.endswith(".json")]
            assert len(got) == e["images"] and sum(e["classes"].values()) == e["images"]
            assert {c: sum(g["label"] == c for g in got) for c in e["classes"]} == e["classes"]
            for k, v in members.items():
                if k.endswith((".png", ".jpg")):
                    meta = json.loads(members[k.rsplit(".", 1)[0] + ".json"])
                    stored[meta["path"]] = v
                    assert members[k.rsplit(".", 1)[0] + ".cls"] == str(index["classes"].index(meta["label"])).encode()
        # the same split as a folder run with this seed, every file's bytes as they are on disk
        assert sorted(stored) == sorted(it.path for it in split[name])
        assert all(v == (photos / p).read_bytes() for p, v in stored.items())


def test_samples_equal_the_folder_datasets(photos, shards):
    """Each image decodes from its shard's bytes to exactly the folder dataset's sample."""
    index = read_shard_index(shards)
    sh, _ = resolve_shards(shards, "val")
    got = {}
    for b in DataLoader(ShardDataset(sh, 32, 4, shuffle=False), batch_size=4):
        for i, L, ab in zip(b["index"], b["L"], b["ab"], strict=True):
            got[int(i)] = (L, ab)
    paths = {}
    for e in index["splits"]["val"]:
        with tarfile.open(shards / e["name"]) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".json"):
                    paths[int(m.name.split("-")[1].split(".")[0])] = json.loads(tar.extractfile(m).read())["path"]
    assert sorted(got) == sorted(paths) == list(range(len(paths)))
    from fastcolor.data import ImageItem

    folder = ColorizationDataset(photos, [ImageItem(paths[i], "") for i in sorted(paths)], 32, 4)
    for i in sorted(paths):
        assert torch.equal(got[i][0], folder[i]["L"]) and torch.equal(got[i][1], folder[i]["ab"])


def test_every_image_once_per_epoch_across_two_ranks_and_two_workers(shards):
    sh, index = resolve_shards(shards)
    total = sum(e["images"] for e in index["splits"]["train"])
    orders = []
    for epoch in (0, 1):
        seen = []
        per_rank = []
        for rank in (0, 1):
            ds = ShardDataset(sh, 16, 4, rank=rank, world=2, seed=5, shuffle_buffer=4)
            ds.set_epoch(epoch)
            # each worker of each rank reads its own shards (round-robin of a permutation shared by the ranks)
            mine = [s.url for w in (0, 1) for s, _ in ds.assigned(rank, w, 2)]
            per_rank.append(set(mine))
            got = _indices(DataLoader(ds, batch_size=2, num_workers=2))
            assert len(got) == ds.rank_images() == len(ds)
            seen += got
        assert not per_rank[0] & per_rank[1] and per_rank[0] | per_rank[1] == {s.url for s in sh}
        assert sorted(seen) == list(range(total)), "lost or repeated images"
        orders.append(seen)
    assert orders[0] != orders[1], "the shard order and the buffer shuffle change with the epoch"


def test_repeat_gives_an_endless_stream_of_this_ranks_images(shards):
    sh, _ = resolve_shards(shards)
    ds = ShardDataset(sh, 16, 4, rank=1, world=2, repeat=True, shuffle_buffer=2)
    it = iter(ds)
    got = [next(it)["index"] for _ in range(2 * ds.images)]
    assert len(got) == 2 * ds.images and len(set(got)) <= ds.images


def test_missing_shard_is_a_one_line_error_naming_it(shards, tmp_path):
    copy = _copy(shards, tmp_path / "copy")
    (copy / "train-000002.tar").unlink()
    for spec in (copy, f"{copy}/train-{{000000..000003}}.tar"):
        with pytest.raises(ShardError) as e:
            resolve_shards(spec)
        assert "missing shard" in str(e.value) and "train-000002.tar" in str(e.value)
        assert "\n" not in str(e.value)
    with pytest.raises(ShardError, match="not in the index"):
        resolve_shards(f"{copy}/train-{{000000..000999}}.tar")
    (copy / SHARD_INDEX).unlink()
    with pytest.raises(ShardError, match="no index"):
        resolve_shards(copy)


@pytest.mark.parametrize("cut", ["mid-image", "member boundary", "empty"])
def test_damaged_shard_is_skipped_and_counted_or_raises(shards, tmp_path, cut):
    copy = _copy(shards, tmp_path / "copy")
    victim = copy / "train-000001.tar"
    data = victim.read_bytes()
    with tarfile.open(victim) as tar:
        members = tar.getmembers()
    # the second image's data (mid-image), the header of the second image (boundary), nothing at all
    at = {"mid-image": members[3].offset_data + 10, "member boundary": members[3].offset, "empty": 0}[cut]
    victim.write_bytes(data[:at])
    sh, _ = resolve_shards(copy)
    ds = ShardDataset(sh, 16, 4, shuffle=False)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        got = _indices(DataLoader(ds, batch_size=4))
    msgs = [str(x.message) for x in w if "damaged shard" in str(x.message)]
    assert len(msgs) == 1 and str(victim) in msgs[0] and "1 damaged shard(s) skipped" in msgs[0], msgs
    read = 1 if cut != "empty" else 0
    assert f"{read} of the {PER_SHARD} image(s)" in msgs[0]
    # everything else is there, once
    assert sorted(got) == [i for i in range(ds.images) if not PER_SHARD + read <= i < 2 * PER_SHARD]
    assert ds.damaged and str(victim) in ds.damaged[0]
    with pytest.raises(ShardError) as e:
        list(ShardDataset(sh, 16, 4, shuffle=False, on_damaged="raise"))
    assert "damaged shard" in str(e.value) and str(victim) in str(e.value) and "\n" not in str(e.value)


def test_a_worker_whose_shards_all_fail_says_so(shards, tmp_path):
    copy = _copy(shards, tmp_path / "copy")
    for p in copy.glob("*.tar"):
        p.write_bytes(b"not a tar" * 100)
    sh, _ = resolve_shards(copy, "val")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ShardError, match="none of the .* shard"):
            list(ShardDataset(sh, 16, 4))


def test_write_is_atomic_no_partial_tar_on_failure(photos, tmp_path, monkeypatch):
    import os

    import fastcolor.io

    out = tmp_path / "out"
    calls = []
    real = os.fsync

    def full_after_two(fd):
        calls.append(fd)
        if len(calls) == 3:  # after the first shard (its file and its directory): the second shard's file
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)

    monkeypatch.setattr(fastcolor.io.os, "fsync", full_after_two)
    with pytest.raises(DiskFullError, match="train-000001.tar"):
        write_shards(photos, out, PER_SHARD, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["train-000000.tar"]  # no partial shard, no index
    with tarfile.open(out / "train-000000.tar") as tar:
        assert len(tar.getmembers()) == 3 * PER_SHARD
    monkeypatch.undo()
    with pytest.raises(ValueError, match="out_dir: expected a new or empty directory"):
        write_shards(photos, out, PER_SHARD, progress=False)


def test_prior_sample_takes_n_images_from_a_few_shards(shards):
    sh, _ = resolve_shards(shards)
    picked = sample_shards(sh, 7, seed=1)
    assert sum(n for _, n in picked) == 7 and len(picked) == 3 and picked[-1][1] == 1
    assert picked == sample_shards(sh, 7, seed=1) and picked != sample_shards(sh, 7, seed=2)
    ds = ShardDataset(picked, 16, 4, shuffle=False)
    got = _indices(DataLoader(ds, batch_size=3, num_workers=2))
    assert len(got) == len(set(got)) == 7 == ds.images
    assert sum(n for _, n in sample_shards(sh, 10_000)) == sum(s.images for s in sh)


def test_other_outputs_match_the_folder_datasets(shards):
    sh, _ = resolve_shards(shards, "val")
    rgb = next(iter(ShardDataset(sh, 16, 4, output="rgb", shuffle=False)))
    raw = next(iter(ShardDataset(sh, 16, 4, output="bytes", shuffle=False)))
    assert rgb["rgb"].dtype == torch.uint8 and rgb["rgb"].shape == (3, 16, 16) and rgb["index"] == raw["index"] == 0
    from fastcolor.data.images import load_square

    assert torch.equal(load_square(raw["path"], 16, data=raw["data"].numpy().tobytes()), rgb["rgb"])


def test_is_shard_source(shards, photos):
    assert is_shard_source(shards) and is_shard_source(f"{shards}/train-{{000000..000001}}.tar")
    assert is_shard_source("https://host/x/train-000000.tar")
    assert not is_shard_source(photos)


def test_reading_without_webdataset_names_the_extra(shards, monkeypatch):
    sh, _ = resolve_shards(shards, "val")
    monkeypatch.setitem(sys.modules, "webdataset", None)
    with pytest.raises(ImportError, match=r"pip install 'fastcolor\[shards\]'"):
        next(iter(ShardDataset(sh, 16, 4)))
    with pytest.raises(ImportError, match=r"pip install 'fastcolor\[shards\]'"):
        resolve_shards(f"{shards}/train-{{000000..000001}}.tar")
    assert resolve_shards(shards, "val")[0] == sh  # a shard folder is found without it


def test_shard_command(photos, tmp_path, capsys):
    from fastcolor.app.cli import main

    out = tmp_path / "out"
    assert main(["shard", str(photos), str(out), "--images-per-shard", "4", "--seed", "3", "-q"]) == 0
    index = read_shard_index(out)
    assert [e["images"] for e in index["splits"]["train"]] == [4] * 6 + [1] and index["seed"] == 3
    assert "7 train shard(s) (25 images)" in capsys.readouterr().err
    assert main(["shard", str(photos), str(out)]) == 2  # not empty
    assert "expected a new or empty directory" in capsys.readouterr().err
    assert main(["shard", str(photos), str(photos / "shards")]) == 2  # inside DATA


@pytest.fixture()
def served(shards, tmp_path):
    """A copy of the shard folder served over HTTP on localhost (shards on another machine)."""
    import functools
    import http.server
    import threading

    copy = _copy(shards, tmp_path / "served")

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(copy)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield copy, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.skipif(__import__("shutil").which("curl") is None, reason="webdataset opens http URLs with curl")
def test_shards_over_http_and_a_missing_remote_one_is_skipped_and_counted(served):
    copy, url = served
    n = len(read_shard_index(copy)["splits"]["train"])
    sh, _ = resolve_shards(f"{url}/train-{{000000..{n - 1:06d}}}.tar")
    val, _ = resolve_shards(f"{url}/train-000000.tar", "val")
    assert sh[0].url == f"{url}/train-000000.tar" and val[0].url == f"{url}/val-000000.tar"
    total = sum(s.images for s in sh)
    assert sorted(_indices(DataLoader(ShardDataset(sh, 16, 4, seed=1), batch_size=4))) == list(range(total))
    (copy / "train-000001.tar").unlink()  # gone from the server: found when it is read
    ds = ShardDataset(sh, 16, 4, shuffle=False)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        got = _indices(DataLoader(ds, batch_size=4))
    msgs = [str(x.message) for x in w if "damaged shard" in str(x.message)]
    assert len(msgs) == 1 and f"{url}/train-000001.tar" in msgs[0] and "0 of the 3 image(s)" in msgs[0], msgs
    assert "curl exited with status 22" in msgs[0], msgs  # -f: an HTTP error
    assert sorted(got) == [i for i in range(total) if not PER_SHARD <= i < 2 * PER_SHARD]


def test_every_rank_trains_the_same_number_of_full_batches(shards, tmp_path):
    """The shard source's epoch: ceil(images / (ranks x batch)) full batches on each rank, so
    DistributedDataParallel's ranks never wait for one another (the ranks' shards differ in size)."""
    from fastcolor.models import build_model
    from fastcolor.train import TrainConfig
    from fastcolor.training.distributed import Dist
    from fastcolor.training.shard_source import ShardSource

    cfg = TrainConfig(data_dir=str(shards), run_dir=str(tmp_path / "run"), model="zhang_tiny", batch_size=4,
                      workers=2, augment=False)
    model = build_model("zhang_tiny")
    counts = []
    for rank in (0, 1):
        src = ShardSource(cfg, tmp_path / "run", Dist(rank=rank, world=2), torch.device("cpu"))
        src.prepare()
        src.attach(model, 16, 4)
        assert src.train_images == 25 and src.train_ds.rank_images(0) != src.train_ds.rank_images(1)
        loader = src.train_loader(epoch=1)
        sizes = [len(b["index"]) for b in loader]
        assert len(loader) == len(sizes) == 4 and sizes == [4] * 4  # ceil(25 / (2 x 4))
        counts.append(sum(len(b["index"]) for b in src.val_loader()))
    assert sum(counts) == sum(s.images for s in src.val_shards)  # validation: each rank its share, once


def test_train_two_steps_from_shards(shards, tmp_path):
    from fastcolor.train import TrainConfig, train

    for data in (str(shards), f"{shards}/train-{{000000..000008}}.tar"):
        run = tmp_path / ("pattern" if "{" in data else "folder")
        res = train(TrainConfig(data_dir=data, run_dir=str(run), model="zhang_tiny", batch_size=4, epochs=None,
                                max_steps=2, workers=2, progress=False, plot=False))
        assert res.history[-1]["step"] == 2 and all(np.isfinite(res.history[-1][k]) for k in ("train_loss",
                                                                                              "val_loss"))
        assert (run / "model.safetensors").is_file() and (run / "prior.safetensors").is_file()


def test_train_command_names_a_missing_shard(shards, tmp_path, capsys):
    from fastcolor.app.cli import main

    pattern = f"{shards}/train-{{000000..000009}}.tar"  # one more than there are
    code = main(["train", pattern, "--out", str(tmp_path / "run"), "--model", "zhang-tiny", "-q"])
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert code == 2, err
    assert len(err) == 1 and "train-000009.tar" in err[0] and "not in the index" in err[0], err
    assert main(["train", str(tmp_path / "nothing-{1..2}.tmp"), "--out", str(tmp_path / "r2")]) == 2
    assert "DATA must be a folder of images or tar shards" in capsys.readouterr().err


@pytest.mark.parametrize("workers", [0, 2])
def test_a_resumed_epoch_skips_the_batches_already_trained(shards, workers):
    """set_epoch(e, skip_batches=k): the batches of epoch e from batch k on, as a full epoch gives them."""
    sh, _ = resolve_shards(shards)
    ds = ShardDataset(sh, 16, 4, rank=1, world=2, seed=2, repeat=True, shuffle_buffer=5)

    def batches(skip, n):
        ds.set_epoch(3, skip_batches=skip, batch_size=2)
        it = iter(DataLoader(ds, batch_size=2, num_workers=workers))
        return [next(it)["index"].tolist() for _ in range(n)]

    full = batches(0, 9)
    assert batches(5, 4) == full[5:]
    assert batches(0, 9) == full  # the same epoch, the same order


def test_shard_source_validation_subset_and_given_validation_shards(shards, photos, tmp_path):
    from fastcolor.models import build_model
    from fastcolor.train import TrainConfig
    from fastcolor.training.distributed import Dist
    from fastcolor.training.shard_source import ShardSource

    def source(**fields):
        cfg = TrainConfig(data_dir=str(shards), run_dir=str(tmp_path / "run"), model="zhang_tiny", batch_size=4,
                          workers=0, augment=False)
        for k, v in fields.items():  # val_images / val_data: TrainConfig fields of the trainer (issue 20.2)
            setattr(cfg, k, v)
        src = ShardSource(cfg, tmp_path / "run", Dist(), torch.device("cpu"))
        src.prepare()
        src.attach(build_model("zhang_tiny"), 16, 4)
        return src

    subset = source(val_images=2)
    got = _indices(subset.val_loader())
    assert len(got) == 2 and got == _indices(source(val_images=2).val_loader())  # the same two every time
    assert len(list(subset.val_loader(max_batches=1))) == 1
    given = source(val_data=str(shards))  # every shard of a given folder: train, val and test sets
    assert given.val_ds.images == sum(e["images"] for k in ("train", "val", "test")
                                      for e in read_shard_index(shards)["splits"][k])
    with pytest.raises(ValueError, match="val_data: training on shards"):
        source(val_data=str(photos))


@pytest.mark.parametrize("report", ["warn", "sample"])
def test_an_image_that_does_not_decode_is_skipped_and_reported_once(shards, tmp_path, report):
    copy = _copy(shards, tmp_path / "copy")
    victim = copy / "val-000000.tar"
    with tarfile.open(shards / victim.name) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    bad = next(m.name for m, _ in members if m.name.endswith((".png", ".jpg")))
    with tarfile.open(victim, "w") as tar:
        for m, data in members:
            data = b"not an image at all" if m.name == bad else data
            m.size = len(data)
            tar.addfile(m, __import__("io").BytesIO(data))
    sh, _ = resolve_shards(copy, "val")
    ds = ShardDataset(sh, 16, 4, shuffle=False, report_skips=report)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        samples = list(ds)
    warned = [str(x.message) for x in w if "unreadable image" in str(x.message)]
    assert sorted(s["index"] for s in samples) == [i for i in range(ds.images) if f"val-{i:08d}." not in bad]
    if report == "warn":
        assert len(warned) == 1 and bad in warned[0]
    else:
        assert not warned
        lines = [s["skipped"] for s in samples if s["skipped"]]
        assert len(lines) == 1 and lines[0].startswith(f"{victim}/{bad}\t") and "not" in lines[0]


def test_shard_batches_on_the_device_equal_the_folders(photos, shards, tmp_path):
    """The same validation image gives the same L and ab from its shard as from its file, through
    the same device half (the workers' uint8 images; Lab and the target on the device)."""
    from fastcolor.models import build_model
    from fastcolor.train import TrainConfig
    from fastcolor.training.distributed import Dist
    from fastcolor.training.shard_source import ShardSource
    from fastcolor.training.source import FolderSource

    model, got = build_model("zhang_tiny"), {}
    for kind, data in (("folder", photos), ("shards", shards)):
        cfg = TrainConfig(data_dir=str(data), run_dir=str(tmp_path / kind), model="zhang_tiny", batch_size=4,
                          workers=0, seed=3, crop_size=8, mirror=True, device="cpu")
        src = (FolderSource if kind == "folder" else ShardSource)(cfg, tmp_path / kind, Dist(), torch.device("cpu"))
        (tmp_path / kind).mkdir()
        src.prepare()
        src.attach(model, 16, 4)
        names = ([it.path for it in src.val_items] if kind == "folder"
                 else [it.path for it in split_items(index_images(photos), seed=3)["val"]])
        for batch in src.val_loader():
            out = src.to_device(batch)
            for i, L, ab in zip(out["index"].tolist(), out["L"], out["ab"], strict=True):
                got.setdefault(names[i], []).append((L, ab))
    assert len(got) == 5 and all(len(v) == 2 for v in got.values())
    for (L1, ab1), (L2, ab2) in got.values():
        assert L1.shape == (1, 8, 8) and torch.equal(L1, L2) and torch.equal(ab1, ab2)


def test_torchrun_two_ranks_train_from_shards_of_unequal_share(shards, tmp_path):
    """Two gloo ranks whose shards hold 15 and 10 training images run the same number of steps
    (ceil(25 / (2 x 4)) = 4), so the epoch ends without a rank waiting forever in an all-reduce."""
    import os
    import subprocess

    sh, _ = resolve_shards(shards)
    ds = ShardDataset(sh, 16, 4, world=2, seed=0)
    assert ds.rank_images(0) != ds.rank_images(1)
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "fastcolor",
           "train", str(shards), "--out", str(run), "--model", "zhang-tiny", "--workers", "1", "--epochs", "1",
           "--batch-size", "4", "--device", "cpu", "--prior", "data", "-q"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(history) == 1 and history[0]["step"] == 4, history


def test_a_workers_shard_error_reaches_the_trainer_as_one_line(shards, tmp_path):
    from fastcolor.models import build_model
    from fastcolor.train import TrainConfig
    from fastcolor.training.distributed import Dist
    from fastcolor.training.shard_source import ShardSource

    copy = _copy(shards, tmp_path / "copy")
    for p in copy.glob("val-*.tar"):
        p.write_bytes(b"")
    cfg = TrainConfig(data_dir=str(copy), run_dir=str(tmp_path / "run"), model="zhang_tiny", batch_size=4, workers=1)
    src = ShardSource(cfg, tmp_path / "run", Dist(), torch.device("cpu"))
    src.prepare()
    src.attach(build_model("zhang_tiny"), 16, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ShardError) as e:
            list(src.val_loader())
    msg = str(e.value)
    assert msg.startswith("shards: none of the 2 shard(s)") and "val-000000.tar" in msg and "\n" not in msg, msg


def test_unreadable_files_are_left_out_of_the_folders_split_as_the_trainer_makes_it(photos, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(photos, data)
    (data / "cat" / "empty.png").write_bytes(b"")
    (data / "cat" / "garbage.jpg").write_bytes(b"this is not a jpeg at all" * 10)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        index = write_shards(data, tmp_path / "out", PER_SHARD, seed=3, progress=False)
    msgs = [str(x.message) for x in w if "could not be read while sharding" in str(x.message)]
    assert len(msgs) == 1 and "empty.png" in msgs[0] and "garbage.jpg" in msgs[0]
    assert sorted(s.split(" ")[0] for s in index["skipped"]) == ["cat/empty.png", "cat/garbage.jpg"]
    # the trainer's split of the folder (listed, nothing opened), less the two files
    split = split_items(index_images(data, verify=False), seed=3)
    for name in ("train", "val", "test"):
        stored = []
        for e in index["splits"][name]:
            with tarfile.open(tmp_path / "out" / e["name"]) as tar:
                stored += [json.loads(tar.extractfile(m).read())["path"] for m in tar.getmembers()
                           if m.name.endswith(".json")]
        assert sorted(stored) == sorted(it.path for it in split[name] if it.path not in ("cat/empty.png",
                                                                                         "cat/garbage.jpg"))
        assert sum(e["images"] for e in index["splits"][name]) == len(stored)


def test_a_transform_that_does_not_keep_uint8_is_an_error_not_a_skip(shards):
    sh, _ = resolve_shards(shards, "val")
    with pytest.raises(ValueError, match="augment must keep uint8 images with output='rgb'"):
        next(iter(ShardDataset(sh, 16, 4, augment=lambda x: x.float(), output="rgb", shuffle=False)))


def test_more_workers_than_a_ranks_shards_is_said(shards, tmp_path):
    from fastcolor.models import build_model
    from fastcolor.train import TrainConfig
    from fastcolor.training.distributed import Dist
    from fastcolor.training.shard_source import ShardSource

    for workers, warned in ((4, False), (5, True)):  # 9 training shards for 2 ranks: 4 or 5 each
        cfg = TrainConfig(data_dir=str(shards), run_dir=str(tmp_path / "run"), model="zhang_tiny", workers=workers)
        src = ShardSource(cfg, tmp_path / "run", Dist(rank=0, world=2), torch.device("cpu"))
        src.prepare()
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            src.attach(build_model("zhang_tiny"), 16, 4)
        msgs = [str(x.message) for x in w if "idle" in str(x.message)]
        assert bool(msgs) == warned and (not msgs or "9 training shard(s) for 2 rank(s) of 5 loader workers" in msgs[0])
