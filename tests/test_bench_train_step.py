"""The training-step benchmark (:mod:`fastcolor.app.bench.train_step`, ``fastcolor bench
--train-step``): the plain and the authors' losses are the loss :mod:`fastcolor.reference`
specifies, the correctness line catches a loss that is not, the variants are timed round-robin,
the summary's numbers follow from the times, and ``--train-step --quick`` prints the table with
all four variants (on ``ZhangNet.tiny``, in seconds)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fastcolor import reference as R
from fastcolor.app import bench, cli
from fastcolor.app.bench import train_step as ts
from fastcolor.app.bench.common import rel_err, srgb_ab
from fastcolor.gamut import Q


def _inputs(n=2, h=5, w=7, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, Q, h, w, generator=gen, dtype=torch.float64) * 3
    ab = srgb_ab(n, h, w, "cpu", gen)
    weights = torch.rand(Q, generator=gen, dtype=torch.float64) * 4 + 0.1
    return logits, ab, weights


def test_plain_loss_is_the_reference_loss():
    logits, ab, weights = _inputs()
    x = logits.float().requires_grad_(True)
    loss = ts.plain_loss(x, ab, weights.float())
    loss.backward()
    want_l, want_g = R.rebalanced_cross_entropy(logits.numpy(), ab.double().numpy(), weights.numpy(), k=ts.K,
                                                sigma=ts.SIGMA)
    assert rel_err(loss.detach().numpy(), want_l) < 1e-5
    assert rel_err(x.grad.numpy(), want_g) < 1e-4


def test_authors_encoding_is_the_reference_encoding():
    _, ab, weights = _inputs(n=3, h=6, w=4, seed=1)
    dense, v = ts.AuthorsEncoder(weights.numpy())(ab.numpy())
    idx, z = R.soft_encode(ab.double().numpy(), ts.K, ts.SIGMA)
    assert dense.shape == (3, Q, 6, 4) and dense.dtype == np.float32 and v.shape == (3, 6, 4)
    assert np.abs(dense - R.densify(idx, z)).max() < 1e-6
    np.testing.assert_allclose(v, weights.numpy()[idx[:, 0]], rtol=1e-6)  # the weight of the nearest bin


def test_the_correctness_line_catches_a_wrong_loss(monkeypatch):
    cfg = ts.Config("tiny", 2, "cpu")
    check = cfg.check()
    assert ts.check_ok(check), check
    assert check["loss_noisy"] > check["loss_model"] > 0  # the noisy logits are the discriminating case
    right = ts.plain_loss
    monkeypatch.setattr(ts, "plain_loss", lambda *a: right(*a) * 1.001)
    bad = cfg.check()
    assert not ts.check_ok(bad) and bad["plain_loss_rel"] == pytest.approx(1e-3, rel=1e-2)
    assert bad["authors_loss_rel"] == check["authors_loss_rel"]


def test_variants_are_timed_round_robin(monkeypatch):
    calls = []

    class Fake:
        device = "cpu"

        def step(self, variant):
            calls.append(variant)

    times = ts.time_config(Fake(), repeats=3, warmup=1)
    n = len(ts.VARIANTS)
    assert calls[0] == "floor" and len(calls) == 1 + 4 * n  # one untimed step, 1 warm-up + 3 timed rounds
    rounds = [calls[1 + i * n:1 + (i + 1) * n] for i in range(4)]
    assert all(sorted(r) == sorted(ts.VARIANTS) for r in rounds)
    assert len({r[0] for r in rounds}) == 4  # the order rotates: each round starts with another variant
    assert {v: len(t) for v, t in times.items()} == {v: 3 for v in ts.VARIANTS}
    # repeats=None: as many rounds as fit in target_s by the untimed step, clamped to 3..15
    assert {len(t) for t in ts.time_config(Fake(), repeats=None, target_s=1e9).values()} == {15}
    assert {len(t) for t in ts.time_config(Fake(), repeats=None, target_s=0.0).values()} == {3}


def test_summary_follows_from_the_times():
    times = {"fused": [1.0, 1.2, 1.1], "plain": [2.0, 2.0, 2.4], "authors": [3.0, 3.0, 3.0], "floor": [1.0, 1.0, 1.0]}
    s = ts.summarize_times(times, batch=4)
    for v, t in times.items():
        med = np.median(t) * 1e3
        assert s[v]["ms"] == pytest.approx(med)
        assert s[v]["p10"] <= s[v]["ms"] <= s[v]["p90"]
        assert s[v]["images_per_s"] == pytest.approx(4 / (med / 1e3))
    assert s["plain"]["above_floor"] == pytest.approx(1.0) and s["plain"]["above_floor_ms"] == pytest.approx(1000.0)
    assert "above_floor" not in s["floor"]


def test_train_step_quick_prints_the_table(tmp_path, capsys):
    out = tmp_path / "t.json"
    rc = bench.main(["--device", "cpu", "--train-step", "--quick", "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0
    data = json.loads(out.read_text())
    (row,) = data["train_step"]["rows"]
    assert row["check_ok"] and set(row["variants"]) == set(ts.VARIANTS)
    assert data["providers"] == [] and "base" not in data  # nothing but the training step
    lines = text.splitlines()
    assert lines[0].startswith("### Training step")
    assert any(ln.startswith("Machine: ") and "torch " in ln for ln in lines)
    assert any(ln.startswith("Correctness") and ln.rstrip().endswith("ok.") for ln in lines)
    table = [ln for ln in lines if ln.startswith("| ZhangNet.tiny | 32 px | 2 |")]
    assert [ln.split("|")[4].strip() for ln in table] == list(ts.VARIANTS)
    fused = row["variants"]["fused"]
    assert f"| {fused['ms']:.1f} |" in table[0] and "%" in table[0] and table[-1].rstrip().endswith("| - |")


def test_cli_train_step_passes_on(monkeypatch):
    seen = []
    monkeypatch.setattr(bench, "main", lambda argv: seen.append(list(argv)) or 0)
    assert cli.main(["bench", "--device", "cpu", "--train-step", "--quick"]) == 0
    assert seen == [["--device", "cpu", "--train-step", "--quick"]]


def test_bad_train_step_arguments_name_the_option(capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(["--device", "cpu", "--train-step", "--models", "resnet"])
    assert exc.value.code == 2 and "--models: expected names from" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["--device", "cpu", "--train-step", "--batches", "2,x"])
    assert "--batches: expected comma-separated positive integers, got '2,x'" in capsys.readouterr().err
