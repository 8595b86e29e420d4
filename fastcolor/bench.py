"""Correctness and speed of every backend in one run: ``python -m fastcolor.bench --device cuda --json out.json``.

Written to be run once on a lent GPU (it must yield all its data in one go, in a few minutes):

1. **Correctness** of every available backend (triton, cuda, torch on the GPU; cpp, numba, torch,
   and triton under ``TRITON_INTERPRET=1`` on the CPU) against :mod:`fastcolor.reference` on fresh
   random inputs: odd shapes, float32/float16/bfloat16 logits, k in {1, 5, 10}, class weights,
   every reduction, nongray, grad_output != 1, precomputed targets, channels-last logits, the
   backend contract with a pixel scale; relative errors ``||out - ref|| / ||ref||`` and NaN
   checks, with the CUDA caching allocator's free memory poisoned with NaN before each call so
   that an element a kernel forgets to write shows up.
2. **Timings** (median of ``triton.testing.do_bench``, L2 flushed between runs; CPU: wall clock):
   fused loss forward, forward + backward, annealed-mean decode, soft-encode, per backend, and
   ``torch.log_softmax`` / ``torch.softmax`` as yardsticks, at Zhang et al.'s training shape
   (40, 313, 64, 64), the seed's (100, 313, 32, 32) and full resolution (4, 313, 512, 512) /
   (1, 313, 1024, 1024), in float32 and bfloat16.
3. **Bandwidth**: the bytes each op must move (logits read once, gradient written once, plus the
   small per-pixel inputs and outputs) per second, against the card's peak, measured in the same
   run by a large device-to-device copy.
4. **Peak memory** of loss forward + backward (``max_memory_allocated`` above the inputs) against
   the size of the gradient.
5. For the triton backend: a small launch-config sweep, fused vs separate encoding, and offsets
   beyond 2**31 elements.

On CUDA each backend runs in its own child process (``--no-isolate`` to run in-process), so that
a crash or a corrupted CUDA context in one backend costs only that backend's numbers; any error
is printed and recorded, and the run goes on. A time budget (``--budget-s``) drops the
lower-priority measurements when compilation is slow. The last thing printed is a markdown
table; ``--json [PATH]`` writes everything (to stdout when no path is given, before the table).

``--quick`` uses tiny shapes (for tests, and for ``--device cpu`` through the interpreter);
``--device cpu`` alone times (4, 313, 64, 64); ``--shapes zhang,seed`` picks shapes;
``--providers triton,torch`` picks backends.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
import traceback

import numpy as np
import torch

import fastcolor as fc
from fastcolor import backends
from fastcolor import reference as R
from fastcolor.gamut import Q

#: name -> (logits shape for loss/decode, decode-only shape or None)
SHAPES = {
    "zhang": (40, Q, 64, 64),
    "seed": (100, Q, 32, 32),
    "full": (4, Q, 512, 512),
    "full1": (1, Q, 1024, 1024),
    "cpu": (4, Q, 64, 64),  # the default of --device cpu: a tenth of Zhang's batch
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


def log(*a):
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


def bench_ms(fn, device, grad_to_none=None, rep_ms=60, warmup_ms=15, quick=False) -> float:
    """Median milliseconds of fn (device events and an L2 flush on CUDA; wall clock on the CPU)."""
    if device == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none,
                                             return_mode="median"))
    fn()  # warm-up (compilation)
    times = []
    reps = 2 if quick else 7
    for _ in range(reps):
        if grad_to_none:
            for t in grad_to_none:
                t.grad = None
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times))


class Budget:
    def __init__(self, deadline: float):
        self.deadline = deadline

    def left(self) -> float:
        return self.deadline - time.time()

    def ok(self, need_s: float = 0.0) -> bool:
        return self.left() > need_s


# ----------------------------------------------------------------------------- correctness


def loss_cases(quick: bool):
    """(name, shape (N, H, W), dtype, k, weights, reduction, nongray, grad_output, target, layout)."""
    cases = [
        ("1x1-f32-k1-mean", (1, 1, 1), torch.float32, 1, False, "mean", False, 1.0, "ab", "contig"),
        ("7x9-f16-k5-sum-ng", (3, 7, 9), torch.float16, 5, True, "sum", True, 1.7, "ab", "contig"),
        ("33x65-bf16-k10-none", (2, 33, 65), torch.bfloat16, 10, True, "none", False, "rand", "ab", "contig"),
        ("7x9-f32-k10-labels-mean", (3, 7, 9), torch.float32, 10, True, "mean", True, 0.3, "labels", "contig"),
        ("17x31-f32-k5-mean-cl", (2, 17, 31), torch.float32, 5, True, "mean", True, 1.0, "ab", "channels_last"),
        ("17x31-bf16-k5-sum", (1, 17, 31), torch.bfloat16, 5, False, "sum", False, 2.0, "ab", "contig"),
    ]
    if quick:
        cases = [c for c in cases if c[1][1] * c[1][2] <= 63]
    return cases


def check_loss(name, case, device, gen):
    cname, (n, h, w), dtype, k, use_w, reduction, nongray, go, target, layout = case
    logits = rand_logits((n, Q, h, w), dtype, gen)
    ab = wide_ab(n, h, w, gen)
    if nongray and n > 1:
        ab[0] /= 40  # a grey image
    weights = torch.rand(Q, generator=gen) * 4 + 0.1 if use_w else None
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = logits.to(device).clone(memory_format=fmt).requires_grad_(True)
    tgt = ab.to(device)
    target_ab = None
    if target == "labels":
        lab = R.soft_encode(ab.double().numpy(), k)
        tgt = fc.SoftLabels(torch.tensor(lab[0], dtype=torch.int32).to(device), torch.tensor(lab[1], dtype=torch.float32).to(device))
        target_ab = ab.to(device)
    poison(device, 2 * x.numel() * x.element_size() + n * h * w * 64)
    loss = fc.rebalanced_cross_entropy(x, tgt, None if weights is None else weights.to(device), k=k,
                                       reduction=reduction, nongray=nongray, backend=name, target_ab=target_ab)
    if go == "rand":
        g = torch.rand(loss.shape, generator=gen, dtype=torch.float64) + 0.5
    else:
        g = torch.tensor(float(go), dtype=torch.float64)
    loss.backward(g.float().to(device))
    sync(device)
    want_l, want_g = R.rebalanced_cross_entropy(
        logits.double().numpy(), ab.double().numpy(), None if weights is None else weights.double().numpy(),
        k=k, reduction=reduction, nongray=nongray, grad_output=g.numpy(),
        target=None if target == "ab" else R.soft_encode(ab.double().numpy(), k))
    got_l = loss.detach().double().cpu().numpy()
    got_g = x.grad.double().cpu().numpy()
    tol_g = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    e_l, e_g = rel_err(got_l, want_l), rel_err(got_g, want_g)
    ok = (e_l <= 2e-5) and (e_g <= tol_g) and bool(np.isfinite(got_g).all()) and x.grad.dtype == dtype
    return dict(check="loss", case=cname, rel_err_loss=e_l, rel_err_grad=e_g, tol_grad=tol_g,
                nan_free=bool(np.isfinite(got_g).all() and np.isfinite(got_l).all()), ok=bool(ok))


def check_contract(name, device, gen, dtype=torch.float32, need_grad=True):
    """The backend contract called directly: pixel scale, image mask, grad_scale, need_grad."""
    n, p, k = 2, 61, 5
    logits = rand_logits((n, Q, p), dtype, gen)
    ab = wide_ab(n, 1, p, gen).reshape(n, 2, p)
    cw = torch.rand(Q, generator=gen) * 3 + 0.1
    mask = torch.tensor([1.0, 0.5])
    ps = torch.rand(n, p, generator=gen) + 0.5
    mod = backends.get(name)
    poison(device, 2 * logits.numel() * logits.element_size())
    loss, grad = mod.ce_forward(logits.to(device), ab.to(device), None, None, cw.to(device), mask.to(device), k, 5.0, 0.75,
                                need_grad, ps.to(device))
    sync(device)
    want_l, want_g = R.rebalanced_cross_entropy(logits.double().numpy(), ab.double().numpy(), cw.double().numpy(), k, reduction="none")
    scale = (mask[:, None] * ps).double().numpy()
    e_l = rel_err(loss.double().cpu().numpy(), want_l * scale)
    res = dict(check="contract", case=f"{str(dtype)[6:]}-grad{int(need_grad)}", rel_err_loss=e_l)
    ok = e_l <= 2e-5
    if need_grad:
        e_g = rel_err(grad.double().cpu().numpy(), want_g * 0.75 * scale[:, None, :])
        res["rel_err_grad"] = e_g
        ok = ok and e_g <= {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype] and grad.dtype == dtype
    else:
        ok = ok and grad is None
    res["ok"] = bool(ok)
    return res


def check_encode(name, device, gen, k, shape=(2, 33, 65)):
    n, h, w = shape
    ab = wide_ab(n, h, w, gen)
    poison(device, n * k * h * w * 8)
    lab = fc.soft_encode(ab.to(device), k=k, backend=name)
    sync(device)
    idx, wts = R.soft_encode(ab.double().numpy(), k)
    px = np.moveaxis(ab.double().numpy(), 1, -1).reshape(-1, 2)
    d2 = np.sort(((px[:, None, :] - fc.AB_BINS[None]) ** 2).sum(-1), axis=1)[:, : k + 1]
    clear = np.diff(d2, axis=1).min(1) > 1e-3 * (1 + d2[:, -1])
    gi = np.moveaxis(lab.indices.cpu().long().numpy(), 1, -1).reshape(-1, k)
    ri = np.moveaxis(idx, 1, -1).reshape(-1, k)
    mismatch = float((gi[clear] != ri[clear]).any(1).mean()) if clear.any() else 0.0
    werr = float(np.abs(lab.weights.cpu().double().numpy() - wts).max())
    ok = mismatch == 0.0 and werr <= 2e-5 and bool(np.isfinite(lab.weights.cpu().numpy()).all())
    return dict(check="encode", case=f"k{k}-{n}x{h}x{w}", index_mismatch=mismatch, max_abs_err_weights=werr, ok=bool(ok))


def check_decode(name, device, gen, dtype, T, probs=False, shape=(2, 33, 65)):
    n, h, w = shape
    x64 = torch.randn(n, Q, h, w, generator=gen, dtype=torch.float64) * 2
    if probs:
        x = torch.softmax(x64, 1).to(dtype)
        got = fc.annealed_mean(probs=x.to(device), T=T, backend=name)
        want = R.annealed_mean(probs=x.double().numpy(), T=T)
    else:
        x = x64.to(dtype)
        poison(device, n * 2 * h * w * 4 + 4096)
        got = fc.annealed_mean(x.to(device), T=T, backend=name)
        want = R.annealed_mean(x.double().numpy(), T=T)
    sync(device)
    e = rel_err(got.double().cpu().numpy(), want)
    tol = 1e-4
    return dict(check="decode", case=f"{'probs' if probs else 'logits'}-{str(dtype)[6:]}-T{T}", rel_err=e, tol=tol,
                ok=bool(e <= tol))


def correctness(name, device, quick, gen, budget: Budget):
    out = []
    dtypes = [torch.float32, torch.float16] + ([torch.bfloat16] if device == "cuda" else [])

    def run(fn, *a, **kw):
        check = fn.__name__.replace("check_", "")
        label = f"{check}{a[3:] if len(a) > 3 else ''}"
        if not budget.ok(5):
            out.append(dict(check=check, case=label, ok=None, skipped="time budget"))
            return
        try:
            r = fn(*a, **kw)
        except Exception as exc:  # noqa: BLE001 - record and go on
            log(f"[{name}] {label} FAILED: {exc!r}")
            log(traceback.format_exc(limit=4))
            r = dict(check=check, case=label, ok=False, error=repr(exc)[:500])
        out.append(r)
        if not r.get("ok"):
            log(f"[{name}] {r}")

    for case in loss_cases(quick):
        if case[2] in dtypes:
            run(check_loss, name, case, device, gen)
    run(check_contract, name, device, gen, torch.float32, True)
    run(check_contract, name, device, gen, dtypes[-1], False)
    small = (1, 7, 9) if quick else (2, 33, 65)
    for k in (1, 5, 10):
        run(check_encode, name, device, gen, k, small)
    for dtype, T in [(torch.float32, 0.01), (dtypes[-1], 0.38), (torch.float16, 1.0)]:
        run(check_decode, name, device, gen, dtype, T, False, small)
    run(check_decode, name, device, gen, torch.float16, 0.38, True, small)
    return out


# ----------------------------------------------------------------------------- timing


def op_bytes(op, shape, dtype, k=K_TIMED):
    """The fewest bytes the op must move through device memory."""
    n, q, h, w = shape
    px = n * h * w
    es = torch.tensor([], dtype=dtype).element_size()
    logits = px * q * es
    if op == "loss_fwd":
        return logits + px * 8 + px * 4  # logits, ab, per-pixel loss
    if op == "loss_fwdbwd":
        return 2 * logits + px * 8 + px * 4
    if op == "decode":
        return logits + px * 8
    if op == "encode":
        return px * 8 + px * k * 8
    if op in ("log_softmax", "softmax"):
        return 2 * logits
    raise ValueError(op)


def make_timing_inputs(shape, dtype, device, seed):
    n, q, h, w = shape
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=torch.Generator(device=device).manual_seed(seed), device=device, dtype=torch.float32) * 3).to(dtype)
    ab = srgb_ab(n, h, w, device, gen)
    weights = (torch.rand(Q, generator=gen) * 4 + 0.1).to(device)
    return x, ab, weights


def time_op(name, op, shape, dtype, device, quick, budget):
    """Milliseconds of one op through the public API of backend ``name``."""
    x, ab, weights = make_timing_inputs(shape, dtype, device, seed=hash((op, shape)) % 2**31)
    if op == "loss_fwd":
        def fn():
            with torch.no_grad():
                return fc.rebalanced_cross_entropy(x, ab, weights, k=K_TIMED, backend=name)
        return bench_ms(fn, device, quick=quick)
    if op == "loss_fwdbwd":
        xr = x.detach().requires_grad_(True)

        def fn():
            fc.rebalanced_cross_entropy(xr, ab, weights, k=K_TIMED, backend=name).backward()
        return bench_ms(fn, device, grad_to_none=[xr], quick=quick)
    if op == "decode":
        return bench_ms(lambda: fc.annealed_mean(x, T=T_DECODE, backend=name), device, quick=quick)
    if op == "encode":
        return bench_ms(lambda: fc.soft_encode(ab, k=K_TIMED, backend=name), device, quick=quick)
    if op == "log_softmax":
        return bench_ms(lambda: torch.log_softmax(x, 1), device, quick=quick)
    if op == "softmax":
        return bench_ms(lambda: torch.softmax(x, 1), device, quick=quick)
    raise ValueError(op)


def peak_memory(name, shape, dtype, device):
    """Bytes allocated above the inputs during loss forward + backward, and the gradient's size."""
    x, ab, weights = make_timing_inputs(shape, dtype, device, seed=1)
    xr = x.detach().requires_grad_(True)
    fc.rebalanced_cross_entropy(xr, ab, weights, k=K_TIMED, backend=name).backward()  # warm-up / compile
    xr.grad = None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fc.rebalanced_cross_entropy(xr, ab, weights, k=K_TIMED, backend=name).backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    grad_bytes = xr.numel() * xr.element_size()
    n, _, h, w = shape
    return dict(provider=name, shape=list(shape), dtype=str(dtype)[6:], peak_bytes=int(peak), grad_bytes=int(grad_bytes),
                extra_bytes=int(peak - grad_bytes), extra_per_pixel=float((peak - grad_bytes) / (n * h * w)),
                ratio=float(peak / grad_bytes))


def timing_plan(quick, shapes_arg, device="cuda"):
    if quick:
        return [(op, s) for op in ("loss_fwd", "loss_fwdbwd", "decode", "encode") for s in QUICK_SHAPES]
    if device == "cpu" and shapes_arg is None:
        return [(op, "cpu") for op in OPS_SHAPES]
    plan = []
    for op, names in OPS_SHAPES.items():
        for s in names:
            if shapes_arg is None or s in shapes_arg or (s == "full1" and "full" in shapes_arg):
                plan.append((op, s))
    # most important first: Zhang's shape for every op, then the rest
    plan.sort(key=lambda t: (t[1] != "zhang", list(OPS_SHAPES).index(t[0])))
    return plan


def shape_of(s):
    return QUICK_SHAPES.get(s) or SHAPES[s]


def timings(name, device, quick, shapes_arg, budget):
    out = []
    dtypes = [torch.float32, torch.bfloat16] if device == "cuda" else [torch.float32]
    for op, s in timing_plan(quick, shapes_arg, device):
        for dtype in dtypes:
            if op == "encode" and dtype != torch.float32:
                continue
            shape = shape_of(s)
            rec = dict(op=op, shape_name=s, shape=list(shape), dtype=str(dtype)[6:], provider=name)
            if not budget.ok(10):
                rec["skipped"] = "time budget"
                out.append(rec)
                continue
            try:
                ms = time_op(name, op, shape, dtype, device, quick, budget)
                rec.update(ms=ms, bytes=op_bytes(op, shape, dtype), gbps=op_bytes(op, shape, dtype) / ms / 1e6)
                log(f"[{name}] {op} {s} {rec['dtype']}: {ms:.4f} ms, {rec['gbps']:.0f} GB/s")
            except Exception as exc:  # noqa: BLE001
                rec["error"] = repr(exc)[:500]
                log(f"[{name}] {op} {s} {rec['dtype']} FAILED: {exc!r}")
                if device == "cuda" and "CUDA error" in repr(exc):
                    raise
            finally:
                if device == "cuda":
                    torch.cuda.empty_cache()
            out.append(rec)
    return out


# ----------------------------------------------------------------------------- the parts


def part_base(device, quick, shapes_arg, budget):
    """Peak copy bandwidth and the torch yardsticks."""
    res = {"yardsticks": []}
    if device == "cuda":
        import triton.testing

        nbytes = 256 << 20 if quick else 2 << 30
        src = torch.empty(nbytes // 4, device="cuda").fill_(1.0)
        dst = torch.empty_like(src)
        ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=10, rep=60, return_mode="median")
        res["peak_copy"] = dict(bytes=2 * nbytes, ms=float(ms), gbps=2 * nbytes / ms / 1e6)
        log(f"[base] device-to-device copy: {res['peak_copy']['gbps']:.0f} GB/s")
        del src, dst
        torch.cuda.empty_cache()
    if quick:
        names = list(QUICK_SHAPES)
    elif device == "cpu" and shapes_arg is None:
        names = ["cpu"]
    else:
        names = [s for s in ("zhang", "seed", "full") if shapes_arg is None or s in shapes_arg]
    dtypes = [torch.float32, torch.bfloat16] if device == "cuda" else [torch.float32]
    for s in names:
        for dtype in dtypes:
            for op in ("log_softmax", "softmax"):
                if not budget.ok(5):
                    break
                shape = shape_of(s)
                try:
                    ms = time_op("torch", op, shape, dtype, device, quick, budget)
                    res["yardsticks"].append(dict(op=op, shape_name=s, shape=list(shape), dtype=str(dtype)[6:], ms=ms,
                                                  bytes=op_bytes(op, shape, dtype), gbps=op_bytes(op, shape, dtype) / ms / 1e6))
                except Exception as exc:  # noqa: BLE001
                    res["yardsticks"].append(dict(op=op, shape_name=s, dtype=str(dtype)[6:], error=repr(exc)[:300]))
    return res


def triton_extras(device, quick, budget):
    """Launch-config sweep, fused vs separate encoding, offsets beyond 2**31 (GPU only)."""
    from fastcolor.backends import triton_backend as tb

    res = {"sweep": [], "int64": None}
    if device != "cuda":
        return res
    # offsets beyond int32: 7 x 313 x 2**20 bf16 logits (4.6 GB) + gradient
    free, _ = torch.cuda.mem_get_info()
    if budget.ok(30) and free > 12e9:
        try:
            n, p = 7, 1 << 20
            x = torch.randn(n, Q, p, device="cuda", dtype=torch.bfloat16)
            ab = srgb_ab(n, 1, p, "cuda", torch.Generator().manual_seed(0)).reshape(n, 2, p).contiguous()
            loss, grad = tb.ce_forward(x, ab, None, None, None, None, 5, 5.0, 1.0, True)
            l1, g1 = tb.ce_forward(x[-1:].contiguous(), ab[-1:].contiguous(), None, None, None, None, 5, 5.0, 1.0, True)
            d_full = tb.annealed_mean(x, 0.38, False)[-1:]
            d_one = tb.annealed_mean(x[-1:].contiguous(), 0.38, False)
            res["int64"] = dict(elements=n * Q * p, loss_equal=bool(torch.equal(loss[-1:], l1)),
                                grad_equal=bool(torch.equal(grad[-1:], g1)), decode_equal=bool(torch.equal(d_full, d_one)))
            res["int64"]["ok"] = all(res["int64"][key] for key in ("loss_equal", "grad_equal", "decode_equal"))
            log(f"[triton] offsets beyond 2**31: {res['int64']}")
            del x, ab, loss, grad, l1, g1
        except Exception as exc:  # noqa: BLE001
            res["int64"] = dict(ok=False, error=repr(exc)[:500])
            log(f"[triton] int64 check FAILED: {exc!r}")
        torch.cuda.empty_cache()
    shape = SHAPES["zhang"]
    # most informative first, both dtypes at each step, so that a cut budget still leaves pairs
    specs = [("ce", None, "fused", 5), ("ce", None, "separate", 5), ("ce", None, "fused", 10), ("ce", None, "separate", 10),
             ("ce", (32, 4, None), "fused", 5), ("ce", (64, 8, None), "fused", 5), ("am", None, None, None),
             ("am", (32, 4, 168), None, None), ("am", (64, 8, None), None, None), ("ce", (16, 4, None), "fused", 5)]
    variants = [(kind, dtype, cfg, mode, k) for kind, cfg, mode, k in specs for dtype in (torch.float32, torch.bfloat16)]
    for kind, dtype, cfg, mode, k in variants:
        rec = dict(kernel=kind, dtype=str(dtype)[6:], config=list(cfg) if cfg else list(tb.config(kind, dtype)),
                   default=cfg is None, encode=mode, k=k)
        if not budget.ok(15):
            rec["skipped"] = "time budget"
            res["sweep"].append(rec)
            continue
        try:
            x, ab, weights = make_timing_inputs(shape, dtype, device, seed=3)
            n, _, h, w = shape
            xf, abf = x.reshape(n, Q, h * w), ab.reshape(n, 2, h * w)
            if cfg:
                tb.CONFIG_OVERRIDE[kind] = cfg
            old_mode = os.environ.get("FASTCOLOR_TRITON_ENCODE")
            if mode:
                os.environ["FASTCOLOR_TRITON_ENCODE"] = mode
            try:
                if kind == "ce":
                    ms = bench_ms(lambda: tb.ce_forward(xf, abf, None, None, weights, None, k, 5.0, 1.0, True), device)
                    rec["bytes"] = op_bytes("loss_fwdbwd", shape, dtype, k)
                else:
                    ms = bench_ms(lambda: tb.annealed_mean(xf, T_DECODE, False), device)
                    rec["bytes"] = op_bytes("decode", shape, dtype)
            finally:
                tb.CONFIG_OVERRIDE.pop(kind, None)
                if old_mode is None:
                    os.environ.pop("FASTCOLOR_TRITON_ENCODE", None)
                else:
                    os.environ["FASTCOLOR_TRITON_ENCODE"] = old_mode
            rec.update(ms=ms, gbps=rec["bytes"] / ms / 1e6)
            log(f"[triton sweep] {rec}")
        except Exception as exc:  # noqa: BLE001
            rec["error"] = repr(exc)[:500]
            log(f"[triton sweep] {rec}")
            if "CUDA error" in repr(exc):
                raise
        res["sweep"].append(rec)
    return res


def part_provider(name, device, quick, shapes_arg, budget, seed, checkpoint=lambda data: None):
    """Correctness, timings, peak memory (and the triton extras) of one backend. ``checkpoint`` is
    called with the results so far after each phase, so that a child killed by its timeout still
    hands back what it measured."""
    res = dict(provider=name, correctness=[], timing=[], memory=[])
    reason = backends.unavailable_reason(name, device)
    if reason is not None:
        res["unavailable"] = reason
        log(f"[{name}] unavailable: {reason}")
        return res
    gen = torch.Generator().manual_seed(seed)
    try:
        t0 = time.time()
        res["correctness"] = correctness(name, device, quick, gen, budget)
        res["correctness_s"] = time.time() - t0
        log(f"[{name}] correctness: {sum(bool(r.get('ok')) for r in res['correctness'])}/{len(res['correctness'])} ok "
            f"in {res['correctness_s']:.1f} s")
        checkpoint(res)
        res["timing"] = timings(name, device, quick, shapes_arg, budget)
        checkpoint(res)
        if device == "cuda":
            for dtype in (torch.float32, torch.bfloat16):
                if not budget.ok(10):
                    break
                try:
                    res["memory"].append(peak_memory(name, shape_of("tiny" if quick else "zhang"), dtype, device))
                    log(f"[{name}] memory: {res['memory'][-1]}")
                except Exception as exc:  # noqa: BLE001
                    res["memory"].append(dict(provider=name, dtype=str(dtype)[6:], error=repr(exc)[:300]))
                    if "CUDA error" in repr(exc):
                        raise
            checkpoint(res)
        if name == "triton":
            res.update(triton_extras(device, quick, budget))
    except Exception as exc:  # noqa: BLE001 - e.g. a CUDA error: the context is gone, keep what we have
        log(traceback.format_exc())
        res["crashed"] = repr(exc)[:1000]
    return res


def meta(device):
    info = dict(python=platform.python_version(), torch=torch.__version__, numpy=np.__version__,
                host=platform.node(), platform=platform.platform(), time=time.strftime("%Y-%m-%d %H:%M:%S"),
                fastcolor=getattr(fc, "__version__", None))
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    try:
        info["build"] = {k: v for k, v in fc.build_info().items() if isinstance(v, (str, int, float, bool, type(None)))}
    except Exception as exc:  # noqa: BLE001
        info["build"] = repr(exc)
    if device == "cuda" and torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, sm_count=p.multi_processor_count, capability=f"{p.major}.{p.minor}",
                    memory_gb=round(p.total_memory / 2**30, 1), l2_mb=round(getattr(p, "L2_cache_size", 0) / 2**20, 1))
    info["interpreter"] = os.environ.get("TRITON_INTERPRET")
    return info


# ----------------------------------------------------------------------------- report


def summarize(result):
    """Add speedups vs torch and fractions of peak bandwidth; return the markdown table."""
    peak = (result.get("base") or {}).get("peak_copy", {}).get("gbps")
    rows = {}
    for part in result.get("providers", []):
        for t in part.get("timing", []):
            if "ms" in t:
                rows.setdefault((t["op"], t["shape_name"], t["dtype"]), {})[t["provider"]] = t
    for y in (result.get("base") or {}).get("yardsticks", []):
        if "ms" in y:
            rows.setdefault((y["op"], y["shape_name"], y["dtype"]), {})["torch"] = y
    provs = [p["provider"] for p in result.get("providers", []) if "unavailable" not in p]
    fast = [p for p in provs if p != "torch"]
    lines = []
    hdr = ["op", "shape", "dtype", "torch ms"] + [f"{p} ms" for p in fast] + \
          [f"{p} x torch" for p in fast] + [f"{p} %peak" for p in fast]
    lines.append("| " + " | ".join(hdr) + " |")
    lines.append("|" + "---|" * len(hdr))
    for (op, s, dt), by in rows.items():
        t = by.get("torch", {}).get("ms")
        cells = [op, s, dt, f"{t:.3f}" if t else "-"]
        cells += [f"{by[p]['ms']:.3f}" if p in by else "-" for p in fast]
        sp = []
        for p in fast:
            if p in by and t:
                by[p]["speedup_vs_torch"] = t / by[p]["ms"]
                sp.append(f"{t / by[p]['ms']:.1f}")
            else:
                sp.append("-")
        cells += sp
        pk = []
        for p in fast:
            if p in by and peak:
                by[p]["frac_peak"] = by[p]["gbps"] / peak
                pk.append(f"{100 * by[p]['gbps'] / peak:.0f}%")
            else:
                pk.append("-")
        cells += pk
        if "torch" in by and peak:
            by["torch"]["frac_peak"] = by["torch"]["gbps"] / peak
        if op in ("log_softmax", "softmax") and peak:
            cells[3] = f"{t:.3f} ({100 * by['torch']['gbps'] / peak:.0f}%)"
        lines.append("| " + " | ".join(cells) + " |")
    out = []
    m = result.get("meta", {})
    out.append(f"### fastcolor bench: {m.get('gpu') or m.get('platform')}, torch {m.get('torch')}, triton {m.get('triton')}"
               + (f", copy peak {peak:.0f} GB/s" if peak else ""))
    for part in result.get("providers", []):
        name = part["provider"]
        if "unavailable" in part:
            out.append(f"- {name}: unavailable ({part['unavailable']})")
            continue
        if "crashed" in part:
            out.append(f"- {name}: CRASHED ({part['crashed'][-300:]})")
        cs = part.get("correctness", [])
        bad = [c for c in cs if c.get("ok") is False]
        worst_g = max([c.get("rel_err_grad", 0) or 0 for c in cs if c.get("check") == "loss"] or [0])
        line = f"- {name}: correctness {sum(bool(c.get('ok')) for c in cs)}/{len(cs)} ok"
        line += f", worst loss-grad rel err {worst_g:.1e}"
        if bad:
            line += "; FAILED: " + ", ".join(f"{c['check']}:{c['case']}" for c in bad)
        for mm in part.get("memory", []):
            if "ratio" in mm:
                line += f"; peak mem {mm['dtype']} = {mm['ratio']:.2f} x grad (+{mm['extra_per_pixel']:.0f} B/px)"
        if part.get("int64"):
            line += f"; int64 offsets {'ok' if part['int64'].get('ok') else 'FAILED'}"
        out.append(line)
        sw = [s for s in part.get("sweep", []) if "ms" in s]
        if sw:
            out.append("  - sweep (zhang): " + "; ".join(
                f"{s['kernel']} {s['dtype']} {'x'.join(str(c) for c in s['config'])}{' k' + str(s['k']) if s['k'] else ''}"
                f"{' ' + s['encode'] if s['encode'] else ''}: {s['ms']:.3f} ms" + (f" {100 * s['gbps'] / peak:.0f}%" if peak else "")
                for s in sw))
    out.append("")
    out.extend(lines)
    return "\n".join(out)


# ----------------------------------------------------------------------------- driver


def allow_triton_on_cpu():
    """Under TRITON_INTERPRET=1 the triton backend runs on CPU tensors; the registry lists it for
    cuda only (the interpreter is for tests), so add cpu for this process."""
    name, devices = backends.BACKENDS["triton"]
    if os.environ.get("TRITON_INTERPRET") == "1" and "cpu" not in devices:
        backends.BACKENDS["triton"] = (name, devices + ("cpu",))


def run_part(part, device, quick, shapes_arg, budget, seed, checkpoint=lambda data: None):
    if device == "cpu":
        allow_triton_on_cpu()
    if part == "base":
        return part_base(device, quick, shapes_arg, budget)
    return part_provider(part, device, quick, shapes_arg, budget, seed, checkpoint)


def run_isolated(part, args, deadline):
    """Run one part in a child process; return its JSON (or a record of the crash)."""
    import tempfile

    fd, path = tempfile.mkstemp(suffix=".json", prefix=f"fcbench-{part}-")
    os.close(fd)
    cmd = [sys.executable, "-m", "fastcolor.bench", "--device", args.device, "--part", part, "--json", path,
           "--deadline", str(deadline), "--seed", str(args.seed)]
    if args.quick:
        cmd.append("--quick")
    if args.shapes:
        cmd += ["--shapes", args.shapes]
    timeout = max(10.0, deadline - time.time() + 20)
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None, timeout=timeout, text=True)
        with open(path) as f:
            text = f.read()
        data = json.loads(text) if text.strip() else None
        if data is None or proc.returncode != 0:
            msg = f"child exited with {proc.returncode}"
            data = data or ({"provider": part} if part != "base" else {})
            data["crashed"] = msg
            log(f"[{part}] {msg}")
        return data
    except subprocess.TimeoutExpired:
        log(f"[{part}] child timed out after {timeout:.0f} s")
        data = _read_json(path) or ({"provider": part} if part != "base" else {})
        data["crashed"] = f"timed out after {timeout:.0f} s"
        return data
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m fastcolor.bench", description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH",
                    help="write every number as JSON to PATH (stdout when no PATH is given)")
    ap.add_argument("--quick", action="store_true", help="tiny shapes and a small matrix (tests, CPU interpreter)")
    ap.add_argument("--shapes", default=None, help=f"comma-separated subset of {sorted(SHAPES)}")
    ap.add_argument("--providers", default=None, help="comma-separated backends (default: all for the device)")
    ap.add_argument("--budget-s", type=float, default=200.0, help="wall-clock budget; lower-priority work is dropped")
    ap.add_argument("--no-isolate", action="store_true", help="run every backend in this process (default on the CPU)")
    ap.add_argument("--isolate", action="store_true", help="run every backend in a child process (default on CUDA)")
    ap.add_argument("--seed", type=int, default=int(time.time()) % 100000)
    ap.add_argument("--part", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is available (use --device cpu)")
    shapes_arg = set(args.shapes.split(",")) if args.shapes else None
    if shapes_arg and not shapes_arg <= set(SHAPES):
        ap.error(f"--shapes: expected names from {sorted(SHAPES)}, got {sorted(shapes_arg)}")
    deadline = args.deadline or (time.time() + args.budget_s)
    budget = Budget(deadline)

    if args.part:  # a child: one part, JSON out (and after each phase)
        try:
            data = run_part(args.part, args.device, args.quick, shapes_arg, budget, args.seed,
                            checkpoint=lambda d: _write_json(d, args.json) if args.json not in (None, "-") else None)
        except Exception as exc:  # noqa: BLE001
            log(traceback.format_exc())
            data = {"provider": args.part, "crashed": repr(exc)[:1000]}
        _write_json(data, args.json)
        return 0

    providers = args.providers.split(",") if args.providers else list(PROVIDERS[args.device])
    if args.device == "cpu" and "triton" in providers and os.environ.get("TRITON_INTERPRET") != "1" and not args.providers:
        providers.remove("triton")
    result = dict(meta=meta(args.device), args=vars(args), providers=[])
    isolate = args.isolate or (args.device == "cuda" and not args.no_isolate)
    t0 = time.time()
    if args.device == "cpu":
        allow_triton_on_cpu()
    for part in ["base"] + providers:
        log(f"== {part} ({time.time() - t0:.0f} s elapsed)")
        reason = backends.unavailable_reason(part, args.device) if part != "base" else None
        if reason is not None:
            data = dict(provider=part, unavailable=reason, correctness=[], timing=[], memory=[])
            log(f"[{part}] unavailable: {reason}")
        elif isolate:
            data = run_isolated(part, args, deadline)
        else:
            try:
                data = run_part(part, args.device, args.quick, shapes_arg, budget, args.seed)
            except Exception as exc:  # noqa: BLE001
                log(traceback.format_exc())
                data = {"provider": part, "crashed": repr(exc)[:1000]}
        if part == "base":
            result["base"] = data
        else:
            result["providers"].append(data)
    result["elapsed_s"] = time.time() - t0
    table = summarize(result)
    result["table"] = table
    if args.json:
        _write_json(result, args.json)
    print(table, flush=True)
    failed = [p["provider"] for p in result["providers"] if any(c.get("ok") is False for c in p.get("correctness", []))]
    return 1 if failed else 0


def _write_json(data, path):
    text = json.dumps(data, indent=1, default=_json_default, allow_nan=True)
    if path in (None, "-"):
        print(text, flush=True)
    else:  # atomically: a child killed mid-write leaves its last checkpoint intact
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.replace(path + ".tmp", path)


def _read_json(path):
    try:
        with open(path) as f:
            text = f.read()
        return json.loads(text) if text.strip() else None
    except (OSError, ValueError):
        return None


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, (set, tuple)):
        return list(o)
    return str(o)


if __name__ == "__main__":
    sys.exit(main())
