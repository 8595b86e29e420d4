"""The baseline: each hot path as a plain PyTorch composition, on any device.

This is what a user would write without fastcolor (cdist + topk + scatter, log_softmax, sum),
differentiable by autograd. Every benchmark is a ratio against it. It builds the dense
``N x 313 x P`` target and the log-probabilities, which is exactly the memory traffic the
fused backends avoid.

Exact ties in distance at the k-th nearest bin may resolve differently from the reference's
"lower index first" rule (``torch.topk`` does not promise an order among equal values).
"""
from __future__ import annotations

import torch

from fastcolor.backends._tables import centres_for
from fastcolor.backends.contract import LossCall
from fastcolor.gamut import Q


def unavailable_reason(device_type: str) -> str | None:
    return None


def _bins(like: torch.Tensor) -> torch.Tensor:
    return centres_for(like)  # cached on the device: no host-to-device copy per call


def soft_encode(ab: torch.Tensor, *, k: int, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
    n, _, p = ab.shape
    pixels = ab.float().permute(0, 2, 1).reshape(-1, 2)
    bins = _bins(ab)
    d2 = (pixels[:, None, :] - bins[None, :, :]).square().sum(-1)  # (N*P, Q)
    near, idx = torch.topk(d2, k, dim=1, largest=False, sorted=True)
    w = torch.softmax(-(near - near[:, :1]) / (2.0 * sigma * sigma), dim=1)
    def back(x):
        return x.reshape(n, p, k).permute(0, 2, 1).contiguous()

    return back(idx.to(torch.int32)), back(w)


def dense_target(indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(N, k, P) sparse -> (N, Q, P) float32 dense distribution (a bin listed twice: its weights summed)."""
    n, _, p = indices.shape
    z = torch.zeros(n, Q, p, dtype=torch.float32, device=indices.device)
    return z.scatter_add_(1, indices.long(), weights.float())


def _pixel_factor(indices, class_weights, image_mask, pixel_scale, compute):
    """m_n v_np s_np as an (N, P) tensor, or None when all three are absent."""
    f = None
    if class_weights is not None:
        f = class_weights.to(compute)[indices[:, 0].long()]
    if image_mask is not None:
        m = image_mask.to(compute)[:, None]
        f = m.expand(indices.shape[0], indices.shape[2]) if f is None else f * m
    if pixel_scale is not None:
        f = pixel_scale.to(compute) if f is None else f * pixel_scale.to(compute)
    return f


def _loss_terms(logits, ab, indices, weights, class_weights, image_mask, k, sigma, pixel_scale):
    if indices is None:
        indices, weights = soft_encode(ab, k=k, sigma=sigma)
    compute = torch.float64 if logits.dtype == torch.float64 else torch.float32
    logp = torch.log_softmax(logits.to(compute), dim=1)
    f = _pixel_factor(indices, class_weights, image_mask, pixel_scale, compute)
    # Sum over the k target bins only (as the reference): a -inf logit outside them stays harmless.
    loss = -(weights.to(compute) * logp.gather(1, indices.long())).sum(1)
    return (loss if f is None else loss * f), logp, (indices, weights), f


def per_pixel_loss(logits, ab, indices, weights, class_weights, image_mask, k, sigma, pixel_scale=None):
    """Differentiable per-pixel loss (N, P) in float32 (float64 for float64 logits)."""
    return _loss_terms(logits, ab, indices, weights, class_weights, image_mask, k, sigma, pixel_scale)[0]


def ce_forward(call: LossCall):
    """The contract's fused op, written out: loss and the analytic gradient (no autograd inside)."""
    logits = call.logits
    loss, logp, (indices, weights), f = _loss_terms(logits, call.ab, call.indices, call.weights, call.class_weights,
                                                    call.image_mask, call.k, call.sigma, call.pixel_scale)
    if not call.need_grad:
        return loss, None
    grad = logp.exp_().sub_(dense_target(indices, weights).to(logp.dtype))
    if f is not None:
        grad.mul_(f[:, None, :])
    return loss, grad.mul_(call.grad_scale).to(logits.dtype)


def annealed_mean(x: torch.Tensor, *, T: float, is_probs: bool) -> torch.Tensor:
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    x = x.to(compute)
    if is_probs:
        x = torch.log(x)
    f = torch.softmax(x / T, dim=1)
    # contiguous (N, 2, P), as the other backends and the custom op's fake implementation promise
    return torch.einsum("nqp,qc->ncp", f, _bins(x).to(compute)).contiguous()
