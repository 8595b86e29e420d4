import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from fastcolor.color import rgb_to_lab
from fastcolor.data import (
    TARGET_REDUCTIONS,
    ColorizationDataset,
    ImageItem,
    index_images,
    load_rgb,
    load_split,
    reduce_target,
    save_split,
    split_items,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_train import one_thread  # noqa: E402,F401  (autouse: one intra-op thread)


def _photo(name, size=48):
    img = getattr(skimage.data, name)()
    return Image.fromarray(img).resize((size, size))


@pytest.fixture()
def folder(tmp_path):
    """Two classes of real photos plus odd formats and broken files."""
    root = tmp_path / "data"
    (root / "animals").mkdir(parents=True)
    (root / "things").mkdir()
    for i, name in enumerate(["chelsea", "cat", "astronaut"]):
        _photo(name).save(root / "animals" / f"a{i}.png")
    for i, name in enumerate(["coffee", "rocket", "astronaut"]):
        _photo(name).rotate(90 * i).save(root / "things" / f"t{i}.jpg")
    (root / "things" / "empty.png").write_bytes(b"")
    (root / "things" / "garbage.jpg").write_bytes(b"this is not a jpeg at all" * 10)
    (root / "things" / "notes.txt").write_text("not an image")
    return root


def test_index_skips_bad_files_with_one_warning(folder):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        items = index_images(folder)
    msgs = [str(x.message) for x in w if "unreadable" in str(x.message)]
    assert len(msgs) == 1 and "empty.png" in msgs[0] and "garbage.jpg" in msgs[0]
    assert len(items) == 6
    assert {it.label for it in items} == {"animals", "things"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert index_images(folder, classes=["things"])[0].label == "things"
    with pytest.raises(ValueError, match="classes"):
        index_images(folder, classes=["plants"])
    with pytest.raises(ValueError, match="root"):
        index_images(folder / "missing")


def test_flat_folder_is_one_class(tmp_path):
    for i in range(3):
        _photo("coffee").save(tmp_path / f"{i}.png")
    items = index_images(tmp_path)
    assert len(items) == 3 and {it.label for it in items} == {tmp_path.name}


def test_split_is_deterministic_stratified_and_saved(tmp_path):
    items = [ImageItem(f"{c}/{i:03d}.png", c) for c in "ab" for i in range(50)]
    s1 = split_items(items, seed=3)
    s2 = split_items(list(reversed(items)), seed=3)
    assert s1 == s2
    assert split_items(items, seed=4) != s1
    assert [len(s1[k]) for k in ("train", "val", "test")] == [80, 10, 10]
    assert sum(it.label == "a" for it in s1["val"]) == 5
    all_paths = [it.path for k in s1 for it in s1[k]]
    assert sorted(all_paths) == sorted(it.path for it in items)
    save_split(tmp_path / "split.json", s1, seed=3)
    assert json.loads((tmp_path / "split.json").read_text())["seed"] == 3
    assert load_split(tmp_path / "split.json") == s1
    with pytest.raises(ValueError, match="fractions"):
        split_items(items, fractions=(0.5, 0.5, 0.5))


def test_any_image_mode_becomes_rgb(tmp_path):
    rgb = np.asarray(_photo("astronaut", 16))
    cases = {
        "gray.png": Image.fromarray(rgb[..., 0]),
        "rgba.png": Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])),
        "palette.png": Image.fromarray(rgb).convert("P"),
        "cmyk.jpg": Image.fromarray(rgb).convert("CMYK"),
        "gray16.png": Image.fromarray(rgb[..., 0].astype(np.uint16) * 257),
        "bw.png": Image.fromarray(rgb[..., 0] > 128),
    }
    for name, im in cases.items():
        im.save(tmp_path / name)
        out = load_rgb(tmp_path / name)
        assert out.mode == "RGB" and out.size == (16, 16), name
    # 16-bit grey is scaled down, not clipped to white
    g16 = np.asarray(load_rgb(tmp_path / "gray16.png"))[..., 0]
    np.testing.assert_array_equal(g16, rgb[..., 0])
    # transparent pixels are composited over white
    rgba = np.dstack([rgb, np.zeros(rgb.shape[:2], np.uint8)])
    Image.fromarray(rgba).save(tmp_path / "clear.png")
    assert np.asarray(load_rgb(tmp_path / "clear.png")).min() == 255


def test_exif_rotation_is_applied(tmp_path):
    im = Image.fromarray(np.zeros((10, 20, 3), np.uint8))  # 20 wide, 10 high
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    im.save(tmp_path / "rot.jpg", exif=exif.tobytes())
    assert load_rgb(tmp_path / "rot.jpg").size == (10, 20)


def test_dataset_shapes_and_values(folder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        items = index_images(folder)
    ds = ColorizationDataset(folder, items, size=32, target_stride=4)
    s = ds[0]
    assert s["L"].shape == (1, 32, 32) and s["ab"].shape == (2, 8, 8)
    assert s["L"].dtype == torch.float32 and 0 <= s["L"].min() and s["L"].max() <= 100
    # without augmentation the default target is the top-left pixel of every 4x4 block of the
    # full-resolution ab (Zhang et al. subsample), "area" its block mean (v1)
    full = ColorizationDataset(folder, items, size=32, target_stride=1)[0]
    assert full["ab"].shape == (2, 32, 32)
    torch.testing.assert_close(full["ab"][:, 0::4, 0::4], s["ab"])
    area = ColorizationDataset(folder, items, size=32, target_stride=4, target_reduction="area")[0]
    torch.testing.assert_close(full["ab"].reshape(2, 8, 4, 8, 4).mean((2, 4)), area["ab"])
    assert (area["ab"] - s["ab"]).abs().max() > 1  # a real photo: the two differ
    torch.testing.assert_close(full["L"], s["L"])
    # the colour is really there: chelsea (a0) is an orange cat
    assert full["ab"][1].mean() > 5
    with pytest.raises(ValueError, match="target_stride"):
        ColorizationDataset(folder, items, size=30, target_stride=4)
    with pytest.raises(ValueError, match="target_reduction must be one of .*got 'mean'"):
        ColorizationDataset(folder, items, size=32, target_reduction="mean")


def test_reduce_target_against_hand_computation():
    assert TARGET_REDUCTIONS == ("subsample", "area")
    # (2, 4, 6): a = 10 * row + col, b = -a; stride 2 blocks
    a = torch.tensor([[10.0 * r + c for c in range(6)] for r in range(4)])
    ab = torch.stack([a, -a])
    sub = reduce_target(ab, 2)  # default: top-left of each block
    assert sub.tolist() == [[[0.0, 2.0, 4.0], [20.0, 22.0, 24.0]], [[-0.0, -2.0, -4.0], [-20.0, -22.0, -24.0]]]
    # block means: (0 + 1 + 10 + 11) / 4 = 5.5, ...
    area = reduce_target(ab, 2, "area")
    assert area.tolist() == [[[5.5, 7.5, 9.5], [25.5, 27.5, 29.5]], [[-5.5, -7.5, -9.5], [-25.5, -27.5, -29.5]]]
    # batched input, stride 1 is the identity, the result is contiguous
    batch = torch.stack([ab, ab + 1])
    out = reduce_target(batch, 2)
    assert out.shape == (2, 2, 2, 3) and out.is_contiguous() and out[1, 0, 1, 2].item() == 25.0
    assert reduce_target(ab, 1) is ab
    for bad, match in [((ab, 4), "divisible by stride=4"), ((ab, 0), "stride must be a positive int"),
                       ((ab[:1], 2), r"\(N, 2, H, W\) or \(2, H, W\).*got \(1, 4, 6\)")]:
        with pytest.raises(ValueError, match=match):
            reduce_target(*bad)
    with pytest.raises(ValueError, match="how must be one of"):
        reduce_target(ab, 2, "nearest")


def test_augmentation_changes_samples_but_keeps_shapes(folder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        items = index_images(folder)
    plain = ColorizationDataset(folder, items, size=32, augment=False)
    aug = ColorizationDataset(folder, items, size=32, augment=True)
    torch.manual_seed(0)
    a = [aug[0]["L"] for _ in range(4)]
    assert all(x.shape == (1, 32, 32) for x in a)
    assert any(not torch.allclose(x, plain[0]["L"]) for x in a)


def test_file_broken_mid_epoch_is_skipped(folder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        items = index_images(folder)
    ds = ColorizationDataset(folder, items, size=16)
    (folder / items[2].path).write_bytes(b"")  # breaks after indexing
    with pytest.warns(UserWarning, match="unreadable"):
        s = ds[2]
    assert s["index"] == 3
    loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batches = list(loader)
    assert sum(b["L"].shape[0] for b in batches) == len(ds)
    assert batches[0]["ab"].shape == (3, 2, 4, 4)


def test_lab_of_loaded_image_matches_direct_conversion(folder):
    ds = ColorizationDataset(folder, [ImageItem("animals/a0.png", "animals")], size=48, target_stride=1)
    direct = rgb_to_lab(torch.from_numpy(np.array(_photo("chelsea"))).permute(2, 0, 1))
    torch.testing.assert_close(ds[0]["ab"], direct[1:])


def test_the_listing_tells_regular_files_without_opening_them_and_the_split_knows_its_folders(folder, tmp_path):
    """One os.scandir listing (issue 20.1): a FIFO named like an image is no regular file; the folders' times let
    split_current tell an unchanged folder without listing it, and a file added or removed changes them."""
    import os

    from fastcolor.data import folder_times, list_folder, save_split, split_current, split_source

    os.mkfifo(folder / "things" / "pipe.png")
    for d in (folder, folder / "animals", folder / "things"):  # times older than any change below
        os.utime(d, ns=(10**18, 10**18))
    listing = list_folder(folder)
    kinds = {it.path: regular for it, regular in zip(listing.items, listing.regular, strict=True)}
    assert kinds["things/pipe.png"] is False and kinds["animals/a0.png"] is True and kinds["things/empty.png"] is True
    assert set(listing.folders) == {".", "animals", "things"} and listing.folders == folder_times(
        folder, [".", "animals", "things"])
    with pytest.warns(UserWarning, match="pipe.png"):
        items = index_images(folder, verify=False, listing=listing)
    path = tmp_path / "split.json"
    save_split(path, split_items(items), seed=0,
               source=split_source(listing.items, [], None, (0.8, 0.1, 0.1), listing.folders))
    assert split_current(path, folder, 0, None, (0.8, 0.1, 0.1))
    assert not split_current(path, folder, 1, None, (0.8, 0.1, 0.1))  # another seed
    assert not split_current(path, folder, 0, ["things"], (0.8, 0.1, 0.1))
    assert not split_current(path, folder, 0, None, (0.8, 0.1, 0.1), val_data=tmp_path)
    (folder / "animals" / "a0.png").rename(tmp_path / "moved.png")
    assert not split_current(path, folder, 0, None, (0.8, 0.1, 0.1))
