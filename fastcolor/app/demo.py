"""``fastcolor demo``: the whole library working, offline, in a few minutes on a laptop CPU.

1. Take the eight colour photos that ship with scikit-image, hold one back (``coffee`` by
   default), and cut random crops of the others into a class-per-photo image folder.
2. Train the small Zhang et al. network with the fused class-rebalanced cross-entropy and
   the small Deep Koalarization fusion network (mobilenet_v3_small backbone with random
   weights: nothing can be downloaded) with :func:`fastcolor.train.train`.
3. Evaluate both (:func:`fastcolor.metrics.evaluate`) on crops of the held-back photo and on
   the test split of the training crops.
4. Colorize the held-back photo at full resolution (the ``colorize`` command's code path).
5. Time the backends on the CPU (:func:`fastcolor.app.bench.timing.time_op`).

Everything lands in one folder (``demo_out/``). The models see seven photos for a minute
or two each: this demonstrates the machinery, it is not a good colorizer. The demo trains
on the idle cores less one (see :func:`fastcolor.app.threads.idle_cpu_threads`), so that its time
holds when other work starts on the machine.
"""
from __future__ import annotations

import io
import math
import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from fastcolor.app.bench.timing import time_op
from fastcolor.app.choices import HELD_OUT, PHOTOS
from fastcolor.app.colorize_files import Job, colorize_files
from fastcolor.app.threads import idle_cpu_threads
from fastcolor.backends import available
from fastcolor.color import l_ab_to_rgb
from fastcolor.colorize import to_l_tensor
from fastcolor.gamut import Q
from fastcolor.io import atomic_write_bytes, atomic_write_json, atomic_write_text
from fastcolor.metrics import comparison_grid, evaluate
from fastcolor.models import PRESETS
from fastcolor.models.serialization import load_model
from fastcolor.train import TrainConfig, train

__all__ = ["DemoSettings", "FULL", "QUICK", "PHOTOS", "HELD_OUT", "demo_photos", "make_crops", "run_demo"]


@dataclass(frozen=True)
class DemoSettings:
    size: int  #: training crop side (= the models' input size)
    crops_per_photo: int
    heldout_crops: int
    epochs: int
    batch_size: int
    lr: float
    embed_size: int  #: side of the grayscale image the fusion backbone sees
    bench_batch: int  #: benchmark logits: (bench_batch, 313, bench_side, bench_side)
    bench_side: int


FULL = DemoSettings(size=64, crops_per_photo=48, heldout_crops=12, epochs=14, batch_size=16, lr=2e-3,
                    embed_size=112, bench_batch=8, bench_side=32)
QUICK = DemoSettings(size=32, crops_per_photo=4, heldout_crops=3, epochs=1, batch_size=8, lr=2e-3,
                     embed_size=32, bench_batch=2, bench_side=8)


def demo_photos() -> dict[str, np.ndarray]:
    """name -> (H, W, 3) uint8 of every photo the demo uses (bundled with scikit-image)."""
    import skimage.data

    photos = {}
    for name in PHOTOS:
        photos[name] = skimage.data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(skimage.data, name)()
    return photos


def make_crops(photo: np.ndarray, n: int, size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """``n`` random square crops (30-100 % of the short side, random flip), resized to ``size``."""
    H, W = photo.shape[:2]
    out = []
    for _ in range(n):
        s = int(min(H, W) * rng.uniform(0.3, 1.0))
        y, x = int(rng.integers(0, H - s + 1)), int(rng.integers(0, W - s + 1))
        crop = photo[y:y + s, x:x + s]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        out.append(np.asarray(Image.fromarray(np.ascontiguousarray(crop)).resize((size, size), Image.BICUBIC)))
    return out


def _save_png(path: Path, rgb: np.ndarray) -> None:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def _write_dataset(root: Path, photos: dict[str, np.ndarray], held_out: str, s: DemoSettings,
                   seed: int) -> tuple[Path, Path, Path]:
    """data/<photo>/*.png (training crops), heldout/<photo>/*.png (held-back crops), and the held-back photo."""
    rng = np.random.default_rng(seed)
    data, heldout = root / "data", root / "heldout"
    for name in photos:
        if name != held_out:
            for i, crop in enumerate(make_crops(photos[name], s.crops_per_photo, s.size, rng)):
                _save_png(data / name / f"{name}_{i:03d}.png", crop)
    for i, crop in enumerate(make_crops(photos[held_out], s.heldout_crops, s.size, rng)):
        _save_png(heldout / held_out / f"{held_out}_{i:03d}.png", crop)
    full = root / f"{held_out}.png"
    _save_png(full, photos[held_out])
    return data, heldout, full


def _model_configs(s: DemoSettings) -> dict[str, dict[str, Any]]:
    return {
        "zhang-small": {**PRESETS["zhang_small"], "input_size": s.size},
        "fusion-small": {**PRESETS["fusion_small"], "input_size": s.size, "embed_size": s.embed_size},
    }


def _plot_losses(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(5 * len(results), 3.6), dpi=100)
    for ax, (name, res) in zip(fig.subplots(1, len(results), squeeze=False)[0], results.items(), strict=True):
        epochs = [h["epoch"] + 1 for h in res.history]
        ax.plot(epochs, [h["train_loss"] for h in res.history], "o-", label="train")
        ax.plot(epochs, [h["val_loss"] for h in res.history], "s-", label="validation")
        loss = "rebalanced cross-entropy" if name.startswith("zhang") else "MSE on ab/128"
        ax.set_title(f"{name}: {loss}", fontsize=10)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())


def _row(report: dict[str, Any], key: str, split: str) -> dict[str, Any]:
    rows = report["models"][key]["rows"]
    return next(r for r in rows if r["class"] == "(all)" and r["split"] == split)


_METRIC_COLUMNS = [("acc313", "313-bin acc"), ("auc", "AuC"), ("auc_rebal", "AuC rebal."), ("mse", "ab MSE"),
                   ("psnr", "PSNR dB"), ("ssim", "SSIM"), ("colorfulness_pred", "colourful."),
                   ("colorfulness_true", "colourful. (truth)")]


def _metrics_markdown(reports: dict[str, dict[str, Any]], names: dict[str, str], s: DemoSettings,
                      held_out: str) -> str:
    def fmt(v):
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4g}"

    lines = ["# fastcolor demo: metrics", "",
             f"Models trained for {s.epochs} epoch(s) on {s.crops_per_photo} crops ({s.size}x{s.size}) of each of "
             f"{len(PHOTOS) - 1} scikit-image photos: a demonstration of the library, not a good colorizer. "
             "The fusion backbone has random weights (no pretrained weights can be downloaded).", ""]
    heldout_images = _row(reports["heldout"], "model", "all")["images"]
    for title, (report, split) in {
            f"Held-back photo ({held_out}, never trained on): {heldout_images} crops":
                (reports["heldout"], "all"),
            "Test split of the training photos' crops (other crops of photos seen in training)":
                (reports["test"], "test")}.items():
        lines += [f"## {title}", "", "| model | " + " | ".join(c[1] for c in _METRIC_COLUMNS) + " |",
                  "|---|" + "---|" * len(_METRIC_COLUMNS)]
        for key in ("model", "compare"):
            row = _row(report, key, split)
            lines.append(f"| {names[report['models'][key]['arch']]} | "
                         + " | ".join(fmt(row.get(c)) for c, _ in _METRIC_COLUMNS) + " |")
        lines.append("")
    lines += ["313-bin accuracy exists for the Zhang model only (the fusion model regresses ab). AuC: share of "
              "pixels within an ab error threshold swept 0..150 (rebalanced: every colour bin weighs the same). "
              "Per-class tables: eval/heldout/metrics.md and eval/test/metrics.md.", ""]
    return "\n".join(lines)


#: ops timed by the demo's benchmark (names of :func:`fastcolor.app.bench.timing.time_op`)
BENCH_OPS = {"loss_fwd": "rebalanced CE forward", "loss_fwdbwd": "rebalanced CE forward+backward",
             "decode": "annealed-mean decode", "encode": "soft-encode (k=5)"}


def run_bench(batch: int, side: int, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Time every op on every CPU backend at logits (batch, 313, side, side) through
    :func:`fastcolor.app.bench.timing.time_op`; returns ``{"shape", "ms": {op: {backend: ms}}, "markdown"}``."""
    shape = (batch, Q, side, side)
    names = available("cpu")
    names = ["torch"] + [n for n in names if n != "torch"]
    ms: dict[str, dict[str, float]] = {}
    for op in BENCH_OPS:
        for name in names:
            ms.setdefault(op, {})[name] = time_op(name, op, shape, torch.float32, "cpu", True, None)
    fast = names[1:]
    lines = [f"CPU, float32 logits {batch}x{Q}x{side}x{side}, median of a few runs (wall clock), "
             f"torch {torch.__version__} with {torch.get_num_threads()} threads, {os.cpu_count()} CPU cores. "
             f"A quick look on a possibly busy machine: bench/RESULTS.md has careful numbers.", "",
             "| op | " + " | ".join(f"{n} ms" for n in names) + " | "
             + " | ".join(f"{n} speed-up" for n in fast) + " |",
             "|---|" + "---|" * (len(names) + len(fast))]
    for op, label in BENCH_OPS.items():
        row = ms[op]
        lines.append(f"| {label} | " + " | ".join(f"{row[n]:.2f}" for n in names) + " | "
                     + " | ".join(f"{row['torch'] / row[n]:.1f}x" for n in fast) + " |")
    lines += ["", "speed-up = torch ms / backend ms (same run). Full benchmark: fastcolor bench.", ""]
    return {"shape": list(shape), "ms": ms, "markdown": "\n".join(lines)}


def _bench(out: Path, s: DemoSettings, log: Callable[[str], None]) -> dict[str, Path]:
    """The quick CPU benchmark into bench.md and bench.json; a failure is reported, never fatal."""
    try:
        res = run_bench(s.bench_batch, s.bench_side, log)
    except Exception as exc:  # noqa: BLE001 - the benchmark is a bonus: say why it is missing
        msg = f"benchmark not run: {type(exc).__name__}: {exc}"
        log(msg)
        return {"bench": atomic_write_text(out / "bench.md", msg + "\n")}
    log(res["markdown"].rstrip())
    bench_md = atomic_write_text(out / "bench.md", "# fastcolor demo: quick CPU benchmark\n\n" + res["markdown"])
    return {"bench_md": bench_md,
            "bench_json": atomic_write_json(out / "bench.json", {k: v for k, v in res.items() if k != "markdown"})}


def run_demo(out: str | os.PathLike = "demo_out", quick: bool = False, device: str = "cpu", seed: int = 0,
             held_out: str = HELD_OUT, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the demo into ``out``, holding back the photo ``held_out`` (one of :data:`PHOTOS`);
    returns ``{"files": {...}, "seconds": ..., "metrics": {...}}``."""
    if held_out not in PHOTOS:
        raise ValueError(f"held_out must be one of {', '.join(PHOTOS)}, got {held_out!r}")
    # One core is left free: the time budget must hold when anything else starts meanwhile.
    bench_threads = torch.get_num_threads()  # the benchmark compares backends at their usual thread counts
    with idle_cpu_threads(device, log, reserve=1):
        return _run_demo(Path(out), quick, device, seed, held_out, log, bench_threads)


def _run_demo(out: Path, quick: bool, device: str, seed: int, held_out: str, log: Callable[[str], None],
              bench_threads: int) -> dict[str, Any]:
    t_start = time.perf_counter()
    s = QUICK if quick else FULL
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    log(f"fastcolor demo -> {out}/  ({'quick: tiny sizes, 1 epoch' if quick else 'about 2-3 minutes on 2 CPU cores'})")
    log("Note: a few minutes of training on seven photos shows the library working; it is not a good colorizer.")

    # 1. data ---------------------------------------------------------------------------------
    photos = demo_photos()
    for stale in ("data", "heldout"):
        _clear_images(out / stale)
    data, heldout, full = _write_dataset(out, photos, held_out, s, seed)
    trained = [p for p in PHOTOS if p != held_out]
    log(f"[1/5] data: {s.crops_per_photo * len(trained)} crops of {', '.join(trained)} -> {data}/; "
        f"'{held_out}' held back")

    # 2. train ----------------------------------------------------------------------------------
    configs = _model_configs(s)
    results = {}
    for name, config in configs.items():
        run = out / "runs" / name
        _clear_run(run)
        loss = "rebalanced" if config["arch"] == "zhang" else "mse"
        note = "" if config["arch"] == "zhang" else f", {config['backbone']} backbone with RANDOM weights"
        log(f"[2/5] training {name} ({loss} loss{note}) for {s.epochs} epoch(s) ...")
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            results[name] = train(TrainConfig(
                data_dir=str(data), run_dir=str(run), model=config, loss=loss, batch_size=s.batch_size,
                epochs=s.epochs, lr=s.lr, patience=s.epochs, workers=0, device=device, seed=seed, resume=False,
                progress=sys.stderr.isatty()))  # no progress bars flooding a log file
        res = results[name]
        log(f"      {name}: best validation loss {res.best_val_loss:.4f} (epoch {res.best_epoch + 1}) "
            f"in {time.perf_counter() - t0:.0f} s -> {run}/")
    curves = out / "loss_curves.png"
    _plot_losses(results, curves)

    # 3. evaluate -------------------------------------------------------------------------------
    log("[3/5] evaluating on the held-back photo's crops and on the training photos' test split ...")
    zrun, frun = (out / "runs" / n for n in configs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        reports = {
            "heldout": evaluate(zrun / "model.safetensors", heldout, out_dir=out / "eval" / "heldout", splits=("all",),
                                compare=frun / "model.safetensors", device=device),
            "test": evaluate(zrun, data, out_dir=out / "eval" / "test", splits=("test",),
                             compare=frun / "model.safetensors", device=device),
        }
    names = {"zhang": "Zhang (zhang-small)", "fusion": "fusion (fusion-small)"}
    md = _metrics_markdown(reports, names, s, held_out)
    metrics_md = atomic_write_text(out / "metrics.md", md)
    metrics_json = atomic_write_json(out / "metrics.json", {
        "note": "demo models: trained for minutes on seven photos; not a good colorizer",
        "settings": s.__dict__, "held_out_photo": held_out, "heldout": reports["heldout"], "test": reports["test"]})

    # 4. colorize the held-back photo at full resolution ------------------------------------------
    log(f"[4/5] colorizing {full.name} at full resolution {photos[held_out].shape[1]}x{photos[held_out].shape[0]} ...")
    models = {"zhang": load_model(zrun, device), "fusion": load_model(frun, device)}
    outputs = {}
    for key, model in models.items():
        dst = out / f"{held_out}_{key}.png"
        colorize_files(model, [Job(full, dst, str(full))], size=s.size, overwrite=True, progress=False)
        outputs[key] = dst
    L = to_l_tensor(photos[held_out])
    gray = (l_ab_to_rgb(L, torch.zeros(2, *L.shape[1:])).permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
    row = [gray] + [np.asarray(Image.open(outputs[k]).convert("RGB")) for k in ("zhang", "fusion")] + [photos[held_out]]
    grid = comparison_grid([row], ["grayscale input", "Zhang (rebalanced CE)", "fusion (random backbone)",
                                   "original"], out / "comparison.png", [f"{held_out} (held back)"])

    # 5. benchmark --------------------------------------------------------------------------------
    log("[5/5] quick CPU benchmark of the backends ...")
    threads = torch.get_num_threads()
    torch.set_num_threads(bench_threads)
    try:
        bench_files = _bench(out, s, log)
    finally:
        torch.set_num_threads(threads)

    seconds = time.perf_counter() - t_start
    files = {"comparison": grid, "metrics_md": metrics_md, "metrics_json": metrics_json, "loss_curves": curves,
             **{f"colorized_{k}": v for k, v in outputs.items()}, **bench_files,
             "runs": out / "runs", "eval": out / "eval"}
    log("")
    log(md.split("\n\n", 2)[2].rstrip())  # the tables, without the title and the disclaimer
    log("")
    log(f"demo finished in {seconds:.0f} s. Files:")
    for label, path in files.items():
        log(f"  {label:<18} {path}")
    log(f"Colorize your own images with these toy weights: fastcolor colorize IMAGES... -o out/ --weights {zrun}")
    log("For a real model, train on thousands of photos: fastcolor train PHOTOS/ --model zhang-small --out runs/zhang")
    return {"files": files, "seconds": seconds,
            "metrics": {k: {m: _row(r, m, "all" if k == "heldout" else "test") for m in ("model", "compare")}
                        for k, r in reports.items()}}


def _clear_images(folder: Path) -> None:
    """Remove the demo's own generated crops from a previous run (only *.png under ``folder``)."""
    if folder.is_dir():
        for p in folder.rglob("*.png"):
            p.unlink()


def _clear_run(run: Path) -> None:
    """Start a run afresh: remove the files :func:`fastcolor.train.train` writes (nothing else)."""
    if not run.is_dir():
        return
    for name in ("split.json", "prior.safetensors", "last.safetensors", "best.safetensors", "model.safetensors",
                 "model.json", "metrics.jsonl", "loss_curve.png", "train_config.json", "result.json"):
        (run / name).unlink(missing_ok=True)
    emb = run / "embeddings"
    if emb.is_dir():
        for p in emb.glob("*.safetensors"):
            p.unlink()
