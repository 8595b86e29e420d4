"""The benchmark's report: the run's metadata, the markdown summary (speed-ups over torch and
fractions of the peak bandwidth), and the JSON file."""
from __future__ import annotations

import json
import os
import platform
import time

import numpy as np
import torch

import fastcolor as fc


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
    info.update(cpu=_cpu_model(), cores=os.cpu_count(), torch_threads=torch.get_num_threads())
    try:
        import sklearn

        info["sklearn"] = sklearn.__version__
    except ImportError:
        info["sklearn"] = None
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def machine_line(m: dict) -> str:
    """One line naming the machine and the versions, for the head of a table."""
    dev = f"{m['gpu']} (sm {m.get('capability')}, {m.get('memory_gb')} GiB); " if m.get("gpu") else ""
    return (f"Machine: {dev}{m.get('cpu')} ({m.get('cores')} cores, torch {m.get('torch_threads')} threads); "
            f"Python {m.get('python')}, torch {m.get('torch')}, numpy {m.get('numpy')}, triton {m.get('triton')}, "
            f"scikit-learn {m.get('sklearn')}, fastcolor {m.get('fastcolor')}; {m.get('time')}.")


#: the variants of the training-step table, as its legend names them
TRAIN_VARIANTS = {
    "fused": "fused: fastcolor.rebalanced_cross_entropy (ab in, backend {backend})",
    "plain": "plain: the PyTorch loss a user writes (cdist, top-5, Gaussian, dense N x 313 x H x W target, "
             "log_softmax)",
    "authors": "authors: k-NN encoding of each batch on the CPU (scikit-learn, as the authors' Caffe layer), "
               "dense target copied to the device, dense soft-target loss",
    "floor": "floor: the network alone with logits.mean() as the loss",
}


def train_step_table(ts: dict, m: dict) -> str:
    """The training-step table (see :mod:`~fastcolor.app.bench.train_step`) as markdown."""
    out = [f"### Training step (Adam: forward, loss, backward, step) on {ts.get('device')}, {ts.get('precision')}",
           "", machine_line(m) + " The variants take turns, round-robin, the order rotated each round; n: steps "
           "timed per variant; ms per step: median, p10, p90.", ""]
    checks = []
    for r in ts.get("rows", []):
        c = r.get("check")
        if c:
            checks.append(f"{r['label']} b{r['batch']}: plain {c['plain_loss_rel']:.1e} "
                          f"(grad {c['plain_grad_rel']:.1e}), "
                          f"authors {c['authors_loss_rel']:.1e} (grad {c['authors_grad_rel']:.1e}) "
                          f"{'ok' if r.get('check_ok') else 'FAILED'}")
    if checks:
        out += ["Correctness (relative difference of the loss and of its gradient from the fused loss, same logits, "
                "before the first step): " + "; ".join(checks) + ".", ""]
    out += ["| model | input | batch | loss | n | ms/step | p10 | p90 | images/s | above floor |",
            "|---|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in ts.get("rows", []):
        head = f"| {r['label']} | {r['px']} px | {r['batch']} |"
        if "variants" not in r:
            out.append(f"{head} {r.get('error') or r.get('skipped')} | | | | | | |")
            continue
        for v, rec in r["variants"].items():
            above = "-" if v == "floor" else f"{100 * rec['above_floor']:+.1f}% ({rec['above_floor_ms']:+.1f} ms)"
            out.append(f"{head} {v} | {rec['repeats']} | {rec['ms']:.1f} | {rec['p10']:.1f} | {rec['p90']:.1f} | "
                       f"{rec['images_per_s']:.2f} | {above} |")
    out += [""] + [f"- {TRAIN_VARIANTS[v].format(backend=ts.get('backend'))}" for v in TRAIN_VARIANTS]
    return "\n".join(out)


def _fmt(v, spec=".1f", none="-"):
    return none if v is None else format(v, spec)


def modes_table(rows: list, peak_gbps: float | None) -> str:
    """The per-op, per-mode table (see :mod:`~fastcolor.app.bench.modes`) as markdown; adds
    ``pct_peak`` (of the run's 2 GiB copy) to each row."""
    out = ["### Each op per mode: kernel alone, eager, CUDA-graph replay, torch.compile", "",
           "MB: the fewest bytes the op must move; % copy / % read: of a copy / a read of that many bytes timed in "
           "this run" + (f"; % 2 GiB: of the run's 2 GiB copy ({peak_gbps:.0f} GB/s)" if peak_gbps else "")
           + "; launches: host launch calls / device operations per call; device us: their device time per call "
           "(profiler); host us: per call, not waiting for the device; syncs: per call (warn mode) and calls "
           "raising of those tried (error mode); err: image 0 against fastcolor.reference.", "",
           "| op | shape | dtype | mode | backend | MB | us | p10 | p90 | GB/s | % copy | % read | % 2 GiB | launches "
           "| device us | host us | syncs | peak MB | err |",
           "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---|---:|---|"]
    for r in rows:
        shape = "x".join(map(str, r["shape"]))
        head = f"| {r['op']} | {shape} | {r['dtype']} | {r['mode']} | {r.get('variant') or r.get('backend', '-')} |"
        if "us" not in r:
            msg = (r.get("error") or r.get("skipped") or "?").replace("|", "/")[:160]
            out.append(f"{head} {msg} |" + " |" * 13)
            continue
        if peak_gbps:
            r["pct_peak"] = 100 * r["gbps"] / peak_gbps
        la, sy = r.get("launches"), r.get("syncs")
        launch = f"{la['host_launches']:.0f} / {la['device_ops']:.0f}" if la else "-"
        sync = f"{sy['syncs_per_call']:.1f} ({sy['calls_raising']}/{sy['calls']})" if sy else "-"
        peak = None if r.get("peak_bytes") is None else r["peak_bytes"] / 1e6
        err = max(r.get(k, 0.0) for k in ("rel_err_grad", "rel_err_loss", "rel_err", "max_abs_err_weights",
                                           "index_mismatch"))
        out.append(f"{head} {r['bytes'] / 1e6:.3g} | {r['us']:.1f} | {r['p10_us']:.1f} | {r['p90_us']:.1f} | "
                   f"{r['gbps']:.1f} | {r['pct_copy']:.0f} | {r['pct_read']:.0f} | {_fmt(r.get('pct_peak'), '.0f')} | "
                   f"{launch} | {_fmt(la and la['device_us'])} | {r['host_us']:.1f} | {sync} | {_fmt(peak)} | "
                   f"{'ok' if r.get('ok') else 'FAILED'} {err:.0e} |")
    return "\n".join(out)


def summarize(result):
    """The markdown report: the training-step table and the per-mode table where the run made
    them, then the backends' table (speed-ups over torch, fractions of the peak bandwidth; added
    to the records too) where it timed backends."""
    peak = (result.get("base") or {}).get("peak_copy", {}).get("gbps")
    sections = []
    if result.get("check"):
        sections.append(check_lines(result["check"]))
    if result.get("train_step"):
        sections.append(train_step_table(result["train_step"], result.get("meta", {})))
    if result.get("modes"):
        sections.append(modes_table(result["modes"], peak))
    if result.get("providers") or result.get("base"):
        sections.append(_providers_table(result, peak))
    return "\n\n".join(sections)


def check_lines(checks: list) -> str:
    """The correctness parts run first (``check:<provider>``), one line each."""
    out = ["### Correctness first (against fastcolor.reference)", ""]
    for part in checks:
        name = part.get("provider", "?").removeprefix("check:")
        if "unavailable" in part:
            out.append(f"- {name}: unavailable ({part['unavailable']})")
            continue
        cs = part.get("correctness", [])
        bad = [c for c in cs if c.get("ok") is False]
        line = f"- {name}: {sum(bool(c.get('ok')) for c in cs)}/{len(cs)} ok"
        if bad:
            line += "; FAILED: " + ", ".join(f"{c['check']}:{c['case']}" for c in bad)
        if "crashed" in part:
            line += f"; CRASHED ({part['crashed'][-300:]})"
        out.append(line)
    return "\n".join(out)


def _providers_table(result, peak):
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
    out.append(f"### fastcolor bench: {m.get('gpu') or m.get('platform')}, torch {m.get('torch')}, "
               f"triton {m.get('triton')}" + (f", copy peak {peak:.0f} GB/s" if peak else ""))
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
            out.append("  - sweep (zhang): " + "; ".join(_sweep_cell(s, peak) for s in sw))
    out.append("")
    out.extend(lines)
    return "\n".join(out)


def _sweep_cell(s, peak):
    """One sweep record as text: kernel, dtype, config, k, encode mode, ms and (with a peak) % of peak."""
    config = "x".join(str(c) for c in s["config"])
    k = f" k{s['k']}" if s["k"] else ""
    encode = f" {s['encode']}" if s["encode"] else ""
    pct = f" {100 * s['gbps'] / peak:.0f}%" if peak else ""
    return f"{s['kernel']} {s['dtype']} {config}{k}{encode}: {s['ms']:.3f} ms{pct}"


def write_json(data, path):
    """``data`` as JSON to ``path`` (stdout for None or "-")."""
    text = json.dumps(data, indent=1, default=_json_default, allow_nan=True)
    if path in (None, "-"):
        print(text, flush=True)
    else:  # atomically: a child killed mid-write leaves its last checkpoint intact
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.replace(path + ".tmp", path)


def read_json(path):
    """The JSON in ``path``, or None when it is missing, empty or torn."""
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
