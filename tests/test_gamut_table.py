"""The candidate tables of the k-nearest search (fastcolor.gamut.candidate_table), checked by
brute force: for every sub-cell's four corners and centre, every bin among the exact k nearest
(and every bin tied with the k-th) is on the sub-cell's list."""
import numpy as np
import pytest

from fastcolor import gamut
from fastcolor.gamut import AB_BINS, Q, candidate_table


def _brute_force_needed(points: np.ndarray, k: int) -> np.ndarray:
    """(M, 2) -> (M, Q) bool: bins at distance <= the k-th smallest (ties included)."""
    d2 = ((points[:, None, :] - AB_BINS[None]) ** 2).sum(-1)
    kth = np.partition(d2, k - 1, axis=1)[:, k - 1]
    return d2 <= kth[:, None]


@pytest.mark.parametrize("k", range(1, 17))
def test_every_subcell_lists_every_possible_neighbour(k):
    t = candidate_table(k)
    edges = t.lo + t.cell * np.arange(t.n + 1)
    ia, ib = np.meshgrid(np.arange(t.n), np.arange(t.n), indexing="ij")
    cells = (ia * t.n + ib).ravel()
    member = np.zeros((t.n * t.n, Q), dtype=bool)
    for c in range(t.n * t.n):
        member[c, t.bins[t.offsets[c]:t.offsets[c + 1]]] = True
    for da, db in [(0, 0), (0, 1), (1, 0), (1, 1), (0.5, 0.5)]:
        # a corner on the box's far edge belongs to the last sub-cell (closed sub-cells)
        pts = np.stack([edges[ia.ravel()] + da * t.cell, edges[ib.ravel()] + db * t.cell], axis=1)
        need = _brute_force_needed(pts, k)
        missing = need & ~member[cells]
        assert not missing.any(), (
            f"k={k}: sub-cell {cells[missing.any(1)][0]} misses bins {np.nonzero(missing[missing.any(1)][0])[0]}")


@pytest.mark.parametrize("k", [1, 5, 16])
def test_lists_are_ascending_and_lookup_finds_the_subcell(k):
    t = candidate_table(k)
    for c in range(t.n * t.n):
        row = t.bins[t.offsets[c]:t.offsets[c + 1]]
        assert len(row) >= k and np.all(np.diff(row) > 0)
    assert t.max_len == int(np.diff(t.offsets).max())
    rng = np.random.default_rng(k)
    for a, b in rng.uniform(gamut.TABLE_LO, gamut.TABLE_HI, size=(200, 2)):
        got = t.candidates(a, b)
        d2 = ((AB_BINS - [a, b]) ** 2).sum(1)
        assert set(np.argsort(d2, kind="stable")[:k]) <= set(got.tolist())
    assert t.candidates(gamut.TABLE_HI, 0.0) is None and t.candidates(np.nan, 0.0) is None


def test_tables_are_cached_read_only_and_short():
    t5 = candidate_table(5)
    assert candidate_table(5) is t5
    with pytest.raises(ValueError):
        t5.bins[0] = 1
    # The measured choice of TABLE_CELL: mean list length for k = 5 within 8..13 (issue 11).
    assert 8 <= len(t5.bins) / (t5.n * t5.n) <= 13
    # The table's box holds every bin with a margin.
    assert gamut.TABLE_LO < AB_BINS.min() and AB_BINS.max() < gamut.TABLE_HI


@pytest.mark.parametrize("k", [0, 17, 2.0, True])
def test_bad_k_is_refused(k):
    with pytest.raises(ValueError, match="k: expected an integer in 1..16"):
        candidate_table(k)
