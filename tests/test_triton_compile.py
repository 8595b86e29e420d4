"""Every Triton kernel variant compiles for sm_80 and sm_90 with the installed Triton and spills no
more than the stated bound (issue 21, acceptance): no GPU needed, :mod:`fastcolor.backends.
triton_backend.compile_check` runs Triton's LLVM and ptxas on the host. The variants a training
step and a decode launch (and the corners: k = 16, a SoftLabels target, odd images, lists of
pixels, probabilities) by default; every variant under ``-m slow``."""
from __future__ import annotations

import pytest

pytest.importorskip("triton")

from fastcolor.backends.triton_backend import compile_check as cc  # noqa: E402

pytestmark = pytest.mark.triton


def _compile_or_skip(v, arch):
    try:
        return cc.check([v], archs=(arch,), log=lambda line: None)[0]
    except FileNotFoundError as exc:  # pragma: no cover - a triton without its CUDA toolchain
        pytest.skip(f"no ptxas here: {exc}")


def _assert_ok(rec):
    assert "error" not in rec, cc._line(rec)
    assert rec["spill_bytes"] <= cc.SPILL_BOUND_BYTES, cc._line(rec)
    assert 0 < rec["registers"] <= 255


@pytest.mark.parametrize("arch", cc.ARCHS)
@pytest.mark.parametrize("v", cc.ci_variants(), ids=lambda v: v.name.replace(" ", "-"))
def test_kernel_variant_compiles_without_spills(v, arch):
    _assert_ok(_compile_or_skip(v, arch))


@pytest.mark.slow
@pytest.mark.parametrize("arch", cc.ARCHS)
@pytest.mark.parametrize("v", [v for v in cc.variants() if v.name not in cc.CI], ids=lambda v: v.name.replace(" ", "-"))
def test_every_other_kernel_variant_compiles_without_spills(v, arch):
    _assert_ok(_compile_or_skip(v, arch))


def test_the_variant_list_covers_every_kernel_and_flag():
    """Every @jit kernel of kernels.py that the host launches is in the list, with each value of
    each compile-time flag; the CI list names real variants."""
    from fastcolor.backends import triton_backend as tb

    km = cc._kernels_module()
    launched = {name for name in dir(km) if name.endswith("_kernel")}
    vs = cc.variants()
    assert {v.kernel for v in vs} == launched
    assert {v.layout for v in vs} == {"aligned", "odd", "rows"}
    assert {f for v in vs for f in v.flags} == {"ENCODE", "WRITE_GRAD", "IS_PROBS"}
    assert len(cc.ci_variants()) == len(cc.CI) and {v.kernel for v in cc.ci_variants()} == launched
    # the launch configuration is the host code's own
    v = next(v for v in vs if v.name == "ce_kernel fp32 aligned k16 WRITE_GRAD")
    assert cc.launch_config(v) == tb.config("ce", v.dtype, 4096, k=16, encode=False)


def test_a_spill_fails_the_check(monkeypatch):
    """The check can fail: a spill above the bound is reported and makes main() exit 1."""
    v = cc.ci_variants()[0]
    monkeypatch.setattr(cc, "compile_variant", lambda v, arch: type("C", (), {"asm": {"ptx": "x"}})())
    monkeypatch.setattr(cc, "resources", lambda ptx, arch: {"registers": 255, "spill_bytes": cc.SPILL_BOUND_BYTES + 8})
    rec = cc.check([v], archs=(90,), log=lambda line: None)[0]
    assert rec["ok"] is False and "OVER THE BOUND" in cc._line(rec)
    assert cc.main(["--arch", "90", "--match", v.name]) == 1
