"""Argument checks and layout helpers shared by the public ops."""
from __future__ import annotations

import numbers

import torch

from fastcolor.gamut import K_MAX, Q

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_tensor(name: str, x, *, channels: int | None = None, floating: bool = True) -> torch.Tensor:
    """Check that ``x`` is a tensor (N, C, *spatial) with ``C == channels``; return it."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.device.type == "meta":
        raise ValueError(f"{name}: expected a tensor with data (cpu or cuda), not a meta tensor; "
                         "move it to a device first")
    if floating and x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a floating tensor (float32, float16, bfloat16 or float64), got {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"{name}: expected shape (N, {channels or 'C'}, ...), got {tuple(x.shape)}")
    if channels is not None and x.shape[1] != channels:
        raise ValueError(f"{name}: expected {channels} channels on axis 1, shape (N, {channels}, ...), "
                         f"got {tuple(x.shape)}")
    return x


def check_same_layout(name: str, x: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    """``x`` must share batch size, spatial shape and device with ``ref``."""
    if x.shape[0] != ref.shape[0] or x.shape[2:] != ref.shape[2:]:
        raise ValueError(
            f"{name}: expected batch and spatial shape {(ref.shape[0],) + tuple(ref.shape[2:])} "
            f"matching {ref_name} {tuple(ref.shape)}, got {tuple(x.shape)}"
        )
    if x.device != ref.device:
        raise ValueError(f"{name}: expected a tensor on {ref.device} like {ref_name}, got {x.device}")


def host_readable(t: torch.Tensor) -> bool:
    """Whether a value check may read ``t`` on the host: a CPU tensor, outside torch.compile tracing.

    The one rule of the ops' value checks. Reading a GPU tensor's values stalls the host until the
    device has drained its queue (a sync), and a data-dependent branch would break a compiled
    graph; checks of such tensors run on the device instead (``torch._assert_async``) or not at
    all, as each check says. Reading a CPU tensor costs no sync, so CPU tensors get the exact
    error message. (tests/test_syncs.py patches this to False to run the device route on CPU
    tensors and prove it reads nothing on the host.)
    """
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def check_bin_indices(name: str, indices: torch.Tensor) -> None:
    """Precomputed targets: 1..16 bins per pixel (axis 1), every index in 0..Q-1.

    The kernels would otherwise disagree (NaN loss on the fused CPU kernels, an index error
    from the PyTorch composition, reads out of bounds on a GPU). On CPU tensors one min/max over
    the small (N, k, P) tensor settles it with a ValueError; elsewhere (a GPU, or while
    torch.compile traces) the check runs on the device, no host sync, and fails the call
    (a RuntimeError; on a GPU a device-side assert) instead of letting a bad index through.
    """
    if not 1 <= indices.shape[1] <= K_MAX:
        raise ValueError(f"{name}: expected 1..{K_MAX} bins per pixel on axis 1, got {indices.shape[1]} "
                         f"(shape {tuple(indices.shape)})")
    if indices.numel() == 0 or indices.device.type == "meta":
        return
    if not host_readable(indices):
        lo, hi = torch.aminmax(indices.reshape(-1))
        torch._assert_async((lo >= 0) & (hi < Q), f"{name}: expected bin indices in 0..{Q - 1}")
        return
    lo_t, hi_t = torch.aminmax(indices.reshape(-1))
    lo, hi = int(lo_t), int(hi_t)
    if lo < 0 or hi >= Q:
        raise ValueError(f"{name}: expected bin indices in 0..{Q - 1}, got values in {lo}..{hi}")


#: Smaller Gaussian widths are raised to this one for the kernels: there 1 / (2 sigma^2) would
#: overflow float32 (0 x inf = NaN weights) while the weights already are their limit, 1 on the
#: nearest bin (shared equally by exact ties) and 0 elsewhere, as the float64 reference gives.
SIGMA_MIN = 1e-15


def check_k_sigma(k, sigma) -> tuple[int, float]:
    """``k`` an integer in 1..16 and ``sigma`` a positive finite number (Python or numpy scalars);
    returns them as ``int`` and ``float`` (sigma at least :data:`SIGMA_MIN`)."""
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= K_MAX:
        raise ValueError(f"k: expected an integer in 1..{K_MAX}, got {k!r}")
    return int(k), max(check_positive("sigma", sigma), SIGMA_MIN)


def check_positive(name: str, value) -> float:
    """A positive finite real number (Python or numpy scalar), as ``float``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < float(value) < float("inf"):
        raise ValueError(f"{name}: expected a positive finite number, got {value!r}")
    return float(value)


def flat(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """(N, C, *S) -> contiguous (N, C, P), optionally cast."""
    p = 1
    for d in x.shape[2:]:
        p *= d
    x = x.reshape(x.shape[0], x.shape[1], p)
    if dtype is not None and x.dtype != dtype:
        x = x.to(dtype)
    return x.contiguous()


def check_class_weights(weights, device) -> torch.Tensor | None:
    if weights is None:
        return None
    if not isinstance(weights, torch.Tensor):
        try:  # float64 first: a value past float32's range is then refused by name, not as "Inf"
            weights = torch.as_tensor(weights, dtype=torch.float64)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"weights: expected a ({Q},) tensor or array, got {type(weights).__name__}") from exc
    if weights.shape != (Q,):
        raise ValueError(f"weights: expected shape ({Q},), got {tuple(weights.shape)}")
    if weights.is_complex() or not (weights.is_floating_point() or weights.dtype in (torch.int32, torch.int64)):
        raise TypeError(f"weights: expected real numbers, got {weights.dtype}")
    weights = weights.detach()  # class weights are constants: no gradient flows into them
    cast = weights.to(device=device, dtype=torch.float32).contiguous()
    if weights.device.type == "cpu":  # (a value check on a GPU tensor would cost a host sync)
        check_finite_non_negative("weights", weights)
        if not host_readable(weights):  # torch.compile tracing (or the tests' device route): on the device
            torch._assert_async(torch.isfinite(cast).all(), "weights: expected values within float32's range")
            return cast
        over = int(torch.isinf(weights.to(torch.float32)).sum())  # finite as given, past float32's range
        if over:
            raise ValueError(f"weights: expected values within float32's range (at most "
                             f"{torch.finfo(torch.float32).max:.3g}), got {over} of {Q} past it (largest "
                             f"{float(weights.abs().max()):.3g}), which would be inf in the float32 loss")
    return cast


def check_finite_non_negative(name: str, x: torch.Tensor) -> None:
    """Refuse NaN/Inf or negative entries of a tensor of weights, counting them where
    :func:`host_readable` (elsewhere on the device, failing the call, with no count)."""
    if not host_readable(x):
        torch._assert_async((torch.isfinite(x) & (x >= 0)).all(), f"{name}: expected finite, non-negative weights")
        return
    bad = int((~torch.isfinite(x)).sum())
    neg = int((x < 0).sum())
    if bad or neg:
        got = f"{bad} NaN/Inf" if bad else f"{neg} negative"
        raise ValueError(f"{name}: expected finite, non-negative weights, got {got} of {x.numel()}")
