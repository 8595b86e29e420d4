"""The training step with pytest-benchmark: one Adam step (forward, loss, backward, step) of
``ZhangNet`` (256 px) and ``ZhangNet.small`` (128 px) per loss variant (fused, plain, authors,
floor; see :mod:`fastcolor.app.bench.train_step`), grouped per model and batch size so that
pytest-benchmark's table compares the variants.

    pytest bench/test_bench_train_step.py --benchmark-only                       # CPU defaults
    pytest bench/test_bench_train_step.py --train-models small --train-batches 8 --train-rounds 3

Each case is timed in one block (pytest-benchmark's way); the table quoted in bench/RESULTS.md
comes from ``fastcolor bench --train-step``, which interleaves the variants round by round.
"""
from __future__ import annotations

import pytest
import torch

from fastcolor.app.bench import train_step as ts

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _cases(config):
    models = [m for m in config.getoption("--train-models").split(",") if m]
    batches = [int(b) for b in config.getoption("--train-batches").split(",") if b]
    for m in models:
        for b in batches or ts.DEFAULT_BATCHES[DEVICE].get(m) or ts.QUICK_BATCHES.get(m, (2,)):
            for v in ts.VARIANTS:
                yield m, b, v


def pytest_generate_tests(metafunc):
    if "train_case" in metafunc.fixturenames:
        cases = list(_cases(metafunc.config))
        metafunc.parametrize("train_case", cases, ids=[f"{m}-b{b}-{v}" for m, b, v in cases])


@pytest.fixture(scope="module")
def configs():
    """(model, batch) -> a checked :class:`~fastcolor.app.bench.train_step.Config`, the latest
    one only (a full ZhangNet with Adam's state is large)."""
    held: dict = {}

    def get(model: str, batch: int) -> ts.Config:
        if (model, batch) not in held:
            held.clear()
            cfg = ts.Config(model, batch, DEVICE)
            check = cfg.check()
            assert ts.check_ok(check), check  # the three losses agree before anything is timed
            cfg.step("floor")  # Adam's state, the allocator
            held[(model, batch)] = cfg
        return held[(model, batch)]

    return get


def test_train_step(benchmark, train_case, configs, request):
    model, batch, variant = train_case
    cfg = configs(model, batch)
    benchmark.group = f"train step {ts.LABELS[model]} {cfg.px} px batch {batch}"
    benchmark.extra_info.update(model=model, batch=batch, variant=variant, device=DEVICE)

    def step():
        cfg.step(variant)
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    rounds = request.config.getoption("--train-rounds")
    benchmark.pedantic(step, rounds=rounds, warmup_rounds=1, iterations=1)
