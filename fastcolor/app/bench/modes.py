"""Each op as a user meets it (issue 12, point 6): per op, dtype and shape, four ways of calling it,

``kernel``
    the backend's host function on flat contiguous tensors (``backends.get(name).ce_forward`` /
    ``annealed_mean`` / ``soft_encode``): no argument checks, autograd or custom-op dispatch;
``eager``
    the public op (:func:`fastcolor.rebalanced_cross_entropy` then ``.backward()``, a fresh
    gradient every call; :func:`fastcolor.annealed_mean`; :func:`fastcolor.soft_encode`);
``graph``
    the eager call captured once in a ``torch.cuda.CUDAGraph`` (after three warm-up calls on a
    side stream, as the PyTorch CUDA-graph notes prescribe) and replayed (CUDA only);
``compile``
    the eager call under ``torch.compile(fullgraph=True)``;

and for each: the fewest bytes the op must move (:func:`~fastcolor.app.bench.timing.op_bytes`),
median / p10 / p90 microseconds (``triton.testing.do_bench``, L2 flushed; CPU: wall clock), GB/s,
the percentage of a same-size copy and a same-size read measured in this run, launches per call
(host launch calls and device operations, from ``torch.profiler``), host microseconds per call
(the loop's wall time without a sync), synchronisations per call (warnings counted under
``torch.cuda.set_sync_debug_mode("warn")``, and the calls that raise under ``"error"``), the peak
memory of one call, and the error of image 0 against :mod:`fastcolor.reference` (the reference
is float64 numpy, too slow for whole batches; the whole-batch loss is compared with the mean of
the kernel's per-pixel loss). The percentage of the run's 2 GiB copy is added by the report.
Everything CUDA-only is skipped on the CPU, where the rest runs (for the tests)."""
from __future__ import annotations

import time
import warnings

import numpy as np
import torch

import fastcolor as fc
from fastcolor import backends
from fastcolor import reference as R
from fastcolor.app.bench.common import K_TIMED, T_DECODE, log, rel_err, shape_of
from fastcolor.app.bench.timing import make_timing_inputs, op_bytes
from fastcolor.backends.contract import LossCall
from fastcolor.gamut import Q

MODES = ("kernel", "eager", "graph", "compile")
OPS = ("loss_fwdbwd", "decode", "encode")
#: Zhang et al.'s training shape, then a large one (64 images of 512 px)
SHAPE_NAMES = ("zhang", "large")
QUICK_SHAPE_NAMES = ("odd",)
TOL_GRAD = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}  # as in correctness.py
SIGMA = 5.0


def _cuda(device) -> bool:
    return torch.device(device).type == "cuda"


def _sync(device):
    if _cuda(device):
        torch.cuda.synchronize()


class Case:
    """The inputs of one (op, shape, dtype) and the reference answers for its image 0."""

    def __init__(self, op, shape, dtype, device, backend, seed=0):
        self.op, self.shape, self.dtype, self.device = op, tuple(shape), dtype, device
        self.name = backends.resolve(backend, torch.device(device).type)
        self.mod = backends.get(self.name)
        self.x, self.ab, self.weights = make_timing_inputs(self.shape, dtype, device, seed)
        n, _, h, w = self.shape
        self.px = n * h * w
        self.xf, self.abf = self.x.reshape(n, Q, h * w), self.ab.reshape(n, 2, h * w)
        x0 = self.x[:1].double().cpu().numpy()
        ab0 = self.ab[:1].double().cpu().numpy()
        if op == "loss_fwdbwd":
            self.ref_loss0, _ = R.rebalanced_cross_entropy(x0, ab0, self.weights.double().cpu().numpy(), k=K_TIMED,
                                                           reduction="none")
            _, self.ref_grad0 = R.rebalanced_cross_entropy(x0, ab0, self.weights.double().cpu().numpy(), k=K_TIMED,
                                                           reduction="sum")
            loss_px, _ = self.mod.ce_forward(self._call(need_grad=False))
            self.kernel_mean = float(loss_px.double().sum() / self.px)
        elif op == "decode":
            self.ref_ab0 = R.annealed_mean(x0, T=T_DECODE)
        elif op == "encode":
            self.ref_idx0, self.ref_w0 = R.soft_encode(ab0, K_TIMED)
        else:
            raise ValueError(f"op: expected one of {OPS}, got {op!r}")

    def _call(self, need_grad=True):
        return LossCall(logits=self.xf, ab=self.abf, class_weights=self.weights, k=K_TIMED, sigma=SIGMA,
                        grad_scale=1.0 / self.px, need_grad=need_grad)

    def errors(self, out: dict) -> dict:
        """Errors of image 0 of a call's outputs against the reference (and ``ok``)."""
        n, _, h, w = self.shape
        if self.op == "loss_fwdbwd":
            g0 = out["grad"].reshape(self.shape)[:1].double().cpu().numpy() * self.px
            res = {"rel_err_grad": rel_err(g0, self.ref_grad0)}
            if "loss_px" in out:
                loss0 = out["loss_px"].reshape(n, h, w)[:1].double().cpu().numpy()
                res["rel_err_loss"] = rel_err(loss0, self.ref_loss0)
            else:
                res["rel_err_loss"] = abs(float(out["loss"]) - self.kernel_mean) / abs(self.kernel_mean)
            res["ok"] = bool(res["rel_err_grad"] <= TOL_GRAD[self.dtype] and res["rel_err_loss"] <= 2e-5)
        elif self.op == "decode":
            res = {"rel_err": rel_err(out["ab"].reshape(n, 2, h, w)[:1].double().cpu().numpy(), self.ref_ab0)}
            res["ok"] = bool(res["rel_err"] <= 1e-4)
        else:
            idx = out["indices"].reshape(n, K_TIMED, h, w)[:1].long().cpu().numpy()
            wts = out["weights"].reshape(n, K_TIMED, h, w)[:1].double().cpu().numpy()
            res = {"index_mismatch": float((idx != self.ref_idx0).any(1).mean()),
                   "max_abs_err_weights": float(np.abs(wts - self.ref_w0).max())}
            # exact ties in distance may order two bins either way: allow a few pixels in 10^3
            res["ok"] = bool(res["index_mismatch"] <= 1e-3 and res["max_abs_err_weights"] <= 2e-5)
        return res


def build(case: Case, mode: str):
    """``(fn, out, release)``: ``fn()`` runs the op once in ``mode`` and leaves its outputs in the
    dict ``out``; ``release()`` drops them (so that a peak-memory measurement starts clean)."""
    out: dict = {}
    xr = None
    if mode == "kernel":
        if case.op == "loss_fwdbwd":
            call = case._call()

            def fn():
                out.clear()  # nothing holds the last call's gradient, as in a training step
                out["loss_px"], out["grad"] = case.mod.ce_forward(call)
        elif case.op == "decode":
            def fn():
                out["ab"] = case.mod.annealed_mean(case.xf, T=T_DECODE, is_probs=False)
        else:
            def fn():
                out["indices"], out["weights"] = case.mod.soft_encode(case.abf, k=K_TIMED, sigma=SIGMA)
    elif mode in ("eager", "graph", "compile"):
        if case.op == "loss_fwdbwd":
            def op(x):
                return fc.rebalanced_cross_entropy(x, case.ab, case.weights, k=K_TIMED, backend=case.name)
        elif case.op == "decode":
            def op(x):
                return fc.annealed_mean(x, T=T_DECODE, backend=case.name)
        else:
            def op(ab):
                lab = fc.soft_encode(ab, k=K_TIMED, backend=case.name)
                return lab.indices, lab.weights
        if mode == "compile":
            op = torch.compile(op, fullgraph=True, dynamic=False)
        if case.op == "loss_fwdbwd":
            xr = case.x.detach().clone().requires_grad_(True)

            def fn():
                # a new gradient every call, as a training step makes it; nothing holds the last
                # call's (the CPU backends then hand its pages out again: fastcolor.backends._alloc)
                out.clear()
                xr.grad = None
                loss = op(xr)
                loss.backward()
                out["loss"], out["grad"] = loss.detach(), xr.grad
        elif case.op == "decode":
            def fn():
                out["ab"] = op(case.x)
        else:
            def fn():
                out["indices"], out["weights"] = op(case.ab)
        if mode == "graph":
            fn = _capture(fn, case.device)
    else:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")

    def release():
        if mode != "graph":  # a graph's outputs are its static buffers
            out.clear()
            if xr is not None:
                xr.grad = None

    return fn, out, release


def _capture(fn, device):
    """``fn`` captured in a CUDA graph: three warm-up calls on a side stream, one capture, and the
    graph's ``replay`` returned (the graph stays alive through the bound method)."""
    if not _cuda(device):
        raise RuntimeError("graph: CUDA graphs need a CUDA device")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    torch.cuda.synchronize()
    return g.replay


# ----------------------------------------------------------------------------- measurements


def time_us(fn, device, quick=False) -> tuple[float, float, float]:
    """(median, p10, p90) microseconds of ``fn``."""
    if _cuda(device):
        import triton.testing

        q = triton.testing.do_bench(fn, warmup=10, rep=40, quantiles=[0.5, 0.1, 0.9])
        return tuple(float(v) * 1e3 for v in q)
    # On the CPU two untimed calls first: the first calls after the correctness check (a float64
    # reference run over a whole image) measured up to 35% slower than the steady state.
    for _ in range(0 if quick else 2):
        fn()
    ts = []
    for _ in range(2 if quick else 7):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e6)
    return float(np.median(ts)), float(np.percentile(ts, 10)), float(np.percentile(ts, 90))


def host_us(fn, device, n=20) -> float:
    """Wall microseconds per call of ``n`` calls in a row, not waiting for the device: the host's
    share (it includes the device's time wherever the call synchronises)."""
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t = (time.perf_counter() - t0) / n * 1e6
    _sync(device)
    return t


#: runtime / driver calls that put work on the device
_LAUNCH_CALLS = ("LaunchKernel", "GraphLaunch", "MemsetAsync", "MemcpyAsync", "cuLaunch")


def launches(fn, device, n=5) -> dict | None:
    """Host launch calls, device operations (kernels, memsets, copies) and their device time, per
    call, from ``torch.profiler`` (None on the CPU)."""
    if not _cuda(device):
        return None
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
    evs = prof.events()
    dev = [e for e in evs if e.device_type == DeviceType.CUDA]
    host = [e for e in evs if e.device_type == DeviceType.CPU and any(s in e.name for s in _LAUNCH_CALLS)]
    names = sorted({e.name[:60] for e in dev})
    return {"host_launches": len(host) / n, "device_ops": len(dev) / n,
            "device_us": sum(e.time_range.end - e.time_range.start for e in dev) / n, "device_names": names[:12]}


def syncs(fn, device, n=3) -> dict | None:
    """Synchronisations per call: warnings under ``set_sync_debug_mode("warn")``, and how many of
    ``n`` calls raise under ``"error"`` (None on the CPU)."""
    if not _cuda(device):
        return None
    prev = torch.cuda.get_sync_debug_mode()
    raised = 0
    try:
        torch.cuda.set_sync_debug_mode("warn")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(n):
                fn()
        count = sum("synchroniz" in str(w.message) for w in caught)
        torch.cuda.set_sync_debug_mode("error")
        for _ in range(n):
            try:
                fn()
            except RuntimeError as exc:
                if "synchroniz" not in str(exc):
                    raise
                raised += 1
    finally:
        torch.cuda.set_sync_debug_mode(prev)
    torch.cuda.synchronize()
    return {"syncs_per_call": count / n, "calls_raising": raised, "calls": n}


def peak_bytes(fn, release, device) -> int | None:
    """Bytes allocated above what was allocated before one call (outputs included; None on the CPU)."""
    if not _cuda(device):
        return None
    release()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return int(torch.cuda.max_memory_allocated() - base)


class Yardsticks:
    """A same-size copy (``dst.copy_(src)``, ``nbytes`` moved: half read, half written) and a
    same-size read (``src.sum()``), timed like the ops, cached per size."""

    def __init__(self, device, quick=False):
        self.device, self.quick, self.cache = device, quick, {}

    def __call__(self, nbytes: int) -> dict:
        if nbytes not in self.cache:
            src = torch.ones(max(1, nbytes // 8), device=self.device)
            dst = torch.empty_like(src)
            copy = time_us(lambda: dst.copy_(src), self.device, self.quick)[0]
            del src, dst
            src = torch.ones(max(1, nbytes // 4), device=self.device)
            read = time_us(lambda: src.sum(), self.device, self.quick)[0]
            del src
            self.cache[nbytes] = {"copy_us": copy, "read_us": read}
        return self.cache[nbytes]


def measure(case: Case, mode: str, yard: Yardsticks, quick=False) -> dict:
    """Every number of one (op, shape, dtype, mode)."""
    t0 = time.time()
    fn, out, release = build(case, mode)
    fn()  # compile / warm up (the graph was captured by build)
    _sync(case.device)
    rec = {"setup_s": time.time() - t0}
    rec.update(case.errors(out))
    release()
    med, p10, p90 = time_us(fn, case.device, quick)
    nbytes = op_bytes(case.op, case.shape, case.dtype)
    ys = yard(nbytes)
    rec.update(us=med, p10_us=p10, p90_us=p90, bytes=nbytes, gbps=nbytes / med / 1e3,
               pct_copy=100 * ys["copy_us"] / med, pct_read=100 * ys["read_us"] / med,
               copy_us=ys["copy_us"], read_us=ys["read_us"])
    rec["host_us"] = host_us(fn, case.device, 5 if quick else 20)
    rec["launches"] = launches(fn, case.device)
    rec["syncs"] = syncs(fn, case.device)
    rec["peak_bytes"] = peak_bytes(fn, release, case.device)
    release()
    return rec


def plan(device, quick, shapes_arg=None, dtypes=None, ops=OPS):
    """(op, shape name, dtype) in priority order: the training shape first, the loss first."""
    names = QUICK_SHAPE_NAMES if quick else tuple(s for s in SHAPE_NAMES if shapes_arg is None or s in shapes_arg)
    dtypes = dtypes or ([torch.float32, torch.bfloat16] if _cuda(device) else [torch.float32])
    return [(op, s, dt) for s in names for op in OPS for dt in dtypes
            if op in ops and (op != "encode" or dt == dtypes[0])]


def run(device, modes=MODES, quick=False, shapes_arg=None, budget=None, backend="auto", seed=0,
        checkpoint=lambda rows: None, ops=OPS, variant=None) -> list[dict]:
    """Every row of the table, in priority order; a failure is recorded and the run goes on;
    ``checkpoint(rows)`` after each row (a child process writes its JSON there). ``ops``: a subset
    of :data:`OPS`; ``variant``: the name of an opt-in kernel (``common.VARIANTS``) whose
    environment the caller has set, recorded in each row."""
    rows = []
    yard = Yardsticks(device, quick)
    for op, s, dtype in plan(device, quick, shapes_arg, ops=ops):
        shape = shape_of(s)
        base = {"op": op, "shape_name": s, "shape": list(shape), "dtype": str(dtype)[6:]}
        if variant:
            base["variant"] = variant
        try:
            case = Case(op, shape, dtype, device, backend, seed)
        except Exception as exc:  # noqa: BLE001
            rows.append({**base, "mode": "-", "error": f"inputs/reference: {exc!r}"[:500]})
            log(f"[modes] {op} {s} {base['dtype']} FAILED: {exc!r}")
            continue
        for mode in modes:
            rec = {**base, "mode": mode, "backend": case.name}
            if mode == "graph" and not _cuda(device):
                rec["skipped"] = "CUDA graphs need a CUDA device"
            elif budget is not None and not budget.ok(40 if mode == "compile" else 10):
                rec["skipped"] = "time budget"
            else:
                try:
                    rec.update(measure(case, mode, yard, quick))
                    log(f"[modes] {op} {s} {rec['dtype']} {mode}: {rec['us']:.1f} us, {rec['pct_copy']:.0f}% of copy, "
                        f"host {rec['host_us']:.1f} us, ok={rec['ok']}")
                except Exception as exc:  # noqa: BLE001 - e.g. a capture that syncs: record it, go on
                    rec["error"] = repr(exc)[:500]
                    log(f"[modes] {op} {s} {rec['dtype']} {mode} FAILED: {exc!r}")
                    if _cuda(device):  # a CUDA error may have left the context unusable: the next rows say so
                        try:
                            torch.cuda.synchronize()
                        except RuntimeError:
                            pass
            rows.append(rec)
            checkpoint(rows)
        del case
        if _cuda(device):
            torch.cuda.empty_cache()
    return rows
