"""The benchmark's driver: every part (the base measurements, then one backend after the other)
in this process or each in a child process, within the time budget; see :mod:`fastcolor.app.bench`."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback

import torch

from fastcolor import backends
from fastcolor.app.bench.common import PROVIDERS, SHAPES, Budget, log, shape_of
from fastcolor.app.bench.correctness import correctness
from fastcolor.app.bench.report import meta, read_json, summarize, write_json
from fastcolor.app.bench.timing import part_base, peak_memory, timings, triton_extras


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
    except Exception as exc:  # noqa: BLE001 - e.g. a CUDA error: the context is gone, keep what was measured
        log(traceback.format_exc())
        res["crashed"] = repr(exc)[:1000]
    return res


def run_part(part, device, quick, shapes_arg, budget, seed, checkpoint=lambda data: None):
    """One part in this process: ``"base"`` (:func:`~fastcolor.app.bench.timing.part_base`) or a backend."""
    if part == "base":
        return part_base(device, quick, shapes_arg, budget)
    return part_provider(part, device, quick, shapes_arg, budget, seed, checkpoint)


def run_isolated(part, args, deadline):
    """Run one part in a child process; return its JSON (or a record of the crash)."""
    fd, path = tempfile.mkstemp(suffix=".json", prefix=f"fcbench-{part}-")
    os.close(fd)
    cmd = [sys.executable, "-m", "fastcolor.app.bench", "--device", args.device, "--part", part, "--json", path,
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
        data = read_json(path) or ({"provider": part} if part != "base" else {})
        data["crashed"] = f"timed out after {timeout:.0f} s"
        return data
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass


def main(argv=None) -> int:
    """``python -m fastcolor.bench`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit
    status: 1 when a backend failed a correctness check, else 0."""
    ap = argparse.ArgumentParser(prog="python -m fastcolor.bench",
                                 description="Correctness and speed of every backend in one run.")
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
                            checkpoint=lambda d: write_json(d, args.json) if args.json not in (None, "-") else None)
        except Exception as exc:  # noqa: BLE001
            log(traceback.format_exc())
            data = {"provider": args.part, "crashed": repr(exc)[:1000]}
        write_json(data, args.json)
        return 0

    providers = args.providers.split(",") if args.providers else list(PROVIDERS[args.device])
    if args.device == "cpu" and "triton" in providers and os.environ.get("TRITON_INTERPRET") != "1" and not args.providers:
        providers.remove("triton")
    result = dict(meta=meta(args.device), args=vars(args), providers=[])
    isolate = args.isolate or (args.device == "cuda" and not args.no_isolate)
    t0 = time.time()
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
        write_json(result, args.json)
    print(table, flush=True)
    failed = [p["provider"] for p in result["providers"] if any(c.get("ok") is False for c in p.get("correctness", []))]
    return 1 if failed else 0
