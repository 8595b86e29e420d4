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
from fastcolor.app.bench import modes as modes_mod
from fastcolor.app.bench import train_step
from fastcolor.app.bench.common import PROVIDERS, SHAPES, Budget, log, shape_of
from fastcolor.app.bench.correctness import correctness
from fastcolor.app.bench.report import meta, read_json, summarize, write_json
from fastcolor.app.bench.timing import part_base, peak_memory, timings, triton_extras

#: the parts of a run besides the backends: the copy bandwidth and yardsticks, the per-mode table
#: of each op, the training-step table
EXTRA_PARTS = ("base", "modes", "train")
#: the most of the whole budget the per-mode and the training-step parts may take (the backends
#: share what is left)
PART_SHARE = {"modes": 0.4, "train": 0.25}


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


def run_part(part, device, quick, shapes_arg, budget, seed, checkpoint=lambda data: None, opts=None):
    """One part in this process: ``"base"`` (:func:`~fastcolor.app.bench.timing.part_base`),
    ``"modes"`` (:func:`fastcolor.app.bench.modes.run`), ``"train"``
    (:func:`fastcolor.app.bench.train_step.run`) or a backend. ``opts``: the parsed arguments of
    the last two (``modes``, ``mode_backend``, ``models``, ``batches``, ``repeats``, ``precision``)."""
    opts = opts or {}
    if part == "base":
        return part_base(device, quick, shapes_arg, budget)
    if part == "modes":
        rows = modes_mod.run(device, modes=opts.get("modes") or modes_mod.MODES, quick=quick, shapes_arg=shapes_arg,
                             budget=budget, backend=opts.get("mode_backend") or "auto", seed=seed,
                             checkpoint=lambda rows: checkpoint({"rows": rows}))
        return {"rows": rows}
    if part == "train":
        return train_step.run(device, models=opts.get("models"), batches=opts.get("batches"),
                              repeats=opts.get("repeats"), precision=opts.get("precision") or "fp32", quick=quick,
                              budget=budget, checkpoint=checkpoint)
    return part_provider(part, device, quick, shapes_arg, budget, seed, checkpoint)


def _part_opts(args) -> dict:
    return {"modes": _csv(args.modes), "mode_backend": args.mode_backend, "models": _csv(args.models),
            "batches": [int(b) for b in _csv(args.batches)] if args.batches else None, "repeats": args.repeats,
            "precision": args.precision}


def _csv(text):
    return [t for t in text.split(",") if t] if text else None


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
    for opt in ("modes", "mode_backend", "models", "batches", "repeats", "precision"):
        if getattr(args, opt) is not None:
            cmd += ["--" + opt.replace("_", "-"), str(getattr(args, opt))]
    timeout = max(10.0, deadline - time.time() + 20) if deadline != float("inf") else None  # None: no limit
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None, timeout=timeout, text=True)
        with open(path) as f:
            text = f.read()
        data = json.loads(text) if text.strip() else None
        if data is None or proc.returncode != 0:
            msg = f"child exited with {proc.returncode}"
            data = data or ({"provider": part} if part not in EXTRA_PARTS else {})
            data["crashed"] = msg
            log(f"[{part}] {msg}")
        return data
    except subprocess.TimeoutExpired:
        log(f"[{part}] child timed out after {timeout:.0f} s")
        data = read_json(path) or ({"provider": part} if part not in EXTRA_PARTS else {})
        data["crashed"] = f"timed out after {timeout:.0f} s"
        return data
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass


def main(argv=None) -> int:
    """``python -m fastcolor.bench`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit
    status: 1 when a backend, an op in some mode or the training-step losses failed a correctness
    check, 2 for a usage error, else 0. ``--loader`` and ``--train-step --data DIR`` are the data
    path's benchmark (:mod:`fastcolor.app.bench.loader`)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--loader" in argv or any(a == "--data" or a.startswith("--data=") for a in argv):
        from fastcolor.app.bench import loader

        return loader.main(argv)
    ap = argparse.ArgumentParser(prog="python -m fastcolor.bench",
                                 description="Correctness and speed of every backend in one run.")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH",
                    help="write every number as JSON to PATH (stdout when no PATH is given)")
    ap.add_argument("--quick", action="store_true", help="tiny shapes and a small matrix (tests, CPU interpreter)")
    ap.add_argument("--shapes", default=None, help=f"comma-separated subset of {sorted(SHAPES)}")
    ap.add_argument("--providers", default=None, help="comma-separated backends (default: all for the device)")
    ap.add_argument("--parts", default=None,
                    help="comma-separated parts to run: base, modes, train, providers (default: all on cuda; "
                         "base,providers on the CPU)")
    ap.add_argument("--train-step", action="store_true",
                    help="only the training-step table (same as --parts train)")
    ap.add_argument("--modes", default=None,
                    help=f"comma-separated modes of the per-mode table, of {list(modes_mod.MODES)}")
    ap.add_argument("--mode-backend", default=None, help="the backend of the per-mode table (default: auto)")
    ap.add_argument("--models", default=None,
                    help=f"training step: comma-separated models of {list(train_step.MODELS)} (default: zhang,small)")
    ap.add_argument("--batches", default=None, help="training step: comma-separated batch sizes for every model "
                    f"(default: {train_step.DEFAULT_BATCHES['cpu']} on the CPU, "
                    f"{train_step.DEFAULT_BATCHES['cuda']} on cuda)")
    ap.add_argument("--repeats", type=int, default=None, help="training step: timed steps per variant (default: 10 on "
                    "cuda; on the CPU as many as fit in ~20 s per model and batch, 3 to 15)")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default=None,
                    help="training step: fp32, or bf16 autocast of forward and loss as fastcolor.train does")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="wall-clock budget; lower-priority work is dropped (default: 280 on cuda, 200 on the CPU, "
                         "none for --train-step)")
    ap.add_argument("--no-isolate", action="store_true", help="run every backend in this process (default on the CPU)")
    ap.add_argument("--isolate", action="store_true", help="run every backend in a child process (default on CUDA)")
    ap.add_argument("--seed", type=int, default=int(time.time()) % 100000)
    ap.add_argument("--part", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"{ap.prog}: error: --device cuda: no CUDA device is available here (torch {torch.__version__}, "
              f"CUDA {torch.version.cuda}); use --device cpu", file=sys.stderr)
        return 2
    shapes_arg = set(args.shapes.split(",")) if args.shapes else None
    if shapes_arg and not shapes_arg <= set(SHAPES):
        ap.error(f"--shapes: expected names from {sorted(SHAPES)}, got {sorted(shapes_arg)}")
    choices = {"modes": modes_mod.MODES, "models": train_step.MODELS, "parts": EXTRA_PARTS + ("providers",)}
    for opt, allowed in choices.items():
        bad = sorted(set(_csv(getattr(args, opt)) or ()) - set(allowed))
        if bad:
            ap.error(f"--{opt}: expected names from {list(allowed)}, got {bad}")
    if args.mode_backend not in (None, "auto") and backends.unavailable_reason(args.mode_backend, args.device):
        ap.error(f"--mode-backend: {backends.unavailable_reason(args.mode_backend, args.device)}")
    try:
        opts = _part_opts(args)
    except ValueError:
        ap.error(f"--batches: expected comma-separated positive integers, got {args.batches!r}")
    if (opts["batches"] and min(opts["batches"]) < 1) or (args.repeats is not None and args.repeats < 1):
        ap.error(f"--batches/--repeats: expected positive integers, got {args.batches!r} / {args.repeats!r}")
    parts = ["train"] if args.train_step else _csv(args.parts)
    if parts is None:
        parts = ["base", "modes", "train", "providers"] if args.device == "cuda" else ["base", "providers"]
    if args.modes and "modes" not in parts and not args.parts:
        parts.insert(1, "modes")  # --modes alone asks for the per-mode table (the CPU default has none)
    budget_s = args.budget_s if args.budget_s is not None else (
        None if parts == ["train"] else 280.0 if args.device == "cuda" else 200.0)
    deadline = args.deadline or (time.time() + budget_s if budget_s else float("inf"))
    budget = Budget(deadline)

    if args.part:  # a child: one part, JSON out (and after each phase)
        try:
            data = run_part(args.part, args.device, args.quick, shapes_arg, budget, args.seed,
                            checkpoint=lambda d: write_json(d, args.json) if args.json not in (None, "-") else None,
                            opts=opts)
        except Exception as exc:  # noqa: BLE001
            log(traceback.format_exc())
            data = {"provider": args.part, "crashed": repr(exc)[:1000]}
        write_json(data, args.json)
        return 0

    providers = []
    if "providers" in parts:
        providers = args.providers.split(",") if args.providers else list(PROVIDERS[args.device])
        if (args.device == "cpu" and "triton" in providers and os.environ.get("TRITON_INTERPRET") != "1"
                and not args.providers):
            providers.remove("triton")
    result = dict(meta=meta(args.device), args=vars(args), providers=[])
    isolate = args.isolate or (args.device == "cuda" and not args.no_isolate)
    t0 = time.time()
    for part in [p for p in EXTRA_PARTS if p in parts] + providers:
        log(f"== {part} ({time.time() - t0:.0f} s elapsed)")
        reason = backends.unavailable_reason(part, args.device) if part not in EXTRA_PARTS else None
        part_deadline = deadline
        if part in PART_SHARE and budget_s and len(parts) > 1:
            part_deadline = min(deadline, time.time() + PART_SHARE[part] * budget_s)
        if reason is not None:
            data = dict(provider=part, unavailable=reason, correctness=[], timing=[], memory=[])
            log(f"[{part}] unavailable: {reason}")
        elif isolate:
            data = run_isolated(part, args, part_deadline)
        else:
            try:
                data = run_part(part, args.device, args.quick, shapes_arg, Budget(part_deadline), args.seed, opts=opts)
            except Exception as exc:  # noqa: BLE001
                log(traceback.format_exc())
                data = {"provider": part, "crashed": repr(exc)[:1000]}
        if part == "base":
            result["base"] = data
        elif part == "modes":
            result["modes"] = data.get("rows", [])
            if "crashed" in data:
                result["modes"].append({"op": "-", "shape": [], "dtype": "-", "mode": "-", "error": data["crashed"]})
        elif part == "train":
            result["train_step"] = data
        else:
            result["providers"].append(data)
    result["elapsed_s"] = time.time() - t0
    table = summarize(result)
    result["table"] = table
    if args.json:
        write_json(result, args.json)
    print(table, flush=True)
    failed = [p["provider"] for p in result["providers"] if any(c.get("ok") is False for c in p.get("correctness", []))]
    failed += [f"{r['op']} {r['mode']}" for r in result.get("modes", []) if r.get("ok") is False]
    failed += [f"train {r['label']} b{r['batch']}" for r in (result.get("train_step") or {}).get("rows", [])
               if r.get("check_ok") is False]
    if failed:
        log(f"correctness FAILED: {', '.join(failed)}")
    return 1 if failed else 0
