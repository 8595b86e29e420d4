"""Annealed-mean decoding: a distribution over the 313 bins back to one ab per pixel."""
from __future__ import annotations

import torch
from torch import nn

from fastcolor import backends
from fastcolor.backends import torch_backend
from fastcolor.gamut import Q, ab_bins
from fastcolor.ops._common import check_positive, check_tensor, flat
from fastcolor.reference import T_MODE


@torch.library.custom_op("fastcolor::annealed_mean", mutates_args=())
def _annealed_mean_op(x: torch.Tensor, T: float, is_probs: bool, backend: str) -> torch.Tensor:
    return backends.get(backend).annealed_mean(x, T=T, is_probs=is_probs)


@_annealed_mean_op.register_fake
def _(x, T, is_probs, backend):
    return x.new_empty((x.shape[0], 2, x.shape[2]), dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    x, T, is_probs, _ = inputs
    ctx.save_for_backward(x, output)
    ctx.T, ctx.is_probs = T, is_probs


def _backward(ctx, grad_out):
    # out_c = sum_q f_q c_qc with f = softmax(y / T), y = x (or log x for probabilities):
    # d out_c / d y_q = f_q (c_qc - out_c) / T.
    x, out = ctx.saved_tensors
    y = torch.log(x.float()) if ctx.is_probs else x.float()
    f = torch.softmax(y / ctx.T, dim=1)
    g = grad_out.float()
    gc = torch.einsum("ncp,qc->nqp", g, ab_bins(x.device))
    grad_y = f * (gc - (g * out).sum(1, keepdim=True)) / ctx.T
    grad_x = grad_y / x.float() if ctx.is_probs else grad_y
    return grad_x.to(x.dtype), None, None, None


_annealed_mean_op.register_autograd(_backward, setup_context=_setup_context)


def annealed_mean(
    logits: torch.Tensor | None = None,
    T: float = 0.38,
    probs: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Decode ``(N, 313, *spatial)`` logits (or ``probs=``) to ab ``(N, 2, *spatial)``.

    The annealed mean of Zhang et al. (2016, eq. 5): the expectation of the bin centres under
    ``softmax(logits / T)``. T = 1 is the mean, T = 0.38 the paper's choice, and any
    ``T < 1e-6`` gives exactly the mode (the centre of the most likely bin; NaN for a pixel with
    a NaN input), which has no gradient. Otherwise differentiable. The result is float32, or
    float64 for float64 input (computed in float64 by ``backend="torch"``, in float32 by the
    fast backends). Spec: :func:`fastcolor.reference.annealed_mean`.
    """
    if (logits is None) == (probs is None):
        raise ValueError("annealed_mean: expected exactly one of logits= and probs=")
    is_probs = probs is not None
    name_arg = "probs" if is_probs else "logits"
    x = check_tensor(name_arg, probs if is_probs else logits, channels=Q)
    T = check_positive("T", T)
    spatial = x.shape[2:]
    name = backends.resolve(backend, x.device.type)
    out_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    if T < T_MODE:
        x = x.detach()
        out = ab_bins(x.device, out_dtype)[x.argmax(1)].movedim(-1, 1)
        return torch.where(torch.isnan(x).any(1, keepdim=True), torch.full((), float("nan"), dtype=out_dtype, device=x.device), out)
    xf = flat(x)
    if name == "torch":
        out = torch_backend.annealed_mean(xf, T=T, is_probs=is_probs)
    else:
        if x.dtype == torch.float64:
            xf = xf.float()
        out = _annealed_mean_op(xf, T, is_probs, name).to(out_dtype)
    return out.reshape((x.shape[0], 2) + tuple(spatial))


class AnnealedMeanDecoder(nn.Module):
    """``ab = decoder(logits)``: annealed-mean decoding as a module (T = 0.38 by default)."""

    def __init__(self, T: float = 0.38, from_probs: bool = False, backend: str = "auto"):
        super().__init__()
        self.T, self.from_probs, self.backend = check_positive("T", T), from_probs, backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.from_probs:
            return annealed_mean(probs=x, T=self.T, backend=self.backend)
        return annealed_mean(x, T=self.T, backend=self.backend)

    def extra_repr(self) -> str:
        return f"T={self.T}, from_probs={self.from_probs}"
