"""Class-rebalanced cross-entropy, fused with the soft-encoding of its target.

Two routes to the same kernels:

* Eager (the usual case): a :class:`torch.autograd.Function` whose forward runs the backend's
  fused kernel, reading the logits once and writing the per-pixel loss *and* the gradient
  with respect to the logits. The backward only scales that saved gradient by
  ``grad_output`` in place, and moves no data when ``grad_output`` is 1 (a plain
  ``loss.backward()``): one read of the logits and one write of the gradient in all. That
  decision reads ``grad_output`` on the device, never on the host (:func:`scale_grad_`).
* Under ``torch.compile`` the op is the custom op ``fastcolor::ce_forward`` (with a fake
  implementation, so the graph does not break); its backward calls the fused kernel again
  with the upstream gradient as a per-pixel scale, so nothing of size N x 313 x P lives
  between forward and backward.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from fastcolor import backends
from fastcolor.backends import torch_backend
from fastcolor.backends.contract import LossCall
from fastcolor.gamut import Q
from fastcolor.ops import _common
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

    This is the per-image factor of ``rebalanced_cross_entropy(..., nongray=True)``: the authors'
    "nongray" mask, which leaves grey images out of the loss (threshold 5 in ab units).

    Args:
        ab: ``(N, 2, *spatial)`` ab in Lab units (channel 0 = a, 1 = b), any resolution.

    Returns:
        float32 ``(N,)``: 1.0 for an image with colour, 0.0 for a grey one (or one with no pixels).

    Example:
        >>> import torch, fastcolor
        >>> ab = torch.zeros(3, 2, 4, 4)                 # (N, 2, H, W) ab in Lab units
        >>> ab[0] = 4.0                                   # faint tint: still grey (|a|, |b| <= 5)
        >>> ab[1, 0, 2, 3] = 30.0                         # one coloured pixel is enough
        >>> fastcolor.image_mask_nongray(ab)
        tensor([0., 1., 0.])
    """
    flat_ab = ab.detach().flatten(1)  # (not reshape(N, -1): ambiguous for an empty batch)
    if flat_ab.shape[1] == 0 or flat_ab.shape[0] == 0:
        return flat_ab.new_zeros(ab.shape[0], dtype=torch.float32)
    zero = torch.zeros((), dtype=flat_ab.dtype, device=flat_ab.device)
    mag = torch.where(torch.isfinite(flat_ab), flat_ab.abs(), zero)
    return (mag.amax(dim=1) > GRAY_THRESHOLD).float()


# ----------------------------------------------------------------------------- custom op


@torch.library.custom_op("fastcolor::ce_forward", mutates_args=())
def _ce_op(
    logits: torch.Tensor,
    ab: torch.Tensor | None,
    indices: torch.Tensor | None,
    weights: torch.Tensor | None,
    class_weights: torch.Tensor | None,
    image_mask: torch.Tensor | None,
    pixel_scale: torch.Tensor | None,
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
    logits, ab, indices, weights, class_weights, image_mask, pixel_scale, k, sigma, _need_grad, backend = inputs
    ctx.save_for_backward(logits, ab, indices, weights, class_weights, image_mask, pixel_scale)
    ctx.k, ctx.sigma, ctx.backend = k, sigma, backend


def _ce_backward(ctx, grad_loss, _grad_grad):
    if torch.is_grad_enabled():  # create_graph=True: the kernel's gradient has no graph of its own
        raise RuntimeError(_NO_DOUBLE_BACKWARD.format(backend=ctx.backend))
    logits, ab, indices, weights, class_weights, image_mask, pixel_scale = ctx.saved_tensors
    # The forward's loss is s * l (s: its pixel_scale, the mask's factor), so d/dlogits scales by s too.
    upstream = grad_loss.float() if pixel_scale is None else grad_loss.float() * pixel_scale
    _, grad = _ce_op(logits, ab, indices, weights, class_weights, image_mask, upstream.contiguous(),
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
    def forward(ctx, logits, ab, indices, weights, class_weights, image_mask, pixel_mask, k, sigma, reduction,
                backend):
        n_pix = logits.shape[0] * logits.shape[2]
        scale = 1.0 / max(n_pix, 1) if reduction == "mean" else 1.0
        pixel_scale = kept = None
        if pixel_mask is not None:  # the mask rides on the kernels' per-pixel factor s: no pass of its own
            pixel_scale, kept = _mask_factor(pixel_mask, reduction)
            scale = 1.0
        need_grad = ctx.needs_input_grad[0]
        call = LossCall(logits=logits, ab=ab, indices=indices, weights=weights, class_weights=class_weights,
                        image_mask=image_mask, pixel_scale=pixel_scale, k=k, sigma=sigma, grad_scale=scale,
                        need_grad=need_grad)
        loss_px, grad = backends.get(backend).ce_forward(call)
        ctx.reduction, ctx.backend = reduction, backend
        if need_grad:
            ctx.save_for_backward(grad)
        return _reduce(loss_px, reduction, pixel_mask, kept)

    @staticmethod
    def backward(ctx, grad_loss):
        if torch.is_grad_enabled():  # create_graph=True: never a silently graph-less gradient
            raise RuntimeError(_NO_DOUBLE_BACKWARD.format(backend=ctx.backend))
        (grad,) = ctx.saved_tensors
        factor = grad_loss[:, None, :] if ctx.reduction == "none" else grad_loss
        if _keep_graph():  # retain_graph=True: a later backward needs the saved gradient as it is
            return grad * factor.to(grad.dtype), *([None] * 10)
        return scale_grad_(grad, factor, ctx.backend), *([None] * 10)


def _keep_graph() -> bool:
    """Whether the running backward keeps the graph (``retain_graph=True``); True if unknown."""
    query = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return True if query is None else bool(query())


def scale_grad_(grad: torch.Tensor, factor: torch.Tensor, backend: str) -> torch.Tensor:
    """``grad *= factor`` in place, reading ``factor`` (``grad_output``) on the device; returns ``grad``.

    ``factor`` is the 0-d upstream gradient of a reduced loss, or ``(N, 1, P)`` for
    ``reduction="none"``. A plain ``loss.backward()`` passes 1, and then the forward's gradient
    is final: one read of the logits and one write of the gradient in all. Deciding that on the
    host would read a GPU value (a sync), so:

    * CPU tensors (:func:`~fastcolor.ops._common.host_readable`): the value is read on the host,
      which costs no sync there, and the multiply is skipped when it is 1 (an unconditional one
      measured +32% on numba's fused forward+backward, (16, 313, 32, 32) float32, 2 cores);
    * otherwise a 0-d factor goes to the backend's ``scale_`` (the triton kernel reads it on the
      device and moves no data when it is 1); a backend without one, and a per-pixel factor,
      get one elementwise multiply on the device (a read and a write of the gradient).
    """
    if factor.dim() == 0:
        if _common.host_readable(factor):
            if float(factor) != 1.0:
                grad.mul_(factor)
            return grad
        scale = getattr(backends.get(backend), "scale_", None)
        if scale is not None:
            scale(grad, factor.to(torch.float32).reshape(1))
            return grad
    return grad.mul_(factor)


def _reduce(loss_px: torch.Tensor, reduction: str, pixel_mask: torch.Tensor | None = None,
            kept: torch.Tensor | None = None) -> torch.Tensor:
    """The reduction of the per-pixel loss; with a mask, ``loss_px`` already carries :func:`_mask_factor`.

    On the device, no host read: torch's sum reduces in a fixed order for a given shape (no
    atomics), so the same inputs give the same loss bit for bit (tests/test_syncs.py).
    """
    if pixel_mask is not None:
        # Exactly 0 at a left-out pixel, even where its factor 0 met an infinite loss (0 * inf = NaN).
        loss_px = torch.where(pixel_mask, loss_px.new_zeros(()), loss_px)
        if reduction == "mean":  # each pixel's loss is already divided by the count kept: NaN for none kept
            return torch.where(kept > 0, loss_px.sum(), loss_px.new_full((), float("nan")))
    if reduction == "none":
        return loss_px
    total = loss_px.sum()
    return total / loss_px.numel() if reduction == "mean" and pixel_mask is None else total


def _mask_factor(pixel_mask: torch.Tensor, reduction: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(N, P)`` bool mask (True: left out) -> (the kernels' per-pixel factor ``s``, the count kept).

    ``s`` is 0 at a left-out pixel and 1 elsewhere, or ``1 / U`` for ``"mean"`` (``U`` pixels kept,
    counted on the device: no host read, so no sync on a GPU), which makes the mean's divisor part
    of the fused gradient.
    """
    keep = (~pixel_mask).float()
    if reduction != "mean":
        return keep, None
    kept = keep.sum()
    return keep / kept.clamp_min(1.0), kept


#: Set once the normalised-ab warning has been given (it is given once per process).
_units_warned = False


def _warn_if_normalised(ab: torch.Tensor) -> None:
    """Warn once when ab look normalised (0 < max |ab| <= 1) instead of in Lab units (about -110..110).

    Checked only where :func:`~fastcolor.ops._common.host_readable` (a CPU tensor): on a GPU the
    check would read a device value on the host, a sync in every training step. The cost on a CPU
    is one min/max over the ab, 2 / 313 of the logits' size. All-zero ab (grey images) do not warn.
    """
    global _units_warned
    if _units_warned or ab.numel() == 0 or not _common.host_readable(ab):
        return
    lo, hi = torch.aminmax(ab.reshape(-1))
    peak = max(-float(lo), float(hi))  # NaN when any entry is NaN: no warning then
    if 0.0 < peak <= 1.0:
        _units_warned = True
        warnings.warn(
            f"target: every ab value lies within [-1, 1] (largest |ab| {peak:.3g}), as for normalised ab (e.g. "
            "FusionNet's ab / 128); the loss expects ab in Lab units (a and b about -110..110; scale normalised "
            "ab by 128). If these are nearly grey images in Lab units, ignore this; it is shown once.",
            UserWarning, stacklevel=3)


def _check_pixel_mask(mask, logits: torch.Tensor) -> torch.Tensor:
    """``mask``: bool or 0/1 ``(N, *spatial)`` on the logits' device -> flat bool ``(N, P)`` (True: left out).

    A non-bool mask's values are checked on the host for a CPU tensor (exact error) and on the device
    otherwise (no host sync; a bad value fails the call).
    """
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask: expected a bool (or 0/1) torch.Tensor, got {type(mask).__name__}")
    want = (logits.shape[0],) + tuple(logits.shape[2:])
    if tuple(mask.shape) != want:
        raise ValueError(f"mask: expected shape (N, *spatial) = {want} matching logits {tuple(logits.shape)}, "
                         f"got {tuple(mask.shape)}")
    if mask.device != logits.device:
        raise ValueError(f"mask: expected a tensor on {logits.device} like logits, got {mask.device}")
    mask = mask.detach()
    if mask.dtype != torch.bool:
        if mask.is_complex():
            raise TypeError(f"mask: expected a bool or 0/1 real tensor, got {mask.dtype}")
        if mask.numel() and _common.host_readable(mask):
            bad = int(((mask != 0) & (mask != 1)).sum())
            if bad:
                raise ValueError(f"mask: expected bool or 0/1 values (1 = leave the pixel out), got {bad} other "
                                 f"values of {mask.numel()}")
        elif mask.numel():
            torch._assert_async(((mask == 0) | (mask == 1)).all(), "mask: expected bool or 0/1 values")
        mask = mask != 0
    return mask.reshape(mask.shape[0], -1).contiguous()


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
    *,
    weight: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Class-rebalanced soft-target cross-entropy of Zhang et al. (2016, eq. 2), fused.

    ``logits``: ``(N, 313, *spatial)``, float32/float16/bfloat16 (float64 on the torch
    backend). ``target``: the ground-truth ab ``(N, 2, *spatial)`` at the logits' resolution,
    soft-encoded inside the loss onto its ``k`` nearest bins (Gaussian ``sigma``), or a
    precomputed :class:`SoftLabels`. ``weights``: ``(313,)`` rarity weights (see
    :func:`fastcolor.rarity_weights`); None gives plain cross-entropy. ``nongray`` zeroes
    images whose ab never leaves |a|, |b| <= 5 (needs ab: pass ``target_ab`` with a
    SoftLabels target). ``reduction``: "mean" over all pixels, "sum", or "none" (per pixel).
    ``mask`` leaves pixels out (the role of ``ignore_index`` in ``nn.CrossEntropyLoss``).

    The mean, beside PyTorch's: with per-pixel loss ``l = m_n v_hw * -sum_q Z_hwq log p_hwq``
    (``v_hw`` the rarity weight of the pixel's nearest bin, ``m_n`` the nongray factor), fastcolor's
    ``"mean"`` is ``sum_hw l / U``, where ``U`` is the number of pixels: ``N*H*W`` without a mask,
    the pixels left in (mask False) with one (the grey images of ``nongray`` still count in ``U``).
    ``nn.CrossEntropyLoss(weight=w)`` divides by ``sum_hw w[target_hw]`` over the pixels it keeps
    instead. Zhang et al.'s weights are scaled so their mean under the prior is 1 (eq. 4), so the
    two divisors agree in expectation, but fastcolor's does not move with the batch's colours.
    A mean over no pixels (an empty batch, or everything masked) is NaN, as PyTorch's; its gradient
    is 0.

    The loss is float32 (float64 for float64 logits); the gradient has the logits' dtype. It is
    computed from the shifted logits (``x - max``), so its precision does not depend on their
    magnitude; in float32 a pixel whose target bin lies more than float32's max below its largest
    logit gets a loss of +inf (the gradient stays finite), and +-inf logits give NaN for their pixel.
    Targets and class weights are constants (no gradient reaches them); the fused backends have no
    double backward (``create_graph=True`` raises; ``backend="torch"`` has one).
    Spec: :func:`fastcolor.reference.rebalanced_cross_entropy`.

    Args:
        logits: ``(N, 313, *spatial)`` scores over the bins of :data:`fastcolor.AB_BINS`.
        target: ab ``(N, 2, *spatial)`` in Lab units (channel 0 = a, 1 = b) at the logits'
            resolution, or a :class:`SoftLabels` of the same batch and spatial shape.
        weights: ``(313,)`` non-negative finite class weights (tensor or array), or None.
            ``weight=`` is the same argument under PyTorch's name (give one of the two).
        k: bins per pixel of the soft-encoding, 1..16 (ignored for a SoftLabels target).
        sigma: Gaussian width of the soft-encoding in ab units (ignored for a SoftLabels target).
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        nongray: whether to zero the loss of grey images (:func:`image_mask_nongray`).
        backend: ``"auto"`` (the fastest available for the logits' device) or a backend name.
        target_ab: the ab behind a SoftLabels ``target``, for ``nongray=True``.
        weight: PyTorch's spelling of ``weights`` (``nn.CrossEntropyLoss(weight=...)``).
        mask: ``(N, *spatial)`` bool (or 0/1) tensor on the logits' device, True (1) where a pixel
            is left out (padding, missing ground truth): it counts neither in the loss nor in the
            mean's divisor, and its gradient is exactly 0, on every backend. Its ab are read as 0
            (NaN there is harmless, and it cannot make its image non-grey for ``nongray``); its
            logits should be finite (a NaN logit gives a NaN gradient there, as with PyTorch's
            ``ignore_index``). None (the default) costs nothing.

    ab in [-1, 1] everywhere (normalised ab, e.g. FusionNet's ab / 128) give a one-time
    ``UserWarning`` naming the units the loss expects, Lab units (about -110..110); checked only
    for CPU tensors, so that no GPU value is read on the host.

    Returns:
        A 0-d loss (``"mean"``, ``"sum"``) or per-pixel losses ``(N, *spatial)`` (``"none"``).

    Example:
        >>> import numpy as np, torch, fastcolor
        >>> logits = torch.zeros(2, 313, 8, 8, requires_grad=True)   # (N, 313, H/4, W/4)
        >>> ab = torch.zeros(2, 2, 8, 8)                  # target ab at the logits' resolution
        >>> loss = fastcolor.rebalanced_cross_entropy(logits, ab)
        >>> round(loss.item(), 4), round(float(np.log(313)), 4)   # flat logits: log(313) per pixel
        (5.7462, 5.7462)
        >>> loss.backward()
        >>> logits.grad.shape
        torch.Size([2, 313, 8, 8])
        >>> fastcolor.rebalanced_cross_entropy(logits, ab, reduction="none").shape
        torch.Size([2, 8, 8])

        With rarity weights a pixel's loss is scaled by the weight of its nearest bin; grey (bin
        120) is common in this prior and so weighs little:

        >>> prior = np.ones(313)
        >>> prior[120] = 1000.0
        >>> weights = fastcolor.rarity_weights(prior / prior.sum(), lam=0.5)
        >>> round(fastcolor.rebalanced_cross_entropy(logits, ab, weights).item(), 4)
        0.1229
        >>> round(float(weights[120] * np.log(313)), 4)
        0.1229

        A mask leaves pixels out of the loss, the mean and the gradient (True: left out):

        >>> mask = torch.zeros(2, 8, 8, dtype=torch.bool)
        >>> mask[:, 4:] = True                            # the bottom half is padding
        >>> logits.grad = None
        >>> loss = fastcolor.rebalanced_cross_entropy(logits, ab, mask=mask)
        >>> round(loss.item(), 4)                         # the mean over the 64 pixels kept
        5.7462
        >>> loss.backward()
        >>> bool((logits.grad[:, :, 4:] == 0).all()), bool((logits.grad[:, :, :4] != 0).any())
        (True, True)
    """
    check_tensor("logits", logits, channels=Q)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")
    weights = _one_weights(weights, weight)
    pixel_mask = _check_pixel_mask(mask, logits) if mask is not None else None
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
        _warn_if_normalised(ab)
    class_weights = check_class_weights(weights, logits.device)
    if nongray and ab is None:
        raise ValueError("nongray: needs the target ab to find grey images; pass target_ab= with a SoftLabels target")
    if pixel_mask is not None and ab is not None:
        # A left-out pixel's ab read as 0: NaN ground truth there stays harmless, and it cannot make
        # its image count as coloured for nongray (one pass over the ab, 2/313 of the logits).
        ab = torch.where(pixel_mask.reshape((ab.shape[0], 1) + tuple(ab.shape[2:])), ab.new_zeros(()), ab)
    image_mask = image_mask_nongray(ab) if nongray else None
    name = backends.resolve(backend, logits.device.type)
    if name != "torch" and logits.dtype == torch.float64 and not getattr(backends.get(name), "SUPPORTS_FLOAT64", False):
        raise TypeError(f"logits: backend {name!r} takes float32, float16 or bfloat16 logits, got float64 "
                        "(use backend='torch')")

    spatial = logits.shape[2:]
    x = flat(logits)
    ab_f = flat(ab, torch.float32) if (ab is not None and indices is None) else None
    idx_f = flat(indices, torch.int32) if indices is not None else None
    w_f = flat(soft_w, torch.float32) if soft_w is not None else None
    k_eff = idx_f.shape[1] if idx_f is not None else k

    if name == "torch" or torch.compiler.is_compiling():
        pixel_scale, kept = _mask_factor(pixel_mask, reduction) if pixel_mask is not None else (None, None)
        if name == "torch":
            loss_px = torch_backend.per_pixel_loss(x, ab_f, idx_f, w_f, class_weights, image_mask, k_eff,
                                                   float(sigma), pixel_scale)
        else:
            loss_px, _ = _ce_op(x, ab_f, idx_f, w_f, class_weights, image_mask, pixel_scale, k_eff, float(sigma),
                                False, name)
        loss = _reduce(loss_px, reduction, pixel_mask, kept)
    else:
        loss = _FusedCE.apply(x, ab_f, idx_f, w_f, class_weights, image_mask, pixel_mask, k_eff, float(sigma),
                              reduction, name)
    if reduction == "none":
        return loss.reshape((logits.shape[0],) + tuple(spatial))
    return loss


def _one_weights(weights, weight):
    """``weights=`` and PyTorch's ``weight=`` name one argument: at most one of them may be given."""
    if weight is None:
        return weights
    if weights is not None:
        raise ValueError("weight, weights: expected at most one of them (weight= is PyTorch's spelling of "
                         "weights=), got both")
    return weight


class RebalancedCrossEntropyLoss(nn.Module):
    """Drop-in loss module: ``loss = criterion(logits, target_ab)``.

    Holds the ``(313,)`` rarity weights as a buffer (None: plain soft-target cross-entropy),
    so they follow ``.to(device)`` and ``state_dict()``.

    The arguments are those of :func:`rebalanced_cross_entropy` (checked here, once): ``weights``
    ``(313,)`` (e.g. from :func:`fastcolor.rarity_weights`, stored as float32), ``k``, ``sigma``
    in ab units, ``reduction``, ``nongray`` and ``backend``; ``weight=`` is PyTorch's spelling of
    ``weights`` (as in ``nn.CrossEntropyLoss(weight=...)``; give one of the two), and ``.weight``
    reads the same buffer. ``forward(logits, target, target_ab=None, mask=None)`` takes logits
    ``(N, 313, *spatial)``, ab ``(N, 2, *spatial)`` in Lab units (or a :class:`SoftLabels`) and an
    optional ``(N, *spatial)`` bool mask of the pixels to leave out.

    Example:
        >>> import numpy as np, torch, fastcolor
        >>> prior = np.ones(313)
        >>> prior[120] = 1000.0                           # grey is common in this toy prior
        >>> criterion = fastcolor.RebalancedCrossEntropyLoss(fastcolor.rarity_weights(prior / prior.sum()))
        >>> criterion
        RebalancedCrossEntropyLoss(rebalanced, k=5, sigma=5.0, reduction='mean', nongray=False)
        >>> criterion.weights.shape, criterion.weights.dtype
        (torch.Size([313]), torch.float32)
        >>> logits = torch.zeros(2, 313, 8, 8, requires_grad=True)
        >>> ab = torch.zeros(2, 2, 8, 8)
        >>> ab[:, 0], ab[:, 1] = 40.0, 20.0              # every pixel on bin 198, a rare one
        >>> loss = criterion(logits, ab)
        >>> round(loss.item(), 2)
        23.77
        >>> loss.backward()
    """

    def __init__(self, weights=None, k: int = 5, sigma: float = 5.0, reduction: str = "mean",
                 nongray: bool = False, backend: str = "auto", *, weight=None):
        super().__init__()
        weights = _one_weights(weights, weight)
        k, sigma = check_k_sigma(k, sigma)
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")
        self.register_buffer("weights", check_class_weights(weights, "cpu"))
        self.k, self.sigma, self.reduction, self.nongray, self.backend = k, sigma, reduction, nongray, backend

    @property
    def weight(self) -> torch.Tensor | None:
        """The rarity weights under PyTorch's name (``nn.CrossEntropyLoss.weight``): the ``weights`` buffer."""
        return self.weights

    def forward(self, logits: torch.Tensor, target, target_ab: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.weights is not None and self.weights.device != logits.device:
            # Once: the buffer follows the logits (a module left on the CPU would otherwise copy its
            # weights to the GPU on every call, a pageable host-to-device copy; issue 21.5).
            self.weights = self.weights.to(logits.device)
        return rebalanced_cross_entropy(
            logits, target, self.weights, self.k, self.sigma, self.reduction, self.nongray, self.backend, target_ab,
            mask=mask,
        )

    def extra_repr(self) -> str:
        w = "rebalanced" if self.weights is not None else "unweighted"
        return f"{w}, k={self.k}, sigma={self.sigma}, reduction={self.reduction!r}, nongray={self.nongray}"
