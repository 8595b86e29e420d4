"""The 313 quantised ab bins of Zhang, Isola & Efros (ECCV 2016).

The in-gamut ab plane is quantised on a grid of spacing 10. For each value of
``a`` the bins cover an inclusive range of ``b``; the table below is the whole
definition (bins are ordered lexicographically by (a, b), index q = 0..312).

Source: the bin centres the authors published with their code, ``pts_in_hull.npy`` under
``resources/`` of richzhang/colorization (its Caffe release, now the ``caffe`` branch), a
repository under the BSD 2-Clause licence (copyright 2016 Richard Zhang, Phillip Isola, Alexei A.
Efros). The numbers are restated here as ranges, in the same order; fastcolor's own code is
BSD 3-Clause (the LICENSE file).
"""
from __future__ import annotations

import numpy as np

#: Grid spacing of the bins in ab units.
GRID = 10.0

#: a -> (first b, last b), inclusive, step GRID.
B_RANGES: dict[int, tuple[int, int]] = {
    -90: (50, 90), -80: (20, 90), -70: (0, 90), -60: (-20, 90), -50: (-30, 100),
    -40: (-40, 100), -30: (-50, 100), -20: (-50, 100), -10: (-60, 100), 0: (-70, 100),
    10: (-80, 90), 20: (-80, 90), 30: (-90, 90), 40: (-100, 90), 50: (-100, 80),
    60: (-110, 80), 70: (-110, 80), 80: (-110, 70), 90: (-110, 70), 100: (-90, 0),
}


def _build_bins() -> np.ndarray:
    rows = [(a, b) for a in sorted(B_RANGES) for b in range(B_RANGES[a][0], B_RANGES[a][1] + 1, int(GRID))]
    return np.asarray(rows, dtype=np.float64)


#: (313, 2) float64 array of bin centres (a, b).
AB_BINS: np.ndarray = _build_bins()
AB_BINS.setflags(write=False)

#: Number of bins.
Q: int = AB_BINS.shape[0]

#: Lowest a and b on the grid, and the grid's extent in cells.
A_MIN, B_MIN = -90.0, -110.0
A_CELLS, B_CELLS = 20, 22  # a in -90..100, b in -110..100

#: (A_CELLS, B_CELLS) int32 table: bin index of grid cell (ia, ib), or -1 outside the gamut.
CELL_TO_BIN: np.ndarray = np.full((A_CELLS, B_CELLS), -1, dtype=np.int32)
for _q, (_a, _b) in enumerate(AB_BINS):
    CELL_TO_BIN[int(round((_a - A_MIN) / GRID)), int(round((_b - B_MIN) / GRID))] = _q
CELL_TO_BIN.setflags(write=False)


def ab_bins(device=None, dtype=None):
    """The bin centres as a torch tensor of shape (313, 2) (float32 unless ``dtype`` is given)."""
    import torch

    return torch.tensor(AB_BINS, dtype=dtype or torch.float32, device=device)


# ----------------------------------------------------------------------------- k-nearest search
#
# Every fast backend (numba, cpp, cuda, triton) finds a pixel's k nearest bins the same way:
#
# 1. A finite pixel inside the table's box, TABLE_LO <= a, b < TABLE_HI, falls in the sub-cell
#    (floor((a - TABLE_LO) / cell), floor((b - TABLE_LO) / cell)). The table lists, for that
#    sub-cell, every bin that can be among the k nearest of any point in it (below). The backend
#    scans that list in index order, computing d^2 = (a - a_q)^2 + (b - b_q)^2 in float32, and
#    keeps the k smallest by insertion (a strict "<", so a tie keeps the lower bin index first).
# 2. A finite pixel outside the box (|a| or |b| beyond the sRGB gamut, up to float32's range)
#    is compared with all 313 bins in float64, as the reference does: the same d^2 formula on
#    the float32 value (no fused multiply-add), the same insertion, weights from float64
#    differences. Such pixels are rare; this path exists so that none is ever misplaced.
# 3. A pixel with a NaN or infinite component gets bins 0, 1, ..., k-1 and NaN weights, which
#    is what the reference's stable sort of all-NaN (or all-infinite) distances gives.
#
# Weights, in every case: w_j = exp(-(d_j^2 - d_0^2) / (2 sigma^2)) / sum_i (same), d_0 the nearest,
# with the difference d_j^2 - d_0^2 formed without cancellation: a pixel in the box but far from
# every bin (d^2 ~ 2000 at (68.2, 125.6)) would lose 1e-6 of its weights to float32 rounding of
# two large d^2. numba and cpp take the difference in float64 (numba only where d_0^2 > 100);
# triton, where float64 is slow, factors it exactly in float32:
# (a_j - a_0)(a_j + a_0 - 2a) + (b_j - b_0)(b_j + b_0 - 2b). Weights match the reference to 1e-6.

#: The table covers the square TABLE_LO <= a, b < TABLE_HI, which holds the bins' box
#: (a -90..100, b -110..100) and every sRGB colour (a -87..99, b -108..95) with a margin.
TABLE_LO, TABLE_HI = -128.0, 128.0

#: Side of a sub-cell in ab units. Measured (bench/RESULTS.md, "Candidate table"): the mean
#: list length for k = 5 over the sRGB box is 7.1 at cell 2, 9.2 at 4, 10.6 at 5, 13.8 at 8.
#: 4 keeps the k = 5 table at 35k entries (70 KB of int16, cache-resident on a CPU) with short
#: lists; a power of two makes the sub-cell of a pixel an exact float computation.
TABLE_CELL = 4.0

#: Slack (ab units) added to every sub-cell and to every bound, so that float32 rounding of a
#: pixel's sub-cell or distances can never leave a true neighbour off the list.
_TABLE_SLACK = 1e-3

K_MAX = 16


def _check_k(k) -> None:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= K_MAX:
        raise ValueError(f"k: expected an integer in 1..{K_MAX}, got {k!r}")


class CandidateTable:
    """For one k, the bins that can be among the k nearest of any point of each sub-cell.

    CSR layout over the ``n * n`` sub-cells, row-major in (a, b): the candidates of sub-cell
    ``c = ia * n + ib`` are ``bins[offsets[c]:offsets[c + 1]]``, ascending bin index (so a scan
    in list order with a strict "<" keeps ties "lower index first").

    Exactness: a bin q is listed for sub-cell C iff its smallest possible distance to C is at
    most tau(C), the k-th smallest over all bins of the *largest* distance to C (both for C
    grown by a small slack). For any point p of C the k bins achieving those largest distances
    are within tau(C) of p, so p's k-th nearest distance is <= tau(C); a bin whose smallest
    distance to C exceeds tau(C) is farther than that from p, and can be neither among the k
    nearest nor tied with the k-th. tests/test_gamut_table.py checks this against brute force
    on every sub-cell's corners and centre.
    """

    def __init__(self, k: int):
        _check_k(k)
        self.k = int(k)
        self.lo, self.hi, self.cell = TABLE_LO, TABLE_HI, TABLE_CELL
        self.n = int(round((self.hi - self.lo) / self.cell))
        eps = _TABLE_SLACK
        x0 = self.lo + self.cell * np.arange(self.n) - eps
        x1 = x0 + self.cell + 2 * eps

        def axis(c):  # per axis: (n, Q) smallest and largest squared distance of c to [x0, x1]
            near = np.maximum(0.0, np.maximum(x0[:, None] - c[None], c[None] - x1[:, None]))
            far = np.maximum(np.abs(c[None] - x0[:, None]), np.abs(c[None] - x1[:, None]))
            return near**2, far**2

        amin, amax = axis(AB_BINS[:, 0])
        bmin, bmax = axis(AB_BINS[:, 1])
        dmin = amin[:, None, :] + bmin[None, :, :]  # (n, n, Q) over (ia, ib, q)
        dmax = amax[:, None, :] + bmax[None, :, :]
        tau = np.sqrt(np.partition(dmax, self.k - 1, axis=2)[..., self.k - 1]) + eps
        member = (dmin <= (tau**2)[..., None]).reshape(self.n * self.n, Q)
        counts = member.sum(1)
        self.offsets = np.zeros(self.n * self.n + 1, dtype=np.int32)
        np.cumsum(counts, out=self.offsets[1:])
        self.bins = np.nonzero(member)[1].astype(np.int16)  # row-major: ascending within a row
        #: The longest list (a loop bound for the GPU kernels).
        self.max_len = int(counts.max())
        for a in (self.offsets, self.bins):
            a.setflags(write=False)

    def cell_of(self, a: float, b: float) -> int | None:
        """The sub-cell index of a pixel, or None outside the box (or for NaN)."""
        if not (self.lo <= a < self.hi and self.lo <= b < self.hi):
            return None
        ia = min(int((a - self.lo) / self.cell), self.n - 1)
        ib = min(int((b - self.lo) / self.cell), self.n - 1)
        return ia * self.n + ib

    def candidates(self, a: float, b: float) -> np.ndarray | None:
        """The candidate bins of the sub-cell holding (a, b), or None outside the box."""
        c = self.cell_of(a, b)
        return None if c is None else self.bins[self.offsets[c]:self.offsets[c + 1]]

    def __repr__(self) -> str:
        mean = len(self.bins) / (self.n * self.n)
        return (f"CandidateTable(k={self.k}, {self.n}x{self.n} sub-cells of {self.cell:g}, "
                f"{len(self.bins)} entries, mean {mean:.1f}, max {self.max_len})")


_TABLES: dict[int, CandidateTable] = {}


def candidate_table(k: int) -> CandidateTable:
    """The :class:`CandidateTable` for ``k`` (1..16), built once (a few ms) and cached."""
    _check_k(k)
    table = _TABLES.get(int(k))
    if table is None:
        table = _TABLES.setdefault(int(k), CandidateTable(k))
    return table
