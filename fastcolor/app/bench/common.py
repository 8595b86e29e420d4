"""What every part of the benchmark shares: the shapes, the inputs, error measures, the log and
the time budget."""
from __future__ import annotations

import contextlib
import os
import sys
import time

import numpy as np
import torch

from fastcolor.gamut import Q

#: name -> (logits shape for loss/decode, decode-only shape or None)
SHAPES = {
    "zhang": (40, Q, 64, 64),
    "seed": (100, Q, 32, 32),
    "full": (4, Q, 512, 512),
    "full1": (1, Q, 1024, 1024),
    "cpu": (4, Q, 64, 64),  # the default of --device cpu: a tenth of Zhang's batch
    "large": (64, Q, 128, 128),  # the per-mode table (modes.py): 64 images of 512 px
}
QUICK_SHAPES = {"tiny": (2, Q, 8, 8), "odd": (1, Q, 5, 7)}
#: which shapes each op is timed at (full1 = the full-resolution decode of one image)
OPS_SHAPES = {
    "loss_fwd": ("zhang", "seed", "full"),
    "loss_fwdbwd": ("zhang", "seed", "full"),
    "decode": ("zhang", "seed", "full1"),
    "encode": ("zhang", "full"),
}
#: run order: the baseline and the precompiled backend first, triton (compilation, then its sweep,
#: the lowest priority of all) last, so that a slow compile never costs the others their numbers
PROVIDERS = {"cuda": ("torch", "cuda", "triton"), "cpu": ("cpp", "numba", "torch", "triton")}
T_DECODE = 0.38
K_TIMED = 5
#: The opt-in triton kernels, measured beside the defaults: provider name -> (environment, the ops
#: it changes). A name ``backend:variant`` runs ``backend`` with that environment set.
VARIANTS = {
    "triton:persistent": ({"FASTCOLOR_TRITON_LOSS": "persistent"}, ("loss_fwd", "loss_fwdbwd")),
    "triton:stream": ({"FASTCOLOR_TRITON_DECODE": "stream"}, ("decode",)),
}
#: The versions fastcolor supports (README, "Requirements"; pyproject.toml): Python 3.11-3.12 (both
#: ends inclusive), torch >= 2.11, triton >= 3.6 (the lent GPUs' image: Python 3.12, torch 2.11,
#: triton 3.6; this repository's CI: Python 3.11, torch 2.14, triton 3.8).
SUPPORTED = {"python": ((3, 11), (3, 12)), "torch": (2, 11), "triton": (3, 6)}


def _python_version() -> tuple[int, int]:
    return sys.version_info[:2]


def _major_minor(version: str) -> tuple[int, int] | None:
    parts = version.split("+")[0].split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return None


def version_problems() -> list[str]:
    """What runs here outside :data:`SUPPORTED`, one line each (empty when all is supported)."""
    out = []
    lo, hi = SUPPORTED["python"]
    py = _python_version()
    if not lo <= py <= hi:
        out.append(f"Python {py[0]}.{py[1]} is not supported (3.{lo[1]}-3.{hi[1]})")
    versions = {"torch": torch.__version__}
    try:
        import triton

        versions["triton"] = triton.__version__
    except ImportError:
        pass
    for name, version in versions.items():
        mm = _major_minor(version)
        want = SUPPORTED[name]
        if mm is None or mm < want:
            out.append(f"{name} {version} is older than supported (>= {want[0]}.{want[1]})")
    return out


def backend_of(provider: str) -> str:
    """The backend name of a provider (``"triton:persistent"`` -> ``"triton"``)."""
    return provider.split(":", 1)[0]


@contextlib.contextmanager
def variant_env(provider: str):
    """The environment of an opt-in variant of :data:`VARIANTS` (nothing for a plain backend),
    restored afterwards."""
    env = VARIANTS.get(provider, ({}, ()))[0]
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def log(*a):
    """Progress on stderr (stdout carries the JSON and the table)."""
    print(*a, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- inputs


def srgb_ab(n: int, h: int, w: int, device, gen: torch.Generator) -> torch.Tensor:
    """ab (float32 (N, 2, H, W)) of random sRGB colours: realistic targets for timing."""
    rgb = torch.rand(n, 3, h, w, generator=gen, device="cpu").to(device)
    c = torch.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    m = torch.tensor([[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750],
                      [0.0193339, 0.1191920, 0.9503041]], device=device)
    xyz = torch.einsum("ij,njhw->nihw", m, c) / torch.tensor([0.95047, 1.0, 1.08883], device=device)[:, None, None]
    f = torch.where(xyz > 0.008856, xyz.clamp_min(1e-12) ** (1 / 3), 7.787 * xyz + 16 / 116)
    return torch.stack([500 * (f[:, 0] - f[:, 1]), 200 * (f[:, 1] - f[:, 2])], 1).float()


def wide_ab(n, h, w, gen, spread=130.0):
    """ab over and beyond the gamut (CPU, float32): exercises every path of the k-NN search."""
    return (torch.rand(n, 2, h, w, generator=gen) * 2 - 1) * spread


def rand_logits(shape, dtype, gen, scale=4.0):
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)


# ----------------------------------------------------------------------------- helpers


def rel_err(got, want) -> float:
    """``||got - want|| / ||want||`` over the finite elements of ``want``; NaN where the two differ
    in which elements are finite, inf where their shapes differ."""
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    if got.shape != want.shape:
        return float("inf")
    if not np.all(np.isfinite(got) == np.isfinite(want)):
        return float("nan")
    fin = np.isfinite(want)
    num = np.linalg.norm((got - want)[fin])
    den = np.linalg.norm(want[fin])
    return float(num / den) if den > 0 else float(num)


def poison(device, nbytes: int) -> None:
    """Fill free memory of the caching allocator with NaN, so that the next allocations of about
    this size start out NaN and an unwritten element fails the NaN check."""
    if device != "cuda" or nbytes <= 0:
        return
    try:
        t = torch.full((nbytes // 4 + 1024,), float("nan"), device="cuda")
        del t
    except torch.OutOfMemoryError:
        pass


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


class Budget:
    """The wall-clock deadline (``time.time()``) by which the run must end."""

    def __init__(self, deadline: float):
        self.deadline = deadline

    def left(self) -> float:
        return self.deadline - time.time()

    def ok(self, need_s: float = 0.0) -> bool:
        return self.left() > need_s


def shape_of(s):
    """The logits shape of a name of :data:`SHAPES` or :data:`QUICK_SHAPES`."""
    return QUICK_SHAPES.get(s) or SHAPES[s]
