"""The benchmark driver (:mod:`fastcolor.app.bench`, ``python -m fastcolor.bench``) runs end to end
before a GPU ever sees it: on CPU tensors, tiny shapes, with triton through its interpreter
(``TRITON_INTERPRET=1``: the registry then takes CPU tensors for triton), in-process and with
each backend in a child process; a failing backend or check is recorded and the run goes on;
the report ends with the markdown table."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from fastcolor.app import bench
from fastcolor.app.bench import common, correctness, report


@pytest.fixture
def interp(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.mark.triton
def test_quick_cpu_run_every_provider(interp, tmp_path, capsys):
    pytest.importorskip("triton")
    out = tmp_path / "bench.json"
    rc = bench.main(["--device", "cpu", "--quick", "--json", str(out), "--seed", "3"])
    data = json.loads(out.read_text())
    names = [p["provider"] for p in data["providers"]]
    assert names == ["cpp", "numba", "torch", "triton"]
    for part in data["providers"]:
        if "unavailable" in part:  # cpp without the extension, numba not installed
            assert part["provider"] in ("cpp", "numba")
            continue
        assert part["correctness"] and all(c["ok"] for c in part["correctness"]), part["correctness"]
        checks = {c["check"] for c in part["correctness"]}
        assert checks == {"loss", "contract", "encode", "decode"}
        timed = [t for t in part["timing"] if "ms" in t]
        assert {t["op"] for t in timed} == {"loss_fwd", "loss_fwdbwd", "decode", "encode"}
        assert all(t["ms"] > 0 and t["bytes"] > 0 for t in timed)
    assert rc == 0
    stdout = capsys.readouterr().out
    assert stdout.rstrip().splitlines()[-1].startswith("| softmax")  # the table comes last
    assert "triton: correctness" in data["table"] and "| op | shape | dtype | torch ms" in stdout


def test_isolated_children_and_json_to_stdout():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd()] + sys.path))
    proc = subprocess.run([sys.executable, "-m", "fastcolor.bench", "--device", "cpu", "--quick", "--isolate",
                           "--providers", "torch,nonesuch", "--json"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    head, table = proc.stdout.split("\n### fastcolor bench", 1)
    data = json.loads(head)
    torch_part, bogus = data["providers"]
    assert all(c["ok"] for c in torch_part["correctness"]) and "crashed" not in torch_part
    assert "unknown backend" in bogus["unavailable"]
    assert "nonesuch: unavailable" in table and table.rstrip().splitlines()[-1].startswith("|")


def test_a_failing_check_is_recorded_and_the_run_goes_on(monkeypatch, tmp_path):
    def broken(*a, **kw):
        raise RuntimeError("planted failure")

    monkeypatch.setattr(correctness, "check_encode", broken)
    out = tmp_path / "b.json"
    rc = bench.main(["--device", "cpu", "--quick", "--providers", "torch", "--json", str(out)])
    assert rc == 1  # a failed check fails the run, after everything else ran
    part = json.loads(out.read_text())["providers"][0]
    failed = [c for c in part["correctness"] if not c["ok"]]
    assert len(failed) == 3 and all("planted failure" in c["error"] for c in failed)
    assert sum(c["ok"] for c in part["correctness"]) >= 8 and any("ms" in t for t in part["timing"])


def test_summary_ratios_and_budget():
    result = {
        "meta": {"gpu": "fake", "torch": "x", "triton": "y"},
        "base": {"peak_copy": {"gbps": 1000.0}, "yardsticks": [
            {"op": "softmax", "shape_name": "zhang", "dtype": "float32", "ms": 1.0, "gbps": 500.0}]},
        "providers": [
            {"provider": "triton", "correctness": [{"check": "loss", "case": "a", "ok": True, "rel_err_grad": 1e-6}],
             "timing": [{"op": "loss_fwdbwd", "shape_name": "zhang", "dtype": "float32", "provider": "triton", "ms": 0.5, "gbps": 800.0}],
             "memory": [{"dtype": "float32", "ratio": 1.01, "extra_per_pixel": 12.0}], "int64": {"ok": True},
             "sweep": [{"kernel": "ce", "dtype": "float32", "config": [32, 4, 160], "k": 5, "encode": "fused", "ms": 0.5, "gbps": 800.0}]},
            {"provider": "torch", "correctness": [], "timing": [
                {"op": "loss_fwdbwd", "shape_name": "zhang", "dtype": "float32", "provider": "torch", "ms": 5.0, "gbps": 80.0}]},
            {"provider": "cuda", "unavailable": "not built"},
            {"provider": "numba", "crashed": "child exited with -11", "correctness": [{"check": "loss", "case": "b", "ok": False}]},
        ],
    }
    table = report.summarize(result)
    row = [ln for ln in table.splitlines() if ln.startswith("| loss_fwdbwd")][0]
    assert "| 5.000 | 0.500 |" in row and "| 10.0 |" in row and "80%" in row
    assert result["providers"][0]["timing"][0]["speedup_vs_torch"] == pytest.approx(10.0)
    assert "cuda: unavailable (not built)" in table and "numba: CRASHED" in table and "FAILED: loss:b" in table
    assert "peak mem float32 = 1.01 x grad" in table and "int64 offsets ok" in table and "sweep (zhang)" in table
    assert not common.Budget(0.0).ok() and common.Budget(1e12).ok(5)
