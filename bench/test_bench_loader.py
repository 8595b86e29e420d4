"""The data path per worker with pytest-benchmark (issue 20.6): the PIL decode floor, PIL with
draft, torchvision's decoder, fastcolor's worker (uint8 crops) and whole path (+ Lab and target),
on ImageNet-like and 12-megapixel JPEGs made from the bundled photos (see
:mod:`fastcolor.app.bench.loader`), one thread, grouped per photo set so that the table compares
the providers. nvjpeg's rows run where CUDA is.

    pytest bench/test_bench_loader.py --benchmark-only

The table quoted in bench/RESULTS.md comes from ``fastcolor bench --loader``, which runs the
providers round-robin in one process.
"""
from __future__ import annotations

import pytest
import torch

from fastcolor.app.bench import loader as lb

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NAMES = lb.CPU_PROVIDERS + (lb.CUDA_PROVIDERS if DEVICE == "cuda" else ())
IMAGES = {"imagenet": 16, "12mp": 2}
SIZE, CROP, STRIDE, BATCH = 256, 176, 4, 8


@pytest.fixture(scope="module")
def provider_sets(tmp_path_factory):
    out = {}
    for kind, n in IMAGES.items():
        paths = lb.make_jpegs(tmp_path_factory.mktemp(kind), kind, n)
        out[kind] = lb.providers(paths, SIZE, CROP, STRIDE, BATCH, DEVICE)
    return out


@pytest.mark.parametrize("kind", list(IMAGES))
@pytest.mark.parametrize("name", NAMES)
def test_loader(benchmark, provider_sets, kind, name):
    benchmark.group = f"{kind}: {IMAGES[kind]} JPEGs per round"
    fn = provider_sets[kind][name]
    with lb.one_thread():
        out = benchmark.pedantic(fn, rounds=3, warmup_rounds=1)
    if name in ("worker", "nvjpeg"):
        assert out.dtype == torch.uint8 and out.shape[-3:] == ((3, CROP, CROP) if name == "worker" else (3, SIZE, SIZE))
    elif name in ("whole", "whole_batched", "nvjpeg_whole"):
        L = out["L"] if isinstance(out, dict) else out[0]
        assert L.shape[-2:] == (CROP, CROP) and 0 <= float(L.min()) and float(L.max()) <= 100.01
    else:
        assert min(out.size if hasattr(out, "size") and not callable(out.size) else out.shape[-2:]) > 0
