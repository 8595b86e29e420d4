"""The 313 quantised ab bins of Zhang, Isola & Efros (ECCV 2016).

The in-gamut ab plane is quantised on a grid of spacing 10. For each value of
``a`` the bins cover an inclusive range of ``b``; the table below is the whole
definition (bins are ordered lexicographically by (a, b), index q = 0..312).
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
