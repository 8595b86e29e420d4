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
import torch

from fastcolor.app import bench, cli
from fastcolor.app.bench import common, correctness, modes, report, timing


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
                           "--providers", "torch,nonesuch", "--json"],
                          capture_output=True, text=True, env=env, timeout=300)
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
             "timing": [{"op": "loss_fwdbwd", "shape_name": "zhang", "dtype": "float32", "provider": "triton",
                         "ms": 0.5, "gbps": 800.0}],
             "memory": [{"dtype": "float32", "ratio": 1.01, "extra_per_pixel": 12.0}], "int64": {"ok": True},
             "sweep": [{"kernel": "ce", "dtype": "float32", "config": [32, 4, 160], "k": 5, "encode": "fused",
                        "ms": 0.5, "gbps": 800.0}]},
            {"provider": "torch", "correctness": [], "timing": [
                {"op": "loss_fwdbwd", "shape_name": "zhang", "dtype": "float32", "provider": "torch",
                 "ms": 5.0, "gbps": 80.0}]},
            {"provider": "cuda", "unavailable": "not built"},
            {"provider": "numba", "crashed": "child exited with -11",
             "correctness": [{"check": "loss", "case": "b", "ok": False}]},
        ],
    }
    table = report.summarize(result)
    row = [ln for ln in table.splitlines() if ln.startswith("| loss_fwdbwd")][0]
    assert "| 5.000 | 0.500 |" in row and "| 10.0 |" in row and "80%" in row
    assert result["providers"][0]["timing"][0]["speedup_vs_torch"] == pytest.approx(10.0)
    assert "cuda: unavailable (not built)" in table and "numba: CRASHED" in table and "FAILED: loss:b" in table
    assert "peak mem float32 = 1.01 x grad" in table and "int64 offsets ok" in table and "sweep (zhang)" in table
    assert not common.Budget(0.0).ok() and common.Budget(1e12).ok(5)


def test_device_cuda_without_cuda_is_one_line(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert bench.main(["--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--device cuda: no CUDA device is available" in err[0] and "use --device cpu" in err[0]
    assert cli.main(["bench", "--device", "cuda", "--train-step"]) == 2  # the same through the CLI
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fastcolor: error: --device cuda: no CUDA device")


def test_bad_mode_arguments_name_the_option(capsys):
    for argv, msg in ((["--modes", "kernel,jit"], "--modes: expected names from"),
                      (["--parts", "modes,gpu"], "--parts: expected names from"),
                      (["--mode-backend", "nonesuch"], "--mode-backend: unknown backend 'nonesuch'")):
        with pytest.raises(SystemExit) as exc:
            bench.main(["--device", "cpu", *argv])
        assert exc.value.code == 2 and msg in capsys.readouterr().err


def test_op_bytes_are_the_fewest_bytes():
    n, q, h, w = common.SHAPES["zhang"]
    px = n * h * w
    for dtype, es in ((torch.float32, 4), (torch.bfloat16, 2)):
        # logits read once (and the gradient written once), ab (2 float32) read, the per-pixel loss written
        assert timing.op_bytes("loss_fwdbwd", (n, q, h, w), dtype) == 2 * px * q * es + px * (8 + 4)
        assert timing.op_bytes("loss_fwd", (n, q, h, w), dtype) == px * q * es + px * (8 + 4)
        assert timing.op_bytes("decode", (n, q, h, w), dtype) == px * q * es + px * 8  # ab written
    assert timing.op_bytes("encode", (n, q, h, w), torch.float32, k=5) == px * 8 + px * 5 * 8  # int32 + float32
    assert common.SHAPES["large"] == (64, q, 128, 128)


def test_modes_on_the_cpu(tmp_path):
    out = tmp_path / "m.json"
    rc = bench.main(["--device", "cpu", "--quick", "--modes", "kernel,eager,graph", "--parts", "modes",
                     "--json", str(out)])
    data = json.loads(out.read_text())
    rows = data["modes"]
    assert rc == 0 and [(r["op"], r["mode"]) for r in rows] == [
        (op, m) for op in modes.OPS for m in ("kernel", "eager", "graph")]
    for r in rows:
        if r["mode"] == "graph":
            assert r["skipped"] == "CUDA graphs need a CUDA device"
            continue
        assert r["ok"], r
        shape = tuple(r["shape"])
        assert r["bytes"] == timing.op_bytes(r["op"], shape, torch.float32)
        assert r["p10_us"] <= r["us"] <= r["p90_us"] and r["gbps"] == pytest.approx(r["bytes"] / r["us"] / 1e3)
        assert r["pct_copy"] == pytest.approx(100 * r["copy_us"] / r["us"])
        assert r["launches"] is None and r["syncs"] is None and r["peak_bytes"] is None  # CUDA only
    assert "### Each op per mode" in data["table"] and "| loss_fwdbwd | 1x313x5x7 | float32 | eager |" in data["table"]


def test_a_wrong_op_fails_the_modes_check(monkeypatch):
    real = modes.build

    def broken(case, mode):
        fn, out, release = real(case, mode)

        def bad():
            fn()
            if "ab" in out:
                out["ab"] = out["ab"] * 1.01
        return bad, out, release

    monkeypatch.setattr(modes, "build", broken)
    rows = modes.run("cpu", modes=("eager",), quick=True)
    assert [r["ok"] for r in rows] == [True, False, True]  # only the decode was spoilt
    assert rows[1]["rel_err"] == pytest.approx(0.01, rel=1e-3)


def test_modes_table_of_a_gpu_row():
    row = {"op": "decode", "shape": [40, 313, 64, 64], "dtype": "bfloat16", "mode": "graph", "backend": "triton",
           "bytes": 105_000_000, "us": 50.0, "p10_us": 49.0, "p90_us": 52.0, "gbps": 2100.0, "pct_copy": 91.0,
           "pct_read": 88.0, "host_us": 8.5, "ok": True, "rel_err": 3e-7, "peak_bytes": 2_000_000,
           "launches": {"host_launches": 1.0, "device_ops": 2.0, "device_us": 48.0, "device_names": []},
           "syncs": {"syncs_per_call": 0.0, "calls_raising": 0, "calls": 3}}
    failed = {"op": "loss_fwdbwd", "shape": [40, 313, 64, 64], "dtype": "float32", "mode": "graph", "backend": "triton",
              "error": "RuntimeError('operation not permitted when stream is capturing')"}
    table = report.modes_table([row, failed], peak_gbps=4200.0)
    line = [ln for ln in table.splitlines() if ln.startswith("| decode")][0]
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[5:] == ["105", "50.0", "49.0", "52.0", "2100.0", "91", "88", "50", "1 / 2", "48.0", "8.5", "0.0 (0/3)",
                         "2.0", "ok 3e-07"]
    assert row["pct_peak"] == pytest.approx(50.0) and "4200 GB/s" in table
    bad = [ln for ln in table.splitlines() if ln.startswith("| loss_fwdbwd")][0]
    assert "stream is capturing" in bad and bad.count("|") == line.count("|")


# ----------------------------------------------------------------------------- the device script (issue 21.3)


def test_cuda_run_order_checks_first_compile_last_opt_in_kernels_beside_the_defaults():
    from fastcolor.app.bench import driver

    args = driver.argparse.Namespace(device="cuda", providers=None, mode_backend=None)
    steps = driver.plan_parts(list(driver.PART_NAMES), args)
    assert steps == ["check:triton", "check:triton:persistent", "check:triton:stream", "check:cuda", "base",
                     "modes", "modes:triton:persistent", "modes:triton:stream", "train",
                     "torch", "cuda", "triton", "triton:persistent", "triton:stream", "compile"]
    cpu = driver.plan_parts(["check", "base", "providers"], driver.argparse.Namespace(
        device="cpu", providers="torch,triton", mode_backend=None))
    assert cpu == ["check:triton", "base", "torch", "triton"]  # no cuda check, no opt-in timings on the CPU
    assert sum(driver._share(p) or 0 for p in steps) <= 0.8  # the providers keep at least a fifth of the budget


def test_json_is_written_after_every_part_and_a_crash_loses_only_its_part(monkeypatch, tmp_path):
    from fastcolor.app.bench import driver

    out = tmp_path / "b.json"
    seen = {}
    real = driver.run_part

    def spy(part, *a, **kw):
        seen[part] = json.loads(out.read_text()) if out.exists() else None
        if part == "torch":
            raise RuntimeError("planted crash")
        return real(part, *a, **kw)

    monkeypatch.setattr(driver, "run_part", spy)
    rc = bench.main(["--device", "cpu", "--quick", "--parts", "check,base,providers", "--providers", "cpp,torch",
                     "--json", str(out)])
    assert list(seen) == ["base", "cpp", "torch"]  # (no check on the CPU without the interpreter's triton)
    assert seen["base"] is None and "base" in seen["cpp"] and [p["provider"] for p in seen["torch"]["providers"]] \
        == ["cpp"]
    data = json.loads(out.read_text())
    cpp, torch_part = data["providers"]
    assert torch_part["crashed"].startswith("RuntimeError('planted crash") and cpp["correctness"] and rc == 0


@pytest.mark.triton
def test_check_part_runs_triton_and_its_opt_in_kernels_first(interp, tmp_path, monkeypatch):
    from fastcolor.app.bench import driver

    pytest.importorskip("triton")
    monkeypatch.setattr(driver, "CHECKED", ("triton", "triton:stream"))
    monkeypatch.setattr(correctness, "loss_cases", lambda quick: [])  # the decode and encode checks suffice here
    out = tmp_path / "c.json"
    rc = bench.main(["--device", "cpu", "--quick", "--parts", "check", "--providers", "triton,triton:stream",
                     "--budget-s", "3000", "--json", str(out)])
    data = json.loads(out.read_text())
    assert rc == 0 and [c["provider"] for c in data["check"]] == ["triton", "triton:stream"]
    for part in data["check"]:
        assert part["correctness"] and all(c["ok"] for c in part["correctness"]), part
    assert "### Correctness first" in data["table"] and "- triton:stream: " in data["table"]


def test_a_missing_extension_and_old_versions_are_said_loudly(monkeypatch, capsys):
    from fastcolor.app.bench import driver

    monkeypatch.setattr(driver, "version_problems", lambda: ["torch 2.9.0 is older than supported (>= 2.11)"])
    m = {"build": {"extension": False, "reason": "No module named 'fastcolor._C'", "cuda": False}}
    driver._say_what_is_missing("cuda", m)
    err = capsys.readouterr().err
    assert "fastcolor._C (the cuda backend) is NOT available: No module named" in err
    assert driver.BUILD_COMMAND in err and "UNSUPPORTED VERSIONS: torch 2.9.0" in err
    assert m["extension_missing"] and m["version_problems"]
    m = {"build": {"extension": True, "cuda": True}}
    monkeypatch.setattr(driver, "version_problems", lambda: [])
    driver._say_what_is_missing("cuda", m)
    assert capsys.readouterr().err == "" and "extension_missing" not in m


@pytest.mark.triton
def test_opt_in_kernel_rows_beside_the_defaults(interp):
    """``modes:triton:stream``: the decode rows of the per-mode table with the streaming kernel,
    labelled with the variant; the default modes part leaves compile to its own part when split."""
    from fastcolor.app.bench import driver

    pytest.importorskip("triton")
    data = driver.run_part("modes:triton:stream", "cpu", True, None, common.Budget(float("inf")), 0,
                           opts={"modes": ["kernel", "eager"]})
    rows = data["rows"]
    assert [(r["op"], r["mode"], r["variant"]) for r in rows] == [("decode", "kernel", "triton:stream"),
                                                                   ("decode", "eager", "triton:stream")]
    assert all(r["ok"] and r["backend"] == "triton" for r in rows), rows
    assert "FASTCOLOR_TRITON_DECODE" not in os.environ  # the variant's environment is restored
    table = report.modes_table(rows, None)
    assert "| decode | 1x313x5x7 | float32 | kernel | triton:stream |" in table
