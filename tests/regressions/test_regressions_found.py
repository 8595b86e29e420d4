"""The smallest inputs that exposed each bug found by the reliability work (issue 8), kept as
explicit regression tests. The broader tests are in tests/test_reliability_*.py."""
import numpy as np
import pytest
import torch

import fastcolor as fc
from fastcolor import backends

CPU = ["torch", "numba", "cpp"]


def _need(name):
    reason = backends.unavailable_reason(name, "cpu")
    if reason is not None:
        pytest.fail(f"backend {name!r} should run on the CPU here but: {reason}")


@pytest.mark.parametrize("name", ["numba", "cpp"])
def test_ab_1e6_goes_to_the_nearest_bin_not_the_first_of_a_float32_tie(name):
    """ab = (1e6, 0): in float32 every bin of the a = 100 column is 1e12 away (ulp 131072), so the
    kernels returned bin 303 (b = -90) instead of 312 (b = 0); nearest_bin (cdist) gave 303 too.
    The fast backends now search such pixels in float64 (fastcolor/gamut.py); the torch baseline
    is plain float32 topk, which ties them (documented, not a backend to make exact)."""
    _need(name)
    ab = torch.tensor([1e6, 0.0]).reshape(1, 2, 1)
    assert fc.soft_encode(ab, k=1, backend=name).indices.item() == 312
    assert fc.nearest_bin(ab).item() == 312
    assert fc.nearest_bin(torch.tensor([1e5, 3.0]).reshape(1, 2, 1)).item() == 312  # cdist said 310
    x = torch.zeros(1, 313, 1)
    x[0, 312] = 12.0  # the right bin is the likely one: a low loss only if the target is bin 312
    assert fc.rebalanced_cross_entropy(x, ab, k=1, backend=name).item() < 0.01


@pytest.mark.parametrize("name", CPU)
def test_out_of_range_precomputed_index_is_an_error_on_every_backend(name):
    """SoftLabels with index 313: NaN loss on numba/cpp, an IndexError-like RuntimeError on torch."""
    _need(name)
    labels = fc.SoftLabels(torch.full((1, 1, 1), 313, dtype=torch.int32), torch.ones(1, 1, 1))
    with pytest.raises(ValueError, match=r"target.indices: expected bin indices in 0..312, got values in 313..313"):
        fc.rebalanced_cross_entropy(torch.zeros(1, 313, 1), labels, backend=name)


def test_nongray_with_an_empty_batch():
    """image_mask_nongray reshaped (0, 2, ...) to (0, -1): RuntimeError instead of an empty mask."""
    x = torch.zeros(0, 313, 2, 2, requires_grad=True)
    fc.rebalanced_cross_entropy(x, torch.zeros(0, 2, 2, 2), nongray=True, reduction="sum").backward()
    assert fc.image_mask_nongray(torch.zeros(0, 2, 3)).shape == (0,)


def test_nan_prior_is_refused_not_turned_into_nan_weights():
    with pytest.raises(ValueError, match="prior: expected finite"):
        fc.rarity_weights(np.full(313, np.nan))
