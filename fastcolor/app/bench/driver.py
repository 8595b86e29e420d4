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
from fastcolor.app.bench.common import (
    PROVIDERS,
    SHAPES,
    VARIANTS,
    Budget,
    backend_of,
    log,
    shape_of,
    variant_env,
    version_problems,
)
from fastcolor.app.bench.correctness import correctness
from fastcolor.app.bench.report import meta, read_json, summarize, write_json
from fastcolor.app.bench.timing import part_base, peak_memory, timings, triton_extras

#: the parts of a run besides the backends: the copy bandwidth and yardsticks, the per-mode table
#: of each op, the training-step table
EXTRA_PARTS = ("base", "modes", "train")
#: The parts of a CUDA run, in order (``--parts`` picks among the names on the left; a provider
#: name stands for each backend and opt-in kernel of ``common.VARIANTS``):
#:
#: 1. ``check:<provider>``: correctness of triton (its default and opt-in kernels: never run on
#:    hardware before) and cuda, first, so that a short window records them whatever follows;
#: 2. ``base``, ``modes`` (kernel, eager, CUDA graph; the opt-in kernels' rows beside the
#:    defaults, ``modes:<variant>``), ``train``;
#: 3. the providers' timings (torch, cuda, triton and its opt-in kernels);
#: 4. ``compile``: the torch.compile rows of the per-mode table, last (compilation is slow).
#:
#: The JSON file is rewritten after every part; each part runs in a child process on CUDA, so a
#: crash costs only that part's remaining rows.
CHECKED = ("triton", "triton:persistent", "triton:stream", "cuda")
#: The most of the whole budget each part may take (the providers share what is left, at least a
#: fifth). With ``--budget-s 300`` (a lent GPU's window, bench/RESULTS.md): triton's check 36 s
#: (its kernels compile there first; Triton's cache serves the later parts), 15 s for each opt-in
#: kernel's, 9 s for cuda's, the per-mode table 60 s and 12 s for each opt-in kernel's rows, the
#: training step 36 s, the compile rows 36 s, the backends' timings the remaining 60-90 s.
PART_SHARE = {"check:triton": 0.12, "check:": 0.05, "check:cuda": 0.03, "base": 0.03, "modes": 0.2,
              "modes:": 0.04, "train": 0.12, "compile": 0.12}


def _share(part: str) -> float | None:
    if part in PART_SHARE:
        return PART_SHARE[part]
    for prefix in ("check:", "modes:"):
        if part.startswith(prefix):
            return PART_SHARE[prefix]
    return None


def part_provider(name, device, quick, shapes_arg, budget, seed, checkpoint=lambda data: None, checked=False):
    """Correctness, timings, peak memory (and the triton extras) of one provider: a backend, or an
    opt-in kernel of ``common.VARIANTS`` (``"triton:persistent"``: only the ops it changes).
    ``checked``: the correctness ran in its own part already (``check:<name>``). ``checkpoint`` is
    called with the results so far after each phase, so that a child killed by its timeout still
    hands back what it measured."""
    res = dict(provider=name, correctness=[], timing=[], memory=[])
    backend = backend_of(name)
    if _unavailable(res, backend, device, name):
        return res
    gen = torch.Generator().manual_seed(seed)
    try:
        with variant_env(name):
            if not checked:
                t0 = time.time()
                res["correctness"] = correctness(backend, device, quick, gen, budget)
                res["correctness_s"] = time.time() - t0
                log(f"[{name}] correctness: {sum(bool(r.get('ok')) for r in res['correctness'])}/"
                    f"{len(res['correctness'])} ok in {res['correctness_s']:.1f} s")
                checkpoint(res)
            res["timing"] = timings(backend, device, quick, shapes_arg, budget, ops=VARIANTS.get(name, (0, None))[1])
            for t in res["timing"]:
                t["provider"] = name
            checkpoint(res)
            if device == "cuda" and name not in VARIANTS or name == "triton:persistent":
                for dtype in (torch.float32, torch.bfloat16):
                    if not budget.ok(10):
                        break
                    try:
                        res["memory"].append(peak_memory(backend, shape_of("tiny" if quick else "zhang"), dtype,
                                                         device))
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


def _unavailable(res: dict, backend: str, device: str, label: str) -> bool:
    """Record in ``res`` (and log) why ``backend`` cannot run on ``device``; False if it can."""
    reason = backends.unavailable_reason(backend, device)
    if reason is not None:
        res["unavailable"] = reason
        log(f"[{label}] unavailable: {reason}")
    return reason is not None


def part_check(name, device, quick, budget, seed):
    """Correctness only of one provider (the ``check:<name>`` part)."""
    res = dict(provider=name, correctness=[])
    backend = backend_of(name)
    if _unavailable(res, backend, device, f"check {name}"):
        return res
    t0 = time.time()
    try:
        with variant_env(name):
            res["correctness"] = correctness(backend, device, quick, torch.Generator().manual_seed(seed), budget)
    except Exception as exc:  # noqa: BLE001
        log(traceback.format_exc())
        res["crashed"] = repr(exc)[:1000]
    res["correctness_s"] = time.time() - t0
    log(f"[check {name}] {sum(bool(r.get('ok')) for r in res['correctness'])}/{len(res['correctness'])} ok "
        f"in {res['correctness_s']:.1f} s")
    return res


def run_part(part, device, quick, shapes_arg, budget, seed, checkpoint=lambda data: None, opts=None):
    """One part in this process: ``"base"`` (:func:`~fastcolor.app.bench.timing.part_base`),
    ``"modes"`` / ``"modes:<variant>"`` / ``"compile"`` (:func:`fastcolor.app.bench.modes.run`),
    ``"train"`` (:func:`fastcolor.app.bench.train_step.run`), ``"check:<provider>"``
    (:func:`part_check`) or a provider (:func:`part_provider`). ``opts``: the parsed arguments of
    the parts (``modes``, ``mode_backend``, ``models``, ``batches``, ``repeats``, ``precision``,
    ``checked``)."""
    opts = opts or {}
    if part == "base":
        return part_base(device, quick, shapes_arg, budget)
    if part.startswith("check:"):
        return part_check(part[len("check:"):], device, quick, budget, seed)
    if part == "modes" or part == "compile" or part.startswith("modes:"):
        variant = part[len("modes:"):] if part.startswith("modes:") else None
        if part == "compile":
            chosen = ("compile",)
        else:
            chosen = [m for m in (opts.get("modes") or modes_mod.MODES) if m != "compile" or not opts.get("split")]
        kw = {}
        if variant:
            kw = dict(backend=backend_of(variant), ops=tuple(o for o in modes_mod.OPS if o in _variant_ops(variant)),
                      variant=variant)
        with variant_env(variant or ""):
            rows = modes_mod.run(device, modes=chosen, quick=quick, shapes_arg=shapes_arg, budget=budget,
                                 seed=seed, checkpoint=lambda rows: checkpoint({"rows": rows}),
                                 **({"backend": opts.get("mode_backend") or "auto"} | kw))
        return {"rows": rows}
    if part == "train":
        return train_step.run(device, models=opts.get("models"), batches=opts.get("batches"),
                              repeats=opts.get("repeats"), precision=opts.get("precision") or "fp32", quick=quick,
                              budget=budget, checkpoint=checkpoint)
    return part_provider(part, device, quick, shapes_arg, budget, seed, checkpoint, checked=bool(opts.get("checked")))


def _variant_ops(variant: str) -> tuple[str, ...]:
    """The ops of the per-mode table an opt-in kernel changes."""
    ops = VARIANTS[variant][1]
    return tuple(o for o in ("loss_fwdbwd", "decode") if o in ops or (o == "loss_fwdbwd" and "loss_fwd" in ops))


def _part_opts(args) -> dict:
    return {"modes": _csv(args.modes), "mode_backend": args.mode_backend, "models": _csv(args.models),
            "batches": [int(b) for b in _csv(args.batches)] if args.batches else None, "repeats": args.repeats,
            "precision": args.precision, "checked": bool(args.checked), "split": bool(args.split_compile)}


def _csv(text):
    return [t for t in text.split(",") if t] if text else None


def _is_provider(part: str) -> bool:
    return part not in EXTRA_PARTS and part != "compile" and not part.startswith("modes:")


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
    for flag in ("checked", "split_compile"):
        if getattr(args, flag):
            cmd.append("--" + flag.replace("_", "-"))
    timeout = max(10.0, deadline - time.time() + 20) if deadline != float("inf") else None  # None: no limit
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None, timeout=timeout, text=True)
        with open(path) as f:
            text = f.read()
        data = json.loads(text) if text.strip() else None
        if data is None or proc.returncode != 0:
            msg = f"child exited with {proc.returncode}"
            data = data or ({"provider": part} if _is_provider(part) else {})
            data["crashed"] = msg
            log(f"[{part}] {msg}")
        return data
    except subprocess.TimeoutExpired:
        log(f"[{part}] child timed out after {timeout:.0f} s")
        data = read_json(path) or ({"provider": part} if _is_provider(part) else {})
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
                    help=f"comma-separated parts to run, of {list(PART_NAMES)} (default: all, in that order, on "
                         "cuda; base,providers on the CPU)")
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
                    help="wall-clock budget in seconds, split among the parts (bench/RESULTS.md: 300 for a lent "
                         "GPU's window); lower-priority work is dropped (default: 300 on cuda, 200 on the CPU, "
                         "none for --train-step)")
    ap.add_argument("--no-isolate", action="store_true", help="run every backend in this process (default on the CPU)")
    ap.add_argument("--isolate", action="store_true", help="run every backend in a child process (default on CUDA)")
    ap.add_argument("--seed", type=int, default=int(time.time()) % 100000)
    ap.add_argument("--part", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--checked", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--split-compile", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"{ap.prog}: error: --device cuda: no CUDA device is available here (torch {torch.__version__}, "
              f"CUDA {torch.version.cuda}); use --device cpu", file=sys.stderr)
        return 2
    shapes_arg = set(args.shapes.split(",")) if args.shapes else None
    if shapes_arg and not shapes_arg <= set(SHAPES):
        ap.error(f"--shapes: expected names from {sorted(SHAPES)}, got {sorted(shapes_arg)}")
    choices = {"modes": modes_mod.MODES, "models": train_step.MODELS, "parts": PART_NAMES}
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
        parts = list(PART_NAMES) if args.device == "cuda" else ["base", "providers"]
    if args.modes and "modes" not in parts and not args.parts:
        parts.insert(1, "modes")  # --modes alone asks for the per-mode table (the CPU default has none)
    budget_s = args.budget_s if args.budget_s is not None else (
        None if parts == ["train"] else 300.0 if args.device == "cuda" else 200.0)
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

    result = dict(meta=meta(args.device), args=vars(args), providers=[])
    _say_what_is_missing(args.device, result["meta"])
    steps = plan_parts(parts, args)
    args.checked = any(p.startswith("check:") for p in steps)
    args.split_compile = "compile" in steps
    opts = _part_opts(args)
    isolate = args.isolate or (args.device == "cuda" and not args.no_isolate)
    t0 = time.time()
    reserve = PART_SHARE["compile"] * budget_s if budget_s and "compile" in steps else 0.0
    for part in steps:
        log(f"== {part} ({time.time() - t0:.0f} s elapsed)")
        reason = None
        if _is_provider(part):
            reason = backends.unavailable_reason(backend_of(part.removeprefix("check:")), args.device)
        part_deadline = deadline
        if _share(part) and budget_s and len(steps) > 1:
            part_deadline = min(deadline, time.time() + _share(part) * budget_s)
        elif part != "compile":
            part_deadline = deadline - reserve  # the compile rows come last and keep their share
        if reason is not None:
            data = dict(provider=part.removeprefix("check:"), unavailable=reason, correctness=[], timing=[],
                        memory=[])
            log(f"[{part}] unavailable: {reason}")
        elif isolate:
            data = run_isolated(part, args, part_deadline)
        else:
            try:
                data = run_part(part, args.device, args.quick, shapes_arg, Budget(part_deadline), args.seed, opts=opts)
            except Exception as exc:  # noqa: BLE001
                log(traceback.format_exc())
                data = {"provider": part, "crashed": repr(exc)[:1000]}
        _merge(result, part, data)
        if args.json not in (None, "-"):  # after every part: a window that closes early keeps what was measured
            result["elapsed_s"] = time.time() - t0
            write_json(result, args.json)
    result["elapsed_s"] = time.time() - t0
    table = summarize(result)
    result["table"] = table
    if args.json:
        write_json(result, args.json)
    print(table, flush=True)
    failed = [f"check {p['provider']}" for p in result.get("check", [])
              if any(c.get("ok") is False for c in p.get("correctness", []))]
    failed += [p["provider"] for p in result["providers"]
               if any(c.get("ok") is False for c in p.get("correctness", []))]
    failed += [f"{r['op']} {r['mode']}" for r in result.get("modes", []) if r.get("ok") is False]
    failed += [f"train {r['label']} b{r['batch']}" for r in (result.get("train_step") or {}).get("rows", [])
               if r.get("check_ok") is False]
    if failed:
        log(f"correctness FAILED: {', '.join(failed)}")
    return 1 if failed else 0


#: the names ``--parts`` takes, in the order a CUDA run takes them (the default there)
PART_NAMES = ("check", "base", "modes", "train", "providers", "compile")


def plan_parts(parts, args) -> list[str]:
    """The concrete parts, in run order (see :data:`CHECKED`): ``check`` becomes one part per
    checked provider, ``modes`` adds the opt-in kernels' rows on CUDA, ``providers`` the backends
    and (on CUDA, beside triton) the opt-in kernels, ``compile`` comes last."""
    cuda = args.device == "cuda"
    providers = []
    if "providers" in parts:
        providers = args.providers.split(",") if args.providers else list(PROVIDERS[args.device])
        if (args.device == "cpu" and "triton" in providers and os.environ.get("TRITON_INTERPRET") != "1"
                and not args.providers):
            providers.remove("triton")
        if cuda and "triton" in providers and not args.providers:
            providers += list(VARIANTS)
    out = []
    if "check" in parts:
        wanted = args.providers.split(",") if args.providers else CHECKED
        out += [f"check:{p}" for p in wanted if p in CHECKED and (cuda or backend_of(p) != "cuda")]
    out += [p for p in ("base",) if p in parts]
    if "modes" in parts:
        out.append("modes")
        if cuda and (args.mode_backend or "auto") in ("auto", "triton"):
            out += [f"modes:{v}" for v in VARIANTS]
    out += [p for p in ("train",) if p in parts] + providers
    out += [p for p in ("compile",) if p in parts]
    return out


def _merge(result: dict, part: str, data: dict) -> None:
    """Put one part's data where the report reads it."""
    if part.startswith("check:"):
        result.setdefault("check", []).append(data)
    elif part == "base":
        result["base"] = data
    elif part in ("modes", "compile") or part.startswith("modes:"):
        result.setdefault("modes", []).extend(data.get("rows", []))
        if "crashed" in data:
            result["modes"].append({"op": "-", "shape": [], "dtype": "-", "mode": part, "error": data["crashed"]})
    elif part == "train":
        result["train_step"] = data
    else:
        result["providers"].append(data)


#: How to build the native extension on a machine (a lent GPU: its own Python, ~1 minute).
BUILD_COMMAND = "FASTCOLOR_CUDA_ARCHS=90 python3 -m pip install --no-deps --no-build-isolation -e ."


def _say_what_is_missing(device: str, m: dict) -> None:
    """Loudly, at the start: a missing ``fastcolor._C`` (the cuda backend would be reported
    unavailable, not measured) and versions outside the supported ones; both recorded in ``m``."""
    line = "!" * 78
    problems = version_problems()
    m["version_problems"] = problems
    if problems:
        log(f"{line}\nUNSUPPORTED VERSIONS: " + "; ".join(problems) + f"\n{line}")
    build = m.get("build") if isinstance(m.get("build"), dict) else {}
    if device == "cuda" and not (build.get("extension") and build.get("cuda")):
        why = build.get("reason") or "built without CUDA kernels"
        m["extension_missing"] = why
        log(f"{line}\nfastcolor._C (the cuda backend) is NOT available: {why}\nIt will be reported "
            f"unavailable, not measured. Build it first (about a minute):\n    {BUILD_COMMAND}\n{line}")
