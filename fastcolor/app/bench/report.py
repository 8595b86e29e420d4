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
    return info


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
