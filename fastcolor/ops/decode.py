"""Annealed-mean decoding: a distribution over the 313 bins back to one ab per pixel."""
from __future__ import annotations

import torch
from torch import nn

from fastcolor import backends
from fastcolor.backends import torch_backend
from fastcolor.backends._tables import centres_for
from fastcolor.gamut import Q
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
    gc = torch.einsum("ncp,qc->nqp", g, centres_for(x))  # cached: no host-to-device copy
    grad_y = f * (gc - (g * out).sum(1, keepdim=True)) / ctx.T
    grad_x = grad_y / x.float() if ctx.is_probs else grad_y
    return grad_x.to(x.dtype), None, None, None


_annealed_mean_op.register_autograd(_backward, setup_context=_setup_context)


class _AnnealedMean(torch.autograd.Function):
    """The eager route: the backend's kernel without the custom-op dispatch, same backward."""

    @staticmethod
    def forward(ctx, x, T, is_probs, backend):
        out = backends.get(backend).annealed_mean(x, T=T, is_probs=is_probs)
        _setup_context(ctx, (x, T, is_probs, backend), out)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        return _backward(ctx, grad_out)


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

    Args:
        logits: ``(N, 313, *spatial)`` floating scores over the bins of :data:`fastcolor.AB_BINS`
            (the network's output, e.g. ``(N, 313, H/4, W/4)``).
        T: temperature, a positive number (0.38 in the paper; ``T < 1e-6``: the mode).
        probs: instead of ``logits``, a ``(N, 313, *spatial)`` distribution (each pixel summing
            to 1); decoded as ``softmax(log(probs) / T)``.
        backend: ``"auto"`` (the fastest available for the tensor's device), or a name of
            :mod:`fastcolor.backends` (``"torch"``, ``"numba"``, ``"compiled"``, ``"triton"``).

    Returns:
        ab ``(N, 2, *spatial)`` in Lab ab units, channel 0 = a, 1 = b: a weighted mean of bin centres,
        so a in -90..100 and b in -110..100.

    Example:
        >>> import torch, fastcolor
        >>> logits = torch.zeros(2, 313, 4, 4)          # (N, 313, H, W): flat over the bins
        >>> logits[:, 198] = 20.0                        # ...except bin 198, centre (a, b) = (40, 20)
        >>> ab = fastcolor.annealed_mean(logits, T=0.38)
        >>> ab.shape, ab.dtype
        (torch.Size([2, 2, 4, 4]), torch.float32)
        >>> ab[0, :, 0, 0].tolist()                      # (a, b) of the dominant bin
        [40.0, 20.0]
        >>> mean = fastcolor.annealed_mean(torch.zeros(1, 313, 1, 1), T=1.0)  # T = 1: plain mean
        >>> [round(v, 2) for v in mean.flatten().tolist()]                    # of the 313 centres
        [15.69, 6.68]
        >>> fastcolor.annealed_mean(probs=torch.full((1, 313, 1, 1), 1 / 313), T=1.0).shape
        torch.Size([1, 2, 1, 1])
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
        out = centres_for(x).to(out_dtype)[x.argmax(1)].movedim(-1, 1)
        nan = torch.full((), float("nan"), dtype=out_dtype, device=x.device)
        return torch.where(torch.isnan(x).any(1, keepdim=True), nan, out)
    xf = flat(x)
    if name == "torch":
        out = torch_backend.annealed_mean(xf, T=T, is_probs=is_probs)
    else:
        if x.dtype == torch.float64:
            xf = xf.float()
        # Under torch.compile the graph holds the custom op; eager calls skip its dispatch.
        op = _annealed_mean_op if torch.compiler.is_compiling() else _AnnealedMean.apply
        out = op(xf, T, is_probs, name).to(out_dtype)
    return out.reshape((x.shape[0], 2) + tuple(spatial))


class AnnealedMeanDecoder(nn.Module):
    """``ab = decoder(logits)``: annealed-mean decoding as a module (T = 0.38 by default).

    :func:`annealed_mean` with its arguments fixed: ``(N, 313, *spatial)`` logits (or, with
    ``from_probs=True``, probabilities) in, ab ``(N, 2, *spatial)`` in Lab ab units out. It has no
    parameters or buffers, so it adds nothing to a ``state_dict``.

    Args:
        T: temperature, a positive number (Zhang et al. 2016 use 0.38).
        from_probs: whether the input is a distribution over the bins instead of logits.
        backend: ``"auto"`` or a backend name, as for :func:`annealed_mean`.

    Example:
        >>> import torch, fastcolor
        >>> decoder = fastcolor.AnnealedMeanDecoder(T=0.38)
        >>> decoder
        AnnealedMeanDecoder(T=0.38, from_probs=False)
        >>> logits = torch.zeros(1, 313, 2, 3)
        >>> logits[:, 91] = 20.0                         # bin 91: (a, b) = (-20, 60)
        >>> ab = decoder(logits)
        >>> ab.shape, ab[0, :, 1, 2].tolist()
        (torch.Size([1, 2, 2, 3]), [-20.0, 60.0])
    """

    def __init__(self, T: float = 0.38, from_probs: bool = False, backend: str = "auto"):
        super().__init__()
        self.T, self.from_probs, self.backend = check_positive("T", T), from_probs, backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.from_probs:
            return annealed_mean(probs=x, T=self.T, backend=self.backend)
        return annealed_mean(x, T=self.T, backend=self.backend)

    def extra_repr(self) -> str:
        return f"T={self.T}, from_probs={self.from_probs}"
