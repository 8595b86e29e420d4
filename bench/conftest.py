"""Options and fixtures of the CPU benchmarks (bench/test_bench_cpu.py).

    --bench-shapes small,zhang,seed   shapes to time (see SHAPES in test_bench_cpu.py)
    --bench-dtypes float32            logits dtypes (float32, bfloat16, float16)
    --ratio-table PATH                at the end, write the markdown ratio table there

and of the training-step benchmarks (bench/test_bench_train_step.py):

    --train-models zhang,small        models (see fastcolor.app.bench.train_step.MODELS)
    --train-batches 2,4               batch sizes for every model (default: each model's own)
    --train-rounds 3                  timed steps per case
"""
from __future__ import annotations

import sys

import pytest

_RESULTS: list[dict] = []


def pytest_addoption(parser):
    group = parser.getgroup("fastcolor-bench")
    group.addoption("--bench-shapes", default="small,zhang,seed", help="comma-separated shape names")
    group.addoption("--bench-dtypes", default="float32", help="comma-separated logits dtypes")
    group.addoption("--ratio-table", default=None, help="write the markdown ratio table to this path")
    group.addoption("--train-models", default="zhang,small", help="training step: comma-separated models")
    group.addoption("--train-batches", default="", help="training step: batch sizes (default: each model's own)")
    group.addoption("--train-rounds", type=int, default=3, help="training step: timed steps per case")


@pytest.fixture(scope="session")
def bench_results():
    return _RESULTS


@pytest.fixture(scope="session")
def bench_inputs():
    """inputs(shape_name, dtype_name) -> test_bench_cpu.Inputs, the latest one kept (they are
    large: the zhang float32 logits alone are 205 MB)."""
    mod = sys.modules.get("test_bench_cpu") or sys.modules.get("bench.test_bench_cpu")
    held: dict = {}

    def get(shape: str, dtype: str):
        key = (shape, dtype)
        if key not in held:
            held.clear()
            held[key] = mod.Inputs(shape, mod.DTYPES[dtype])
        return held[key]

    return get


def pytest_sessionfinish(session, exitstatus):
    path = session.config.getoption("--ratio-table", None)
    if not path or not _RESULTS:
        return
    mod = sys.modules.get("test_bench_cpu") or sys.modules.get("bench.test_bench_cpu")
    md = mod.ratio_table(_RESULTS, mod.machine_info())
    with open(path, "w") as f:
        f.write("# CPU benchmark: fastcolor providers (pytest-benchmark, fastest round each)\n\n" + md)
