"""Class-rebalanced cross-entropy, fused with the soft-encoding of its target.

Two routes to the same kernels:

* Eager (the usual case): a :class:`torch.autograd.Function` whose forward runs the backend's
  fused kernel, reading the logits once and writing the per-pixel loss *and* the gradient
  with respect to the logits. The backward only scales that saved gradient by
  ``grad_output``, and skips even that when ``grad_output`` is 1 (a plain
  ``loss.backward()``): one read of the logits and one write of the gradient in all.
* Under ``torch.compile`` the op is the custom op ``fastcolor::ce_forward`` (with a fake
  implementation, so the graph does not break); its backward calls the fused kernel again
  with the upstream gradient as a per-pixel scale, so nothing of size N x 313 x P lives
  between forward and backward.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from fastcolor import backends
from fastcolor.backends import torch_backend
from fastcolor.backends.contract import LossCall
from fastcolor.gamut import Q
from fastcolor.ops._common import (
    check_bin_indices,
    check_class_weights,
    check_k_sigma,
    check_same_layout,
    check_tensor,
    flat,
)
from fastcolor.ops.encode import SoftLabels
from fastcolor.reference import GRAY_THRESHOLD

REDUCTIONS = ("mean", "sum", "none")


def image_mask_nongray(ab: torch.Tensor) -> torch.Tensor:
    """(N, 2, *S) -> float32 (N,): 0 for images whose finite ab never leaves |a|, |b| <= 5, else 1.

    Non-finite pixels are ignored (they give a NaN loss of their own, and must not make the rest
    of their image count as grey). Spec: :func:`fastcolor.reference.image_mask_nongray`.
    """
    flat_ab = ab.detach().flatten(1)  # (not reshape(N, -1): ambiguous for an empty batch)
    if flat_ab.shape[1] == 0 or flat_ab.shape[0] == 0:
        return flat_ab.new_zeros(ab.shape[0], dtype=torch.float32)
    mag = torch.where(torch.isfinite(flat_ab), flat_ab.abs(), torch.zeros((), dtype=flat_ab.dtype, device=flat_ab.device))
    return (mag.amax(dim=1) > GRAY_THRESHOLD).float()


# ----------------------------------------------------------------------------- custom op


@torch.library.custom_op("fastcolor::ce_forward", mutates_args=())
def _ce_op(
    logits: torch.Tensor,
    ab: Optional[torch.Tensor],
    indices: Optional[torch.Tensor],
    weights: Optional[torch.Tensor],
    class_weights: Optional[torch.Tensor],
    image_mask: Optional[torch.Tensor],
    pixel_scale: Optional[torch.Tensor],
    k: int,
    sigma: float,
    need_grad: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    call = LossCall(logits=logits, ab=ab, indices=indices, weights=weights, class_weights=class_weights,
                    image_mask=image_mask, pixel_scale=pixel_scale, k=k, sigma=sigma, need_grad=need_grad)
    loss, grad = backends.get(backend).ce_forward(call)
    return loss, grad if grad is not None else logits.new_empty(0)


@_ce_op.register_fake
def _(logits, ab, indices, weights, class_weights, image_mask, pixel_scale, k, sigma, need_grad, backend):
    n, _, p = logits.shape
    grad = torch.empty_like(logits) if need_grad else logits.new_empty(0)
    return logits.new_empty((n, p), dtype=torch.float32), grad


def _ce_setup_context(ctx, inputs, output):
    logits, ab, indices, weights, class_weights, image_mask, _pixel_scale, k, sigma, _need_grad, backend = inputs
    ctx.save_for_backward(logits, ab, indices, weights, class_weights, image_mask)
    ctx.k, ctx.sigma, ctx.backend = k, sigma, backend


def _ce_backward(ctx, grad_loss, _grad_grad):
    if torch.is_grad_enabled():  # create_graph=True: the kernel's gradient has no graph of its own
        raise RuntimeError(_NO_DOUBLE_BACKWARD.format(backend=ctx.backend))
    logits, ab, indices, weights, class_weights, image_mask = ctx.saved_tensors
    _, grad = _ce_op(logits, ab, indices, weights, class_weights, image_mask, grad_loss.float().contiguous(),
                     ctx.k, ctx.sigma, True, ctx.backend)
    return (grad,) + (None,) * 10  # the logits only: targets and weights are constants


_ce_op.register_autograd(_ce_backward, setup_context=_ce_setup_context)


# ----------------------------------------------------------------------------- eager route


#: The fused backends return an analytic gradient with no graph behind it.
_NO_DOUBLE_BACKWARD = (
    "rebalanced_cross_entropy: backend {backend!r} has no double backward (create_graph=True, e.g. a "
    "gradient penalty); use backend='torch' for that"
)


class _FusedCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, ab, indices, weights, class_weights, image_mask, k, sigma, reduction, backend):
        n_pix = logits.shape[0] * logits.shape[2]
        scale = 1.0 / max(n_pix, 1) if reduction == "mean" else 1.0
        need_grad = ctx.needs_input_grad[0]
        call = LossCall(logits=logits, ab=ab, indices=indices, weights=weights, class_weights=class_weights,
                        image_mask=image_mask, k=k, sigma=sigma, grad_scale=scale, need_grad=need_grad)
        loss_px, grad = backends.get(backend).ce_forward(call)
        ctx.reduction, ctx.backend = reduction, backend
        if need_grad:
            ctx.save_for_backward(grad)
        return _reduce(loss_px, reduction)

    @staticmethod
    def backward(ctx, grad_loss):
        if torch.is_grad_enabled():  # create_graph=True: never a silently graph-less gradient
            raise RuntimeError(_NO_DOUBLE_BACKWARD.format(backend=ctx.backend))
        (grad,) = ctx.saved_tensors
        if ctx.reduction == "none":
            return grad * grad_loss.to(grad.dtype)[:, None, :], *([None] * 9)
        if bool(grad_loss == 1):  # a plain loss.backward(): the kernel's gradient is final
            return grad, *([None] * 9)
        return grad * grad_loss.to(grad.dtype), *([None] * 9)


def _reduce(loss_px: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return loss_px
    total = loss_px.sum()
    return total / loss_px.numel() if reduction == "mean" else total


# ----------------------------------------------------------------------------- public API


def rebalanced_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor | SoftLabels,
    weights: torch.Tensor | None = None,
    k: int = 5,
    sigma: float = 5.0,
    reduction: str = "mean",
    nongray: bool = False,
    backend: str = "auto",
    target_ab: torch.Tensor | None = None,
) -> torch.Tensor:
    """Class-rebalanced soft-target cross-entropy of Zhang et al. (2016, eq. 2), fused.

    ``logits``: ``(N, 313, *spatial)``, float32/float16/bfloat16 (float64 on the torch
    backend). ``target``: the ground-truth ab ``(N, 2, *spatial)`` at the logits' resolution,
    soft-encoded inside the loss onto its ``k`` nearest bins (Gaussian ``sigma``), or a
    precomputed :class:`SoftLabels`. ``weights``: ``(313,)`` rarity weights (see
    :func:`fastcolor.rarity_weights`); None gives plain cross-entropy. ``nongray`` zeroes
    images whose ab never leaves |a|, |b| <= 5 (needs ab: pass ``target_ab`` with a
    SoftLabels target). ``reduction``: "mean" over all pixels, "sum", or "none" (per pixel).

    The loss is float32 (float64 for float64 logits); the gradient has the logits' dtype. It is
    computed from the shifted logits (``x - max``), so its precision does not depend on their
    magnitude; in float32 a pixel whose target bin lies more than float32's max below its largest
    logit gets a loss of +inf (the gradient stays finite), and +-inf logits give NaN for their pixel.
    Targets and class weights are constants (no gradient reaches them); the fused backends have no
    double backward (``create_graph=True`` raises; ``backend="torch"`` has one).
    Spec: :func:`fastcolor.reference.rebalanced_cross_entropy`.
    """
    check_tensor("logits", logits, channels=Q)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")
    # Targets and class weights are constants on every backend: no gradient flows into them.
    ab = indices = soft_w = None
    if isinstance(target, SoftLabels):
        indices, soft_w = target.indices.detach(), target.weights.detach()
        check_same_layout("target.indices", indices, "logits", logits)
        check_bin_indices("target.indices", indices)
        ab = target_ab
        if ab is not None:
            ab = check_tensor("target_ab", ab, channels=2).detach()
            check_same_layout("target_ab", ab, "logits", logits)
    else:
        ab = check_tensor("target", target, channels=2).detach()
        check_same_layout("target", ab, "logits", logits)
        k, sigma = check_k_sigma(k, sigma)
    class_weights = check_class_weights(weights, logits.device)
    if nongray and ab is None:
        raise ValueError("nongray: needs the target ab to find grey images; pass target_ab= with a SoftLabels target")
    image_mask = image_mask_nongray(ab) if nongray else None
    name = backends.resolve(backend, logits.device.type)
    if name != "torch" and logits.dtype == torch.float64 and not getattr(backends.get(name), "SUPPORTS_FLOAT64", False):
        raise TypeError(f"logits: backend {name!r} takes float32, float16 or bfloat16 logits, got float64 (use backend='torch')")

    spatial = logits.shape[2:]
    x = flat(logits)
    ab_f = flat(ab, torch.float32) if (ab is not None and indices is None) else None
    idx_f = flat(indices, torch.int32) if indices is not None else None
    w_f = flat(soft_w, torch.float32) if soft_w is not None else None
    k_eff = idx_f.shape[1] if idx_f is not None else k

    if name == "torch":
        loss_px = torch_backend.per_pixel_loss(x, ab_f, idx_f, w_f, class_weights, image_mask, k_eff, float(sigma))
        loss = _reduce(loss_px, reduction)
    elif torch.compiler.is_compiling():
        loss_px, _ = _ce_op(x, ab_f, idx_f, w_f, class_weights, image_mask, None, k_eff, float(sigma), False, name)
        loss = _reduce(loss_px, reduction)
    else:
        loss = _FusedCE.apply(x, ab_f, idx_f, w_f, class_weights, image_mask, k_eff, float(sigma), reduction, name)
    if reduction == "none":
        return loss.reshape((logits.shape[0],) + tuple(spatial))
    return loss


class RebalancedCrossEntropyLoss(nn.Module):
    """Drop-in loss module: ``loss = criterion(logits, target_ab)``.

    Holds the ``(313,)`` rarity weights as a buffer (None: plain soft-target cross-entropy),
    so they follow ``.to(device)`` and ``state_dict()``.
    """

    def __init__(self, weights=None, k: int = 5, sigma: float = 5.0, reduction: str = "mean",
                 nongray: bool = False, backend: str = "auto"):
        super().__init__()
        k, sigma = check_k_sigma(k, sigma)
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")
        self.register_buffer("weights", check_class_weights(weights, "cpu"))
        self.k, self.sigma, self.reduction, self.nongray, self.backend = k, sigma, reduction, nongray, backend

    def forward(self, logits: torch.Tensor, target, target_ab: torch.Tensor | None = None) -> torch.Tensor:
        return rebalanced_cross_entropy(
            logits, target, self.weights, self.k, self.sigma, self.reduction, self.nongray, self.backend, target_ab
        )

    def extra_repr(self) -> str:
        w = "rebalanced" if self.weights is not None else "unweighted"
        return f"{w}, k={self.k}, sigma={self.sigma}, reduction={self.reduction!r}, nongray={self.nongray}"
