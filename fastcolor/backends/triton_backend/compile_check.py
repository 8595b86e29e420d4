"""Every Triton kernel variant the host code launches, compiled for sm_80 and sm_90 without a GPU.

``triton.compile`` with a :class:`triton.backends.compiler.GPUTarget` runs Triton's own LLVM and
``ptxas`` on the host; ``ptxas -v`` on the PTX then reports each variant's registers and spills.
A GPU is lent only now and then: this check finds a kernel that no longer compiles, or that
spills (a register file too small for its tile: local-memory traffic on every logit), before one
does. ``python -m fastcolor.backends.triton_backend.compile_check`` prints the table and exits 1
when a variant fails or spills more than :data:`SPILL_BOUND_BYTES`; tests/test_triton_compile.py
runs it.

A variant is one launch configuration of :mod:`fastcolor.backends.triton_backend`: the kernel,
the logits' dtype, the compile-time flags (``ENCODE``, ``HAS_*``, ``WRITE_GRAD``, ``IS_PROBS``,
``ROWS``), k, and (BP, warps, register cap) from :func:`~fastcolor.backends.triton_backend.config`
for an aligned image (``P % 16 == 0``: pointers and ``P`` specialised as 16-divisible, as Triton
does at launch), an odd one, or a list of pixels (``ROWS``). All ``HAS_*`` flags are on (the most
registers); k is 5 (the paper's), 10 (the authors' code) and 16 (the most ``soft_encode`` takes).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

import torch

#: Spilled bytes (stores + loads, per thread, by ``ptxas -v``) a variant may have. 0: the launch
#: configurations of ``config()`` are chosen so that nothing spills (measured by this check with
#: triton 3.8 / ptxas 12.9 and 13.0 for sm_80 and sm_90).
SPILL_BOUND_BYTES = 0
ARCHS = (80, 90)
KS = (5, 10, 16)
_DT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@dataclass(frozen=True)
class Variant:
    """One compiled form of a kernel: its name, logits dtype, layout and compile-time flags."""

    kernel: str
    dtype: torch.dtype
    #: "aligned" (P % 16 == 0), "odd" (P % 16 != 0) or "rows" (a list of pixels, ROWS)
    layout: str
    k: int = 0
    flags: tuple = field(default_factory=tuple)

    @property
    def name(self) -> str:
        k = f" k{self.k}" if self.k else ""
        flags = "".join(f" {f}" for f in self.flags)
        return f"{self.kernel} {_DT[self.dtype]} {self.layout}{k}{flags}"


def variants() -> list[Variant]:
    """Every variant the host code can launch (the ``HAS_*`` flags all on)."""
    out = []
    for layout in ("aligned", "odd", "rows"):
        for k in KS:
            out.append(Variant("encode_kernel", torch.float32, layout, k))
        for dt in _DT:
            for k in KS:
                out.append(Variant("ce_kernel", dt, layout, k, ("ENCODE", "WRITE_GRAD")))
                out.append(Variant("ce_kernel", dt, layout, k, ("WRITE_GRAD",)))  # a SoftLabels target
            out.append(Variant("ce_kernel", dt, layout, 5, ("ENCODE",)))  # forward only (no_grad)
            for probs in ((), ("IS_PROBS",)):
                out.append(Variant("annealed_mean_kernel", dt, layout, 0, probs))
                out.append(Variant("annealed_mean_stream_kernel", dt, layout, 0, probs))
            if layout != "rows":  # lists of pixels, and k > PERSISTENT_K_MAX, take ce_kernel
                for k in (5,):
                    out.append(Variant("ce_persistent_kernel", dt, layout, k, ("ENCODE", "WRITE_GRAD")))
                    out.append(Variant("ce_persistent_kernel", dt, layout, k, ("WRITE_GRAD",)))
        if layout == "aligned":
            for dt in _DT:
                out.append(Variant("scale_kernel", dt, layout))
    return out


#: The variants tests/test_triton_compile.py compiles by default (``ci_variants``): each kernel on
#: the paths a training step and a decode take, and the corners (k = 16, a SoftLabels target, odd
#: images, lists of pixels, probabilities); the rest of :func:`variants` under ``-m slow``.
CI = (
    "encode_kernel fp32 aligned k5", "encode_kernel fp32 aligned k16", "encode_kernel fp32 rows k5",
    "ce_kernel fp32 aligned k5 ENCODE WRITE_GRAD", "ce_kernel bf16 aligned k5 ENCODE WRITE_GRAD",
    "ce_kernel fp32 aligned k16 WRITE_GRAD", "ce_kernel bf16 aligned k5 ENCODE",
    "ce_kernel fp32 odd k5 ENCODE WRITE_GRAD", "ce_kernel fp32 rows k5 ENCODE WRITE_GRAD",
    "annealed_mean_kernel fp32 aligned", "annealed_mean_kernel bf16 aligned",
    "annealed_mean_kernel bf16 aligned IS_PROBS", "annealed_mean_kernel fp32 rows",
    "annealed_mean_stream_kernel bf16 aligned", "annealed_mean_stream_kernel fp32 rows IS_PROBS",
    "ce_persistent_kernel bf16 aligned k5 ENCODE WRITE_GRAD", "ce_persistent_kernel fp32 aligned k5 WRITE_GRAD",
    "scale_kernel fp32 aligned", "scale_kernel bf16 aligned",
)


def ci_variants() -> list[Variant]:
    """The variants named in :data:`CI`, in that order."""
    by_name = {v.name: v for v in variants()}
    return [by_name[n] for n in CI]


#: the kind of :func:`~fastcolor.backends.triton_backend.config` each kernel is launched with
_KIND = {"encode_kernel": "enc", "ce_kernel": "ce", "ce_persistent_kernel": "ce_persistent",
         "annealed_mean_kernel": "am", "annealed_mean_stream_kernel": "am_stream", "scale_kernel": None}
#: argument name -> type, by kernel (``X`` stands for the logits' dtype)
_POINTERS = {"x_ptr": "X", "grad_ptr": "X", "g_ptr": "X", "ab_ptr": "fp32", "idx_ptr": "i32", "w_ptr": "fp32",
             "cw_ptr": "fp32", "mask_ptr": "fp32", "ps_ptr": "fp32", "offs_ptr": "i32", "tbins_ptr": "i16",
             "cent_ptr": "fp32", "loss_ptr": "fp32", "out_ptr": "fp32", "f_ptr": "fp32"}
_SCALARS = {"P": "i32", "T": "i32", "TPI": "i32", "numel": "i64", "neg_inv_two_sigma2": "fp32",
            "grad_scale": "fp32", "inv_t": "fp32"}


def launch_config(v: Variant) -> tuple[int, int, int | None]:
    """(BP, warps, register cap) the host code launches ``v`` with."""
    from fastcolor.backends import triton_backend as tb

    kind = _KIND[v.kernel]
    if kind is None:
        return tb.SCALE_BLOCK, 4, None
    p = {"aligned": 4096, "odd": 4095, "rows": 1000}[v.layout]
    return tb.config(kind, v.dtype, p, device=torch.device("cuda"), k=v.k or 5, encode="ENCODE" in v.flags,
                     probs="IS_PROBS" in v.flags)


@contextlib.contextmanager
def _no_interpreter():
    """TRITON_INTERPRET unset while kernels are decorated and compiled (tests set it for the rest)."""
    old = os.environ.pop("TRITON_INTERPRET", None)
    try:
        yield
    finally:
        if old is not None:
            os.environ["TRITON_INTERPRET"] = old


def _kernels_module():
    """A fresh, compiled (not interpreted) instance of kernels.py, whatever TRITON_INTERPRET says."""
    import importlib.util

    from fastcolor.backends import triton_backend as tb

    name = "fastcolor.backends.triton_backend._kernels_compile_check"
    if name in sys.modules:
        return sys.modules[name]
    with _no_interpreter():
        spec = importlib.util.spec_from_file_location(name, os.path.join(os.path.dirname(tb.__file__), "kernels.py"))
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod  # inspect.getsource needs to find it
        spec.loader.exec_module(mod)
    return mod


def compile_variant(v: Variant, arch: int):
    """``triton.compile`` of ``v`` for ``sm_<arch>``: the compiled kernel (``.asm["ptx"]``,
    ``.asm["cubin"]``)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fastcolor.backends import triton_backend as tb

    km = _kernels_module()
    fn = getattr(km, v.kernel)
    bp, warps, maxnreg = launch_config(v)
    consts: dict = {}
    if v.kernel == "scale_kernel":
        consts = dict(BLOCK=bp)
    else:
        consts = dict(BP=bp)
        if "ROWS" in fn.arg_names:
            consts["ROWS"] = v.layout == "rows"
    if v.k:
        _, knn = tb._knn_consts(v.k, "cpu")
        consts.update(knn)
    if v.kernel.startswith("ce"):
        consts.update(ENCODE="ENCODE" in v.flags, HAS_CW=True, HAS_MASK=True, HAS_PS=True,
                      WRITE_GRAD="WRITE_GRAD" in v.flags)
    if v.kernel.startswith("annealed"):
        consts["IS_PROBS"] = "IS_PROBS" in v.flags
    if v.kernel == "ce_persistent_kernel":
        consts["QC"] = tb.PERSISTENT_CLASSES
    if v.kernel == "annealed_mean_stream_kernel":
        consts["QC"] = tb.STREAM_CLASSES
    sig = {}
    for a in fn.arg_names:
        if a in consts:
            sig[a] = "constexpr"
        elif a in _POINTERS:
            t = _POINTERS[a]
            sig[a] = "*" + (_DT[v.dtype] if t == "X" else t)
        else:
            sig[a] = _SCALARS[a]
    # Triton specialises at launch: torch's allocations are 16-byte aligned; P % 16 == 0 for an
    # aligned image (the loads along pixels then vectorise).
    div16 = [a for a in fn.arg_names if a in _POINTERS] + (["P"] if v.layout == "aligned" else [])
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in div16 if a in sig and a not in consts}
    opts = dict(num_warps=warps)
    if maxnreg:
        opts["maxnreg"] = maxnreg
    with _no_interpreter():
        return triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                              target=GPUTarget("cuda", arch, 32), options=opts)


def ptxas_path() -> str:
    """The ptxas Triton itself uses (its bundled one unless ``TRITON_PTXAS_PATH`` says otherwise)."""
    try:
        from triton import knobs

        return knobs.nvidia.ptxas.path
    except (ImportError, AttributeError):  # pragma: no cover - a triton without knobs
        import triton.backends.nvidia as nv

        return os.path.join(os.path.dirname(nv.__file__), "bin", "ptxas")


_USAGE = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def resources(ptx: str, arch: int) -> dict:
    """Registers and spilled bytes of the one kernel in ``ptx``, by ``ptxas -v`` for ``sm_<arch>``."""
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        target = re.search(r"^\.target\s+(sm_\w+)", ptx, re.M)  # sm_90a for 90, as triton writes it
        gpu = target.group(1) if target else f"sm_{arch}"
        proc = subprocess.run([ptxas_path(), "-v", f"--gpu-name={gpu}", src, "-o", os.path.join(d, "k.o")],
                              capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed for sm_{arch}: {log[-2000:]}")
    regs, spill = _USAGE.search(log), _SPILL.search(log)
    if regs is None or spill is None:
        raise RuntimeError(f"ptxas -v printed no register/spill line: {log[-2000:]}")
    return dict(registers=int(regs.group(1)), spill_bytes=int(spill.group(1)) + int(spill.group(2)))


def check(selected: list[Variant] | None = None, archs=ARCHS, log=print) -> list[dict]:
    """Compile every variant for every arch; one record each (``ok`` False on an error or on more
    than :data:`SPILL_BOUND_BYTES` spilled)."""
    rows = []
    for v in selected if selected is not None else variants():
        for arch in archs:
            rec = dict(variant=v.name, arch=arch, config=launch_config(v))
            try:
                c = compile_variant(v, arch)
                rec.update(resources(c.asm["ptx"], arch))
                rec["ok"] = rec["spill_bytes"] <= SPILL_BOUND_BYTES
            except Exception as exc:  # noqa: BLE001 - record it, check the others
                rec.update(ok=False, error=f"{type(exc).__name__}: {str(exc)[:500]}")
            rows.append(rec)
            log(_line(rec))
    return rows


def _line(rec: dict) -> str:
    bp, warps, cap = rec["config"]
    head = f"sm_{rec['arch']} {rec['variant']:<52} BP {bp:>4} x{warps} cap {cap or '-':>3}"
    if "error" in rec:
        return f"{head}: FAILED {rec['error']}"
    return (f"{head}: {rec['registers']:>3} registers, {rec['spill_bytes']:>4} bytes spilled"
            f"{'' if rec['ok'] else '  OVER THE BOUND'}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastcolor.backends.triton_backend.compile_check",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default=",".join(map(str, ARCHS)), help="comma-separated compute capabilities")
    ap.add_argument("--match", default="", help="only variants whose name contains this text")
    ap.add_argument("--ci", action="store_true", help="only the variants of CI (what the tests compile by default)")
    args = ap.parse_args(argv)
    archs = tuple(int(a) for a in args.arch.split(","))
    rows = check([v for v in (ci_variants() if args.ci else variants()) if args.match in v.name], archs)
    bad = [r for r in rows if not r["ok"]]
    print(f"{len(rows) - len(bad)}/{len(rows)} ok (spill bound {SPILL_BOUND_BYTES} bytes)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
