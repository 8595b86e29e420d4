"""`fastcolor eval` prints the seed study's two tables (Fig. 13 and 17 of its report) in their
layout, and their numbers are the metrics computed directly from the models' outputs.

A tiny run: three classes of 32 px crops of scikit-image photos, zhang-tiny and fusion-tiny
trained for one short epoch each.
"""
import json

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image
from test_train import one_thread  # noqa: F401  (autouse: one intra-op thread)

from fastcolor.app.cli import main
from fastcolor.colorize import predict_ab
from fastcolor.data import ColorizationDataset, load_split, reduce_target
from fastcolor.metrics import ab_mse, ab_r2_pooled, bin_accuracy, soft_cross_entropy, study_rows
from fastcolor.models.serialization import load_model

CLASSES = ("astronaut", "coffee", "rocket")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(data folder, Zhang run, fusion run): 3 classes x 10 crops, one epoch each through the CLI."""
    root = tmp_path_factory.mktemp("tables")
    data = root / "data"
    rng = np.random.default_rng(2)
    for name in CLASSES:
        img = getattr(skimage.data, name)()
        (data / name).mkdir(parents=True)
        for j in range(10):
            s = int(rng.integers(min(img.shape[:2]) // 4, min(img.shape[:2]) // 2))
            y, x = rng.integers(0, img.shape[0] - s), rng.integers(0, img.shape[1] - s)
            Image.fromarray(img[y:y + s, x:x + s]).resize((32, 32)).save(data / name / f"{name}_{j}.png")
    for model, run in (("zhang-tiny", "zhang"), ("fusion-tiny", "fusion")):
        assert main(["train", str(data), "--model", model, "--epochs", "1", "--batch-size", "8", "--size", "32",
                     "--workers", "0", "--max-steps-per-epoch", "2", "--out", str(root / run), "-q"]) == 0
    return data, root / "zhang", root / "fusion"


def _tables(text: str) -> list[list[list[str]]]:
    """Every markdown table in ``text``: a list of rows (header first), each a list of cells."""
    tables, current = [], []
    for line in text.splitlines():
        if line.startswith("|"):
            if not line.startswith("|---"):
                current.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif current:
            tables.append(current)
            current = []
    return tables + ([current] if current else [])


def _direct(run, data, arch: str, reduction: str, splits=("train", "test")) -> dict[tuple[str, str], dict[str, float]]:
    """(class, split) -> the study's metrics, computed here image by image from the model's output."""
    model = load_model(run).eval()
    split = load_split(run / "split.json")
    out = {}
    for name in splits:
        ds = ColorizationDataset(data, split[name], size=32, target_stride=1, augment=False)
        per: dict[str, dict[str, list[float]]] = {}
        for i in range(len(ds)):
            s = ds[i]
            L, ab = s["L"][None], s["ab"][None]
            with torch.no_grad():
                if arch == "zhang":
                    logits = model(L)
                    small = reduce_target(ab, 32 // logits.shape[-1], reduction)
                    vals = {"acc313": bin_accuracy(logits, small).item(),
                            "ce313_soft": soft_cross_entropy(logits, small).item()}
                else:
                    pab = predict_ab(model, L)
                    vals = {"mse": ab_mse(pab, ab).item(), "r2_pooled": ab_r2_pooled(pab, ab).item()}
            for k, v in vals.items():
                per.setdefault(ds.items[i].label, {}).setdefault(k, []).append(v)
        for label, d in per.items():
            out[label, name] = {k: float(np.mean(v)) for k, v in d.items()}
    return out


def test_eval_prints_the_study_tables_with_the_direct_numbers(runs, capsys, tmp_path):
    data, zhang, fusion = runs
    capsys.readouterr()
    assert main(["eval", str(zhang), str(data), "--compare", str(fusion), "--out", str(tmp_path / "ev")]) == 0
    out = capsys.readouterr().out
    tables = _tables(out)
    heads = [t[0] for t in tables]
    zi = heads.index(["class", "split", "images", "313-bin accuracy", "cross-entropy"])
    fi = heads.index(["class", "split", "images", "MSE", "R²"])
    assert zi < fi  # the Zhang model's table first (it is the evaluated model; fusion is --compare)
    report = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    for index, key, arch, run in ((zi, "model", "zhang", zhang), (fi, "compare", "fusion", fusion)):
        body = tables[index][1:]
        # layout: per class (sorted) a train then a test row, then the averages (train, test)
        expected = [(c, s) for c in sorted(CLASSES) for s in ("train", "test")] + [("average", "train"),
                                                                                 ("average", "test")]
        assert [(r[0], r[1]) for r in body] == expected
        reduction = json.loads((run / "train_config.json").read_text()).get("target_reduction", "subsample")
        assert report["models"][key]["target_reduction"] == reduction  # the run's own
        direct = _direct(run, data, arch, reduction)
        cols = ["acc313", "ce313_soft"] if arch == "zhang" else ["mse", "r2_pooled"]
        rows = report["models"][key]["study"]
        assert [(r["class"], r["split"]) for r in rows] == expected
        for cells, row in zip(body, rows, strict=True):
            for j, col in enumerate(cols):
                if row["class"] == "average":
                    want = np.mean([direct[c, row["split"]][col] for c in CLASSES])
                else:
                    want = direct[row["class"], row["split"]][col]
                assert row[col] == pytest.approx(want, rel=1e-5, abs=1e-7), (row, col)
                assert cells[3 + j] == f"{row[col]:.4g}"  # the printed table is the report's number
        # the images column counts the split's images: train and test of every class add up
        n_split = {s: len(load_split(run / "split.json")[s]) for s in ("train", "test")}
        assert [int(r[2]) for r in body[-2:]] == [n_split["train"], n_split["test"]]
    # the study's metric columns are in the full tables too, with the hard and per-channel ones beside
    full = next(t for t in tables if t[0][:2] == ["class", "split"] and "ce313_soft" in t[0])
    assert {"ce313_hard", "r2_pooled", "r2_per_channel"} <= set(full[0])
    # --target-reduction overrides the run's (the 313-bin metrics change with it)
    run_reduction = report["target_reduction"]
    other = {"area": "subsample", "subsample": "area"}[run_reduction]
    capsys.readouterr()
    assert main(["eval", str(zhang), str(data), "--split", "test", "--target-reduction", other, "--json",
                 "--out", str(tmp_path / "ev2")]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["target_reduction"] == other
    direct = _direct(zhang, data, "zhang", other, splits=("test",))
    for row in again["study"][:-1]:
        assert row["ce313_soft"] == pytest.approx(direct[row["class"], "test"]["ce313_soft"], rel=1e-5)
    assert again["study"][0]["ce313_soft"] != report["study"][1]["ce313_soft"]


def test_several_runs_one_per_class_join_into_one_table_per_kind(runs, capsys, tmp_path):
    """The study trained one model per class: `fastcolor eval RUN... DATA` joins the runs' rows."""
    data, zhang, fusion = runs
    per_class = []
    for name in CLASSES[:2]:
        run = tmp_path / f"zhang-{name}"
        assert main(["train", str(data), "--model", "zhang-tiny", "--class", name, "--epochs", "1", "--batch-size",
                     "8", "--size", "32", "--workers", "0", "--max-steps-per-epoch", "1", "--out", str(run),
                     "-q"]) == 0
        per_class.append(run)
    capsys.readouterr()
    out_dir = tmp_path / "joined"
    assert main(["eval", *map(str, per_class), str(fusion), str(data), "--out", str(out_dir)]) == 0
    out = capsys.readouterr().out
    tables = _tables(out)
    assert [t[0][3:] for t in tables] == [["313-bin accuracy", "cross-entropy"], ["MSE", "R²"]]
    zrows = tables[0][1:]
    assert [(r[0], r[1]) for r in zrows] == [(c, s) for c in sorted(CLASSES[:2]) for s in ("train", "test")] + [
        ("average", "train"), ("average", "test")]
    # each class's row is its own run's number, evaluated on that run's split
    for run in per_class:
        own = json.loads((out_dir / run.name / "metrics.json").read_text())["study"]
        name = run.name.split("-", 1)[1]
        for r in own:
            if r["class"] == name:
                cells = next(c for c in zrows if (c[0], c[1]) == (name, r["split"]))
                assert cells[3:] == [f"{r['acc313']:.4g}", f"{r['ce313_soft']:.4g}"]
    joined = json.loads((out_dir / "study.json").read_text())["study"]
    for s in ("train", "test"):
        avg = next(r for r in joined["zhang"] if r["class"] == "average" and r["split"] == s)
        mine = [r["ce313_soft"] for r in joined["zhang"] if r["class"] != "average" and r["split"] == s]
        assert len(mine) == 2 and avg["ce313_soft"] == pytest.approx(np.mean(mine))
    assert [(r["class"], r["split"]) for r in joined["fusion"]][:2] == [(sorted(CLASSES)[0], "train"),
                                                                         (sorted(CLASSES)[0], "test")]
    assert (out_dir / "study.md").read_text().count("| average | test |") == 2
    # a class evaluated by two runs of one kind, and --compare with several runs, are one-line errors
    capsys.readouterr()
    assert main(["eval", str(per_class[0]), str(per_class[0]), str(data), "--out", str(tmp_path / "dup")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "evaluated by two zhang runs" in err
    assert main(["eval", str(zhang), str(per_class[0]), str(data), "--compare", str(fusion)]) == 2
    assert "--compare" in capsys.readouterr().err


def test_study_rows_average_the_classes_not_the_images():
    rows = [{"class": "a", "split": "test", "images": 1, "mse": 0.1, "r2_pooled": 0.2},
            {"class": "b", "split": "test", "images": 3, "mse": 0.3, "r2_pooled": float("nan")},
            {"class": "(all)", "split": "test", "images": 4, "mse": 0.25, "r2_pooled": 0.2}]
    avg = study_rows(rows, "fusion")[-1]
    assert avg["class"] == "average" and avg["images"] == 4
    assert avg["mse"] == pytest.approx(0.2) and avg["r2_pooled"] == pytest.approx(0.2)  # NaN skipped
    with pytest.raises(ValueError, match="arch"):
        study_rows(rows, "unet")
