"""Timings of one backend (median of ``triton.testing.do_bench`` with the L2 flushed between runs
on CUDA, wall clock on the CPU), the bytes each op must move, peak memory of the fused loss,
the torch yardsticks and the card's copy bandwidth, and the triton launch-config sweep."""
from __future__ import annotations

import os
import time

import numpy as np
import torch

import fastcolor as fc
from fastcolor.app.bench.common import K_TIMED, OPS_SHAPES, QUICK_SHAPES, SHAPES, T_DECODE, log, shape_of, srgb_ab
from fastcolor.backends.contract import LossCall
from fastcolor.gamut import Q


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
    dev_gen = torch.Generator(device=device).manual_seed(seed)
    x = (torch.randn(shape, generator=dev_gen, device=device, dtype=torch.float32) * 3).to(dtype)
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
    return dict(provider=name, shape=list(shape), dtype=str(dtype)[6:], peak_bytes=int(peak),
                grad_bytes=int(grad_bytes), extra_bytes=int(peak - grad_bytes),
                extra_per_pixel=float((peak - grad_bytes) / (n * h * w)), ratio=float(peak / grad_bytes))


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


def timings(name, device, quick, shapes_arg, budget, ops=None):
    """Milliseconds of every op (or of ``ops``) at every shape of the plan, one record each (an
    error is recorded and the next one runs)."""
    out = []
    dtypes = [torch.float32, torch.bfloat16] if device == "cuda" else [torch.float32]
    for op, s in timing_plan(quick, shapes_arg, device):
        if ops is not None and op not in ops:
            continue
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
                    nbytes = op_bytes(op, shape, dtype)
                    res["yardsticks"].append(dict(op=op, shape_name=s, shape=list(shape), dtype=str(dtype)[6:], ms=ms,
                                                  bytes=nbytes, gbps=nbytes / ms / 1e6))
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
            loss, grad = tb.ce_forward(LossCall(logits=x, ab=ab, k=5, sigma=5.0, grad_scale=1.0, need_grad=True))
            l1, g1 = tb.ce_forward(LossCall(logits=x[-1:].contiguous(), ab=ab[-1:].contiguous(), k=5, sigma=5.0,
                                            grad_scale=1.0, need_grad=True))
            d_full = tb.annealed_mean(x, T=T_DECODE, is_probs=False)[-1:]
            d_one = tb.annealed_mean(x[-1:].contiguous(), T=T_DECODE, is_probs=False)
            res["int64"] = dict(elements=n * Q * p, loss_equal=bool(torch.equal(loss[-1:], l1)),
                                grad_equal=bool(torch.equal(grad[-1:], g1)),
                                decode_equal=bool(torch.equal(d_full, d_one)))
            res["int64"]["ok"] = all(res["int64"][key] for key in ("loss_equal", "grad_equal", "decode_equal"))
            log(f"[triton] offsets beyond 2**31: {res['int64']}")
            del x, ab, loss, grad, l1, g1
        except Exception as exc:  # noqa: BLE001
            res["int64"] = dict(ok=False, error=repr(exc)[:500])
            log(f"[triton] int64 check FAILED: {exc!r}")
        torch.cuda.empty_cache()
    shape = SHAPES["zhang"]
    # most informative first, both dtypes at each step, so that a cut budget still leaves pairs
    specs = [("ce", None, "fused", 5), ("ce", None, "separate", 5), ("ce", None, "fused", 10),
             ("ce", None, "separate", 10), ("ce", (32, 4, None), "fused", 5), ("ce", (64, 8, None), "fused", 5),
             ("am", None, None, None), ("am", (32, 4, 168), None, None), ("am", (64, 8, None), None, None),
             ("ce", (16, 4, None), "fused", 5)]
    variants = [(kind, dtype, cfg, mode, k) for kind, cfg, mode, k in specs
                for dtype in (torch.float32, torch.bfloat16)]
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
                    call = LossCall(logits=xf, ab=abf, class_weights=weights, k=k, sigma=5.0, grad_scale=1.0,
                                    need_grad=True)
                    ms = bench_ms(lambda call=call: tb.ce_forward(call), device)
                    rec["bytes"] = op_bytes("loss_fwdbwd", shape, dtype, k)
                else:
                    ms = bench_ms(lambda xf=xf: tb.annealed_mean(xf, T=T_DECODE, is_probs=False), device)
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
