"""``torch.func`` transforms (vmap, grad) through the ops (issue 23, weak messages).

The numba and cpp kernels read the tensors' memory, which the transforms' wrapped tensors do not
have: before, ``torch.func.grad`` through them failed with "it must override the setup_context
staticmethod" and ``vmap`` with "Cannot access data pointer of Tensor that doesn't have storage",
naming neither the backend nor what runs. Now ``auto`` takes the torch backend under a transform
and a named fast backend is refused saying that ``backend='torch'`` works.
"""
from __future__ import annotations

import pytest
import torch

import fastcolor as fc
from fastcolor import backends

FAST_CPU = [b for b in ("numba", "cpp") if backends.unavailable_reason(b, "cpu") is None]


def _inputs():
    g = torch.Generator().manual_seed(3)
    return torch.randn(3, 1, 313, 2, 3, generator=g), torch.randn(3, 1, 2, 2, 3, generator=g) * 30


def test_auto_runs_grad_and_vmap_on_the_torch_backend():
    x, ab = _inputs()
    grad = torch.func.grad(lambda lg: fc.rebalanced_cross_entropy(lg, ab[0]))(x[0])
    leaf = x[0].clone().requires_grad_(True)
    fc.rebalanced_cross_entropy(leaf, ab[0], backend="torch").backward()
    torch.testing.assert_close(grad, leaf.grad)
    decoded = torch.vmap(lambda lg: fc.annealed_mean(lg))(x)
    torch.testing.assert_close(decoded, fc.annealed_mean(x.flatten(0, 1), backend="torch").unflatten(0, (3, 1)))
    idx = torch.vmap(lambda a: fc.soft_encode(a).indices)(ab)
    assert torch.equal(idx, fc.soft_encode(ab.flatten(0, 1), backend="torch").indices.unflatten(0, (3, 1)))


@pytest.mark.parametrize("name", FAST_CPU)
def test_a_fast_backend_under_a_transform_says_that_torch_works(name):
    x, ab = _inputs()
    calls = [lambda: torch.func.grad(lambda lg: fc.rebalanced_cross_entropy(lg, ab[0], backend=name))(x[0]),
             lambda: torch.vmap(lambda lg: fc.annealed_mean(lg, backend=name))(x),
             lambda: torch.vmap(lambda a: fc.soft_encode(a, backend=name).indices)(ab)]
    for call in calls:
        with pytest.raises(backends.BackendUnavailable, match=rf"backend '{name}' is unavailable: .*torch\.func "
                                                              r"transforms .*backend='torch'"):
            call()
    assert backends.resolve(name, "cpu") == name  # outside a transform it runs
