"""CPU benchmarks of the fastcolor hot paths, per provider, with pytest-benchmark.

    pytest bench/ --benchmark-only                         # all ops, shapes small/zhang/seed
    pytest bench/ --bench-shapes zhang --ratio-table t.md  # + a markdown ratio table
    python bench/test_bench_cpu.py --out bench/results_cpu.md   # interleaved ratio table

Providers: ``reference`` (numpy float64, small shapes only), then every backend that
``fastcolor.backends.available("cpu")`` lists (``torch`` is the baseline: the plain PyTorch
composition; numba, cpp, ... appear when they can run here), and ``aten`` for the yardsticks
``torch.log_softmax(logits, 1)`` / ``torch.softmax(logits, 1)``. Ops: soft-encode (k=5),
loss forward, loss forward + backward (class weights, k=5, mean), annealed-mean decode (T=0.38).

The script (``__main__``) interleaves the providers round by round and keeps each one's
fastest round, so that the ratios compare runs made under the same machine load (this matters
on a shared 2-core box); the pytest-benchmark run times each case in one block instead.

Peak memory: the rise of the process's peak resident set (VmHWM, reset through
/proc/self/clear_refs; glibc's free heap trimmed first) over its resident set before the
call, for one call. It sees torch's, numba's and numpy's allocations alike (tracemalloc would
see only numpy's), outputs included (the gradient is part of it).
"""
from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import os
import platform
import subprocess
import sys
import time

import numpy as np
import torch

import fastcolor as fc
from fastcolor import backends
from fastcolor import reference as R
from fastcolor.gamut import Q

SHAPES = {
    "small": (4, Q, 16, 16),
    "zhang": (40, Q, 64, 64),
    "seed": (100, Q, 32, 32),
}
#: The reference is run at these shapes only (it is numpy float64 and dense).
REFERENCE_SHAPES = ("small",)
OPS = ("encode", "loss_fwd", "loss_fwdbwd", "decode", "log_softmax", "softmax")
YARDSTICK_OF = {"loss_fwd": "log_softmax", "loss_fwdbwd": "log_softmax", "decode": "softmax"}
K, T = 5, 0.38
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

#: The goals of the numba issue, as (op, yardstick-or-baseline, bound): ratio <= bound for a
#: yardstick, speed-up >= bound against the torch baseline.
GOALS = {
    "loss_fwdbwd": (("log_softmax", 1.25), ("torch", 8.0)),
    "decode": (("softmax", 1.2), None),
    "encode": (None, ("torch", 20.0)),
}


# ----------------------------------------------------------------------------- inputs


def srgb_ab(n: int, h: int, w: int, gen: torch.Generator) -> torch.Tensor:
    """ab of uniformly random sRGB colours (D65): realistic, in-gamut targets."""
    rgb = torch.rand(n, 3, h, w, generator=gen)
    c = torch.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    m = torch.tensor([[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750],
                      [0.0193339, 0.1191920, 0.9503041]])
    xyz = torch.einsum("ij,njhw->nihw", m, c) / torch.tensor([0.95047, 1.0, 1.08883])[:, None, None]
    f = torch.where(xyz > 0.008856, xyz.clamp_min(1e-12) ** (1 / 3), 7.787 * xyz + 16 / 116)
    return torch.stack([500 * (f[:, 0] - f[:, 1]), 200 * (f[:, 1] - f[:, 2])], 1).float()


class Inputs:
    def __init__(self, shape_name: str, dtype: torch.dtype, seed: int = 0):
        n, q, h, w = SHAPES[shape_name]
        gen = torch.Generator().manual_seed(seed)
        self.shape_name, self.dtype = shape_name, dtype
        self.logits = (torch.randn(n, q, h, w, generator=gen) * 4).to(dtype)
        self.ab = srgb_ab(n, h, w, gen)
        self.weights = torch.rand(Q, generator=gen) * 4 + 0.1
        self._np = None

    def numpy(self):
        if self._np is None:
            self._np = (self.logits.double().numpy(), self.ab.double().numpy(), self.weights.double().numpy())
        return self._np

    @property
    def grad_bytes(self) -> int:
        return self.logits.numel() * self.logits.element_size()


def providers(shape_name: str) -> list[str]:
    names = list(backends.available("cpu"))
    if "torch" not in names:
        names.append("torch")
    if shape_name in REFERENCE_SHAPES:
        names.insert(0, "reference")
    return names


def make_fn(op: str, provider: str, inp: Inputs):
    """A no-argument callable running ``op`` once with ``provider``, or None if not applicable."""
    x, ab, w = inp.logits, inp.ab, inp.weights
    if op in ("log_softmax", "softmax"):
        if provider != "aten":
            return None
        f = torch.log_softmax if op == "log_softmax" else torch.softmax
        return lambda: f(x, 1)
    if provider == "aten":
        return None
    if provider == "reference":
        if op == "encode":
            return lambda: R.soft_encode(inp.numpy()[1], K)
        if op in ("loss_fwd", "loss_fwdbwd"):  # the reference always computes both
            return lambda: R.rebalanced_cross_entropy(inp.numpy()[0], inp.numpy()[1], inp.numpy()[2], k=K)
        return lambda: R.annealed_mean(inp.numpy()[0], T=T)
    if op == "encode":
        return lambda: fc.soft_encode(ab, k=K, backend=provider)
    if op == "loss_fwd":
        return lambda: fc.rebalanced_cross_entropy(x, ab, w, k=K, backend=provider)
    if op == "loss_fwdbwd":
        xg = x.detach().clone().requires_grad_(True)

        def fwdbwd():
            fc.rebalanced_cross_entropy(xg, ab, w, k=K, backend=provider).backward()
            xg.grad = None

        return fwdbwd
    if op == "decode":
        return lambda: fc.annealed_mean(x, T=T, backend=provider)
    raise ValueError(op)


# ----------------------------------------------------------------------------- measurement


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def peak_extra_mib(fn) -> float | None:
    """Peak RSS above the RSS before one call of fn, in MiB (Linux; None elsewhere)."""
    try:
        gc.collect()
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        before = _status_kib("VmRSS")
        fn()
        gc.collect()
        return (_status_kib("VmHWM") - before) / 1024.0
    except (OSError, KeyError):
        return None


def best_ms_interleaved(fns: dict, rounds: int) -> dict:
    """Fastest of ``rounds`` runs of every callable, taking them in turn each round."""
    best = {key: float("inf") for key in fns}
    for _ in range(rounds):
        for key, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[key] = min(best[key], (time.perf_counter() - t0) * 1e3)
    return best


def machine_info() -> dict:
    model = platform.processor() or "?"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    info = {
        "cpu": model, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
        "numpy": np.__version__, "torch_threads": torch.get_num_threads(),
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), "providers": backends.available("cpu"),
    }
    try:
        import llvmlite
        import numba

        info.update(numba=numba.__version__, llvmlite=llvmlite.__version__, numba_threads=numba.get_num_threads(),
                    numba_threading_layer=_numba_layer())
    except ImportError:
        pass
    try:
        info["load_avg"] = " ".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        pass
    return info


def _numba_layer() -> str:
    import numba

    try:
        return numba.threading_layer()
    except ValueError:  # no parallel region run yet
        return "?"


# ----------------------------------------------------------------------------- markdown


def ratio_table(rows: list[dict], info: dict) -> str:
    """rows: dicts with op, shape, dtype, provider, ms, peak_mib (or None), grad_mib."""
    by = {(r["op"], r["shape"], r["dtype"], r["provider"]): r for r in rows}
    lines = [
        "| op | shape | dtype | provider | ms | x torch baseline | x yardstick | peak extra MiB (x grad) |",
        "|---|---|---|---|---:|---:|---:|---:|",
    ]
    goal_lines = []
    for r in rows:
        key = (r["op"], r["shape"], r["dtype"])
        base = by.get(key + ("torch",))
        ys_op = YARDSTICK_OF.get(r["op"])
        ys = by.get((ys_op, r["shape"], r["dtype"], "aten")) if ys_op else None
        speedup = ""
        if base and r["provider"] != "torch":
            sp = base["ms"] / r["ms"]
            speedup = f"{sp:.1f}x faster" if sp >= 1 else f"{1 / sp:.1f}x slower"
        vs_ys = f"{r['ms'] / ys['ms']:.2f}" if ys else ""
        mem = ""
        if r.get("peak_mib") is not None:
            mem = f"{r['peak_mib']:.0f}"
            if r.get("grad_mib") and r["op"] in ("loss_fwd", "loss_fwdbwd"):
                mem += f" ({r['peak_mib'] / r['grad_mib']:.2f})"
        lines.append(f"| {r['op']} | {r['shape']} | {r['dtype']} | {r['provider']} | {r['ms']:.2f} | {speedup} "
                     f"| {vs_ys} | {mem} |")
        goals = GOALS.get(r["op"])
        if goals and r["provider"] not in ("torch", "reference", "aten"):
            parts = []
            if goals[0] and ys:
                ratio = r["ms"] / ys["ms"]
                verdict = "met" if ratio <= goals[0][1] else "MISSED"
                parts.append(f"{ratio:.2f}x {ys_op} (goal <= {goals[0][1]}: {verdict})")
            if goals[1] and base:
                sp = base["ms"] / r["ms"]
                verdict = "met" if sp >= goals[1][1] else "MISSED"
                parts.append(f"{sp:.1f}x faster than torch (goal >= {goals[1][1]:g}: {verdict})")
            if parts:
                goal_lines.append(f"- {r['provider']} {r['op']} {r['shape']} {r['dtype']}: " + "; ".join(parts))
    head = [
        f"Machine: {info.get('cpu')} ({info.get('cores')} cores); date {info.get('date')}; "
        f"load average at start {info.get('load_avg', '?')}.",
        f"Versions: Python {info.get('python')}, torch {info.get('torch')} ({info.get('torch_threads')} threads), "
        f"numpy {info.get('numpy')}, numba {info.get('numba', '-')} ({info.get('numba_threads', '-')} threads, "
        f"{info.get('numba_threading_layer', '?')} layer), llvmlite {info.get('llvmlite', '-')}.",
        f"Providers: {', '.join(info.get('providers', []))} (+ reference at small shapes, aten yardsticks).",
        "",
    ]
    return "\n".join(head + lines + ([""] + ["Goals:"] + goal_lines if goal_lines else [])) + "\n"


# ----------------------------------------------------------------------------- pytest-benchmark


def _cases(shape_names, dtype_names):
    for s in shape_names:
        for d in dtype_names:
            for op in OPS:
                for p in ["aten"] + providers(s):
                    if op in ("log_softmax", "softmax") and p != "aten":
                        continue
                    if op not in ("log_softmax", "softmax") and p == "aten":
                        continue
                    if op == "encode" and d != dtype_names[0]:
                        continue  # the encoding does not read logits
                    yield s, d, op, p


def pytest_generate_tests(metafunc):
    if "bench_case" in metafunc.fixturenames:
        cfg = metafunc.config
        shapes = [s for s in cfg.getoption("--bench-shapes").split(",") if s]
        dtypes = [d for d in cfg.getoption("--bench-dtypes").split(",") if d]
        cases = list(_cases(shapes, dtypes))
        metafunc.parametrize("bench_case", cases, ids=["-".join(c) for c in cases])


def test_bench(benchmark, bench_case, bench_inputs, bench_results):
    shape, dtype, op, provider = bench_case
    inp = bench_inputs(shape, dtype)
    fn = make_fn(op, provider, inp)
    assert fn is not None
    benchmark.group = f"{op} {shape} {dtype}"
    fn()  # compile / warm up
    peak = peak_extra_mib(fn)
    benchmark.extra_info.update(provider=provider, peak_extra_mib=peak, grad_mib=inp.grad_bytes / 2**20)
    rounds = 3 if shape != "small" else 10
    benchmark.pedantic(fn, rounds=rounds, warmup_rounds=0, iterations=1)
    bench_results.append(dict(op=op, shape=shape, dtype=dtype, provider=provider, ms=benchmark.stats.stats.min * 1e3,
                              peak_mib=peak, grad_mib=inp.grad_bytes / 2**20))


# ----------------------------------------------------------------------------- script


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="zhang,seed,small")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--out", help="write the markdown here (else print it)")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--providers", default="", help="only these (comma-separated; aten = the yardsticks)")
    ap.add_argument("--threads", type=int, default=0, help="torch and numba threads (default: theirs)")
    ap.add_argument("--title", default="", help="a line under the heading (e.g. the environment)")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
        if "numba" in backends.available("cpu"):
            import numba

            numba.set_num_threads(a.threads)
    only = {p for p in a.providers.split(",") if p}
    info = machine_info()
    rows = []
    dtypes = [d for d in a.dtypes.split(",") if d]
    for s in [s for s in a.shapes.split(",") if s]:
        for d in dtypes:
            inp = Inputs(s, DTYPES[d])
            fns = {}
            for op in OPS:
                if op == "encode" and d != dtypes[0]:
                    continue
                for p in ["aten"] + providers(s):
                    fn = make_fn(op, p, inp)
                    if fn is not None and (not only or p in only):
                        fns[(op, p)] = fn
            for fn in fns.values():
                fn()  # compile / warm up
            best = best_ms_interleaved(fns, a.rounds)
            for (op, p), ms in best.items():
                peak = None if a.no_memory else peak_extra_mib(fns[(op, p)])
                rows.append(dict(op=op, shape=s, dtype=d, provider=p, ms=ms, peak_mib=peak,
                                 grad_mib=inp.grad_bytes / 2**20))
                print(f"{op:12s} {s:6s} {d:9s} {p:10s} {ms:9.2f} ms  peak {peak if peak is None else round(peak)} MiB",
                      file=sys.stderr, flush=True)
            del inp, fns
            gc.collect()
    info["numba_threading_layer"] = _numba_layer() if "numba" in sys.modules else "-"
    md = ratio_table(rows, info)
    if a.out:
        with open(a.out, "w") as f:
            args = list(argv if argv is not None else sys.argv[1:])
            for opt in ("--title", "--out"):  # not part of what was measured
                while opt in args:
                    i = args.index(opt)
                    del args[i:i + 2]
            cmd = " ".join(["python bench/test_bench_cpu.py"] + args)
            f.write(f"## {a.title or 'CPU benchmark'}\n\nCommand: `{cmd}` (interleaved rounds, fastest round each)\n\n")
            f.write(md)
    else:
        print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
