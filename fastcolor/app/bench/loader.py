"""The data path's benchmark (issue 20.6): ``fastcolor bench --loader`` and ``fastcolor bench
--train-step --data DIR``.

``--loader`` times, per image in one process and one thread (what one DataLoader worker does),
on JPEGs generated from the photos bundled with scikit-image (``imagenet``: crops of them at about
500 x 375, quality 90, ImageNet's typical size; ``12mp``: 4000 x 3000 upscales with a little
sensor-like noise, so that the files are about a camera's size):

``pil_decode``
    the decode floor: ``PIL.Image.open`` + ``load``, nothing else.
``pil_draft``
    the same with :func:`~fastcolor.data.draft_jpeg` to twice the square (DCT-domain scaling).
``torchvision``
    the file's bytes through ``torchvision.io.decode_jpeg`` on the CPU (libjpeg-turbo).
``worker``
    what a fastcolor worker does (``ColorizationDataset(output="rgb")``): read checks, decode
    (drafted), resize, crop, mirror, as uint8.
``whole``
    fastcolor's whole path per image on the CPU (decode + resize + crop + Lab + target:
    ``output="lab"``, the path before issue 20).
``whole_batched``
    ``worker`` per image, then Lab + target batched (:func:`~fastcolor.data.lab_batch`) per
    batch on the CPU, per image: the device stage run on a CPU.
``nvjpeg`` / ``nvjpeg_whole`` (CUDA)
    a batch of bytes decoded and resized on the GPU (:func:`~fastcolor.data.decode_batch`), and
    the whole :class:`~fastcolor.data.DeviceStage` (decode, resize, crop, mirror, Lab, target).

Providers run round-robin (``--rounds``, the median kept), each over every file of a set. The
goal of issue 20: ``whole_batched`` per worker at >= 80% of ``pil_decode``'s images/s.

``--train-step --data DIR`` times the training step fed from the image files (DataLoader with
``--workers``, pinned memory, persistent workers, prefetch, the device stage) with ``--decode``
``gpu`` and/or ``cpu`` (``both``, the default on CUDA: nvjpeg, then CPU workers), against the same
step on one batch already on the device (the floor), ``--steps`` each; ``--make-images N`` first
writes N ImageNet-like JPEGs into the folder. On a lent GPU::

    python -m fastcolor.bench --loader --device cuda
    python -m fastcolor.bench --train-step --data /tmp/jpegs --make-images 2000 --device cuda --workers 8
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from fastcolor.app.bench.common import log
from fastcolor.app.bench.report import meta

#: photo set -> (width, height) of the generated JPEGs (portrait ones swap them)
SETS = {"imagenet": (500, 375), "12mp": (4000, 3000)}
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field")
CPU_PROVIDERS = ("pil_decode", "pil_draft", "torchvision", "worker", "whole", "whole_batched")
CUDA_PROVIDERS = ("nvjpeg", "nvjpeg_whole")
FLOOR = "pil_decode"


def make_jpegs(root: str | Path, kind: str, n: int, seed: int = 0) -> list[Path]:
    """``n`` JPEGs (quality 90) of ``kind`` (a key of :data:`SETS`) in ``root``: random crops of
    the bundled photos, every other one in portrait; ``12mp`` ones upscaled (bicubic) with
    Gaussian noise of 2 levels, so that they compress like a camera's photos, not like a smooth
    upscale."""
    import skimage.data
    from PIL import Image

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        photo = getattr(skimage.data, PHOTOS[i % len(PHOTOS)])()[..., :3]
        h, w = photo.shape[:2]
        ch, cw = int(h * rng.uniform(0.6, 1.0)), int(w * rng.uniform(0.6, 1.0))
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        size = SETS[kind] if i % 2 == 0 else SETS[kind][::-1]
        im = Image.fromarray(photo[y:y + ch, x:x + cw]).resize(size, Image.BICUBIC)
        if kind == "12mp":
            noisy = np.asarray(im, np.float32) + rng.normal(0, 2.0, (size[1], size[0], 3)).astype(np.float32)
            im = Image.fromarray(np.clip(noisy + 0.5, 0, 255).astype(np.uint8))
        path = root / f"{kind}_{i:03d}.jpg"
        im.save(path, quality=90)
        paths.append(path)
    return paths


@contextlib.contextmanager
def _quiet():
    """torchvision 0.29 warns on every decode call that its decoders are deprecated."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        yield


def providers(paths: list[Path], size: int, crop: int | None, stride: int, batch: int, device: str) -> dict:
    """name -> a function of no arguments that processes every file of ``paths`` once and returns
    the last output (the benchmark's test checks it)."""
    from PIL import Image
    from torchvision.io import decode_jpeg

    from fastcolor.data import (
        ColorizationDataset,
        CropMirror,
        DeviceStage,
        ImageItem,
        collate_bytes,
        draft_jpeg,
        lab_batch,
        read_bytes,
    )

    root = paths[0].parent
    items = [ImageItem(p.name, "x") for p in paths]
    cm = CropMirror(crop, mirror=True)
    rgb = ColorizationDataset(root, items, size, stride, cm, output="rgb")
    lab = ColorizationDataset(root, items, size, stride, cm, output="lab")

    def pil_decode():
        for p in paths:
            with Image.open(p) as im:
                im.load()
        return im

    def pil_draft():
        for p in paths:
            with Image.open(p) as im:
                draft_jpeg(im, 2 * size)
                im.load()
        return im

    def torchvision_decode():
        with _quiet():
            return [decode_jpeg(read_bytes(p)) for p in paths][-1]

    def worker():
        return [rgb.load(i)["rgb"] for i in range(len(paths))][-1]

    def whole():
        return [lab.load(i) for i in range(len(paths))][-1]

    def whole_batched():
        out = None
        for s in range(0, len(paths), batch):
            x = torch.stack([rgb.load(i)["rgb"] for i in range(s, min(s + batch, len(paths)))])
            out = lab_batch(x, stride)
        return out

    out = {"pil_decode": pil_decode, "pil_draft": pil_draft, "torchvision": torchvision_decode, "worker": worker,
           "whole": whole, "whole_batched": whole_batched}
    if torch.device(device).type == "cuda":
        raw = ColorizationDataset(root, items, size, stride, output="bytes")
        batches = [collate_bytes([raw.load(i) for i in range(s, min(s + batch, len(paths)))])
                   for s in range(0, len(paths), batch)]  # the bytes as the workers hand them over
        decoder = DeviceStage(device, stride, size=size)
        stage = DeviceStage(device, stride, size=size, crop_mirror=cm)

        def nvjpeg():
            with _quiet():
                x = [decoder.rgb(b)[0] for b in batches][-1]
            torch.cuda.synchronize()
            return x

        def nvjpeg_whole():
            with _quiet():
                x = [stage(b) for b in batches][-1]
            torch.cuda.synchronize()
            return x

        out.update(nvjpeg=nvjpeg, nvjpeg_whole=nvjpeg_whole)
    return out


@contextlib.contextmanager
def one_thread():
    """torch on one thread, as in a DataLoader worker."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def time_providers(fns: dict, n_images: int, rounds: int) -> dict:
    """Round-robin: every round runs every provider once over all files (the order rotated); per
    provider the median images/s over the rounds, after one untimed round."""
    names = list(fns)
    times: dict[str, list[float]] = {k: [] for k in names}
    with one_thread():
        for r in range(rounds + 1):
            for j in range(len(names)):
                name = names[(j + r) % len(names)]
                t0 = time.perf_counter()
                fns[name]()
                if r:
                    times[name].append(time.perf_counter() - t0)
    return {k: dict(images_per_s=n_images / statistics.median(v), rounds=len(v)) for k, v in times.items()}


def run_loader(device: str, images: int, rounds: int, size: int, crop: int | None, stride: int, batch: int,
               sets=tuple(SETS)) -> dict:
    """Every provider on every set; images/s and the share of the decode floor's."""
    res = dict(kind="loader", device=device, size=size, crop=crop, stride=stride, batch=batch, sets={})
    with tempfile.TemporaryDirectory(prefix="fastcolor-loader-") as tmp:
        for kind in sets:
            n = images if kind == "imagenet" else max(2, images // 8)
            paths = make_jpegs(Path(tmp) / kind, kind, n)
            mb = sum(p.stat().st_size for p in paths) / n / 2**20
            t0 = time.time()
            rows = time_providers(providers(paths, size, crop, stride, batch, device), n, rounds)
            floor = rows[FLOOR]["images_per_s"]
            for rec in rows.values():
                rec["of_floor"] = rec["images_per_s"] / floor
            res["sets"][kind] = dict(images=n, mean_mib=mb, rows=rows, seconds=time.time() - t0)
            log(f"[loader] {kind}: " + ", ".join(f"{k} {v['images_per_s']:.0f}/s" for k, v in rows.items()))
    return res


def loader_table(res: dict) -> str:
    sets = list(res["sets"])
    head = "| provider | " + " | ".join(f"{k} images/s per worker | % of {FLOOR}" for k in sets) + " |"
    lines = [f"Data path per worker (one process, one thread; square {res['size']}, crop {res['crop']}, "
             f"target stride {res['stride']}, batch {res['batch']}; "
             + ", ".join(f"{k}: {v['images']} JPEGs of {v['mean_mib']:.2f} MiB" for k, v in res["sets"].items())
             + ")", "", head, "|---" * (1 + 2 * len(sets)) + "|"]
    names = list(next(iter(res["sets"].values()))["rows"])
    for name in names:
        cells = []
        for k in sets:
            r = res["sets"][k]["rows"][name]
            cells.append(f"{r['images_per_s']:.0f} | {100 * r['of_floor']:.0f}%")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the step from files


def run_train_files(data: str, device: str, model_name: str, batch: int, steps: int, workers: int,
                    decodes: tuple[str, ...] = ("auto",), seed: int = 0) -> dict:
    """The Adam step of ``model_name`` (:data:`fastcolor.app.bench.train_step.MODELS`) fed from the
    images in ``data``, once per entry of ``decodes`` (``"cpu"``: PIL in the workers; ``"gpu"``:
    bytes in the workers, nvjpeg on the device), against the same step on one batch already on
    the device (the floor)."""
    import fastcolor as fc
    from fastcolor.app.bench.train_step import BETAS, LR, MODELS
    from fastcolor.data import ColorizationDataset, CropMirror, DeviceStage, collate_bytes, list_images, resolve_decode
    from fastcolor.gamut import Q

    make, px = MODELS[model_name]
    size, crop = (256, 176) if model_name == "zhang" else (px, None)  # zhang: the zhang2016 recipe's crops
    items = list_images(data)
    torch.manual_seed(seed)
    model = make().to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=LR, betas=BETAS)
    weights = torch.ones(Q, device=device)
    cuda = torch.device(device).type == "cuda"
    stride = model.output_stride

    def step(b):
        opt.zero_grad(set_to_none=True)
        loss = fc.rebalanced_cross_entropy(model(b["L"]), b["ab"], weights)
        loss.backward()
        opt.step()

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def timed(fn) -> float:
        fn()  # untimed: Adam's state, the allocator, the workers started
        sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        sync()
        return (time.perf_counter() - t0) / steps

    res = dict(kind="train_files", device=device, model=model_name, size=size, crop=crop, batch=batch, steps=steps,
               workers=workers, images=len(items), rows={})
    first = None
    for decode in decodes:
        how = resolve_decode(decode, device, [it.path for it in items])
        ds = ColorizationDataset(data, items, size, stride, output="bytes" if how == "gpu" else "rgb")
        stage = DeviceStage(device, stride, size=size, crop_mirror=CropMirror(crop, mirror=True))
        loader = torch.utils.data.DataLoader(
            ds, batch_size=batch, shuffle=True, num_workers=workers, pin_memory=cuda, drop_last=True,
            persistent_workers=workers > 0, prefetch_factor=4 if workers else None,
            collate_fn=collate_bytes if how == "gpu" else None, generator=torch.Generator().manual_seed(seed))

        def endless(loader=loader):
            while True:
                yield from loader

        it = endless()
        first = first or stage(next(it))
        s = timed(lambda it=it, stage=stage: step(stage(next(it))))
        res["rows"][f"files, decode {how}"] = dict(ms=s * 1e3, images_per_s=batch / s)
        del it, loader
    floor = timed(lambda: step(first))
    res["rows"]["memory (the floor)"] = dict(ms=floor * 1e3, images_per_s=batch / floor)
    for rec in res["rows"].values():
        rec["above_floor"] = rec["ms"] / (floor * 1e3) - 1
    return res


def train_files_table(r: dict) -> str:
    lines = [f"Training step from files ({r['model']}, square {r['size']}, crop {r['crop']}, batch {r['batch']}, "
             f"{r['steps']} steps each, {r['workers']} workers, {r['images']} images, {r['device']})", "",
             "| fed from | ms per step | images/s | over the floor |", "|---|---|---|---|"]
    for name, rec in r["rows"].items():
        lines.append(f"| {name} | {rec['ms']:.1f} | {rec['images_per_s']:.1f} | {100 * rec['above_floor']:+.1f}% |")
    return "\n".join(lines)


def _decoder_versions() -> dict:
    """The versions of what decodes and converts: Pillow (and its libjpeg), torchvision, kornia."""
    import kornia
    import PIL
    import torchvision
    from PIL import features

    return dict(pillow=PIL.__version__, pillow_libjpeg=features.version("jpg"),
                libjpeg_turbo=features.check_feature("libjpeg_turbo"), torchvision=torchvision.__version__,
                kornia=kornia.__version__)


def main(argv=None) -> int:
    """``fastcolor bench --loader`` / ``--train-step --data DIR`` (see the module's docstring)."""
    from fastcolor.data import DECODES

    ap = argparse.ArgumentParser(prog="python -m fastcolor.bench --loader",
                                 description="images/s of the data path; the training step from files")
    ap.add_argument("--loader", action="store_true", help="the per-worker table of the data path")
    ap.add_argument("--train-step", action="store_true", help="with --data: the step from files against the floor")
    ap.add_argument("--data", default=None, help="a folder of images for --train-step")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH")
    ap.add_argument("--images", type=int, default=48, help="--loader: ImageNet-like JPEGs (12 MP: an eighth)")
    ap.add_argument("--rounds", type=int, default=3, help="--loader: timed rounds (the median is kept)")
    ap.add_argument("--size", type=int, default=256, help="--loader: the square (default: zhang2016's 256)")
    ap.add_argument("--crop", type=int, default=176, help="--loader: the crop (default: zhang2016's 176; 0: none)")
    ap.add_argument("--batch", type=int, default=None, help="batch size (default: 32 for --loader; step: 16 on "
                    "the CPU, 40 on cuda)")
    ap.add_argument("--model", choices=["zhang", "small", "tiny"], default=None,
                    help="--train-step: default small on the CPU, zhang (zhang2016's crops) on cuda")
    ap.add_argument("--steps", type=int, default=None, help="--train-step: timed steps each (default 5 CPU, 30 cuda)")
    ap.add_argument("--workers", type=int, default=2, help="--train-step: DataLoader workers")
    ap.add_argument("--decode", choices=(*DECODES, "both"), default=None,
                    help="--train-step: where JPEGs are decoded (default: both on cuda: nvjpeg, then CPU workers; "
                         "else cpu)")
    ap.add_argument("--make-images", type=int, default=0, metavar="N",
                    help="--train-step: first write N ImageNet-like JPEGs into --data (an empty or new folder)")
    ap.add_argument("--quick", action="store_true", help="--loader: 8 images, 1 round (tests)")
    args, _ = ap.parse_known_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is available here; use --device cpu")
    cuda = args.device == "cuda"
    if args.train_step:
        if not args.data:
            ap.error("--train-step --data DIR: expected a folder of images with --data, got none")
        if args.make_images:
            if Path(args.data).exists() and any(Path(args.data).iterdir()):
                ap.error(f"--make-images: --data must be a new or empty folder, got {args.data!r} (not empty)")
            make_jpegs(args.data, "imagenet", args.make_images)
        decode = args.decode or ("both" if cuda else "cpu")
        res = run_train_files(args.data, args.device, args.model or ("zhang" if cuda else "small"),
                              args.batch or (40 if cuda else 16), args.steps or (30 if cuda else 5), args.workers,
                              ("gpu", "cpu") if decode == "both" else (decode,))
        table = train_files_table(res)
    else:
        images, rounds = (8, 1) if args.quick else (args.images, args.rounds)
        res = run_loader(args.device, images, rounds, args.size, args.crop or None, 4, args.batch or 32)
        table = loader_table(res)
    res["meta"] = meta(args.device)
    res["meta"].update(_decoder_versions())
    res["table"] = table
    if args.json:
        text = json.dumps(res, indent=1, default=str)
        if args.json == "-":
            print(text)
        else:
            from fastcolor.io import atomic_write_text

            atomic_write_text(args.json, text)
    print(table, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
