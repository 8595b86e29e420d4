"""The training step as the headline benchmark (issue 12, point 5): one full Adam step (forward,
loss, backward, step) of :class:`~fastcolor.models.zhang.ZhangNet` (256 px) and ``ZhangNet.small``
(128 px) with four losses, timed in one run, round-robin, so that drift hits every variant alike:

``fused``
    :func:`fastcolor.rebalanced_cross_entropy` (``backend="auto"``), ab in, soft-encoded inside.
``plain``
    what a user writes in PyTorch: ``torch.cdist`` to the 313 bins, the k = 5 nearest
    (``topk``), Gaussian weights (sigma = 5, Zhang et al. 2016, Sec. 2.1), scattered into a dense
    ``N x 313 x H x W`` target, rarity weight of the nearest bin, ``log_softmax``, mean.
``authors``
    the authors' layout (their Caffe ``NNEncLayer``/``PriorBoostLayer``): every batch k-NN encoded
    on the CPU with scikit-learn's ``NearestNeighbors`` into a dense 313-channel target, the
    rarity weight of its argmax taken there too, both copied to the device, then the same dense
    soft-target loss. The authors' released code used k = 10; here k = 5 like the other variants,
    so that all three losses are the same number (the correctness line checks that).
``floor``
    the network alone with a trivial loss (``logits.mean()``): what no loss can beat.

Adam with the trainer's betas (0.9, 0.99) (:class:`fastcolor.train.TrainConfig`); the inputs are
one fixed random batch per configuration (L in 0..100, ab of random sRGB colours at the logits'
resolution), so data loading is not part of the step. ``python -m fastcolor.bench --train-step``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

import fastcolor as fc
from fastcolor import backends
from fastcolor.app.bench.common import log, srgb_ab
from fastcolor.backends._tables import centres_for
from fastcolor.gamut import AB_BINS, Q
from fastcolor.models.zhang import ZhangNet

#: model name -> (constructor, input size in px)
MODELS = {
    "zhang": (ZhangNet, 256),
    "small": (ZhangNet.small, 128),
    "tiny": (lambda: ZhangNet.tiny(32), 32),  # --quick only
}
LABELS = {"zhang": "ZhangNet", "small": "ZhangNet.small", "tiny": "ZhangNet.tiny"}
VARIANTS = ("fused", "plain", "authors", "floor")
#: batch sizes per model: on the 2-core CPU the whole table takes about 2.5 minutes (a full
#: ZhangNet step at batch 4 measured 5.1-5.2 s there, issue 12); on a GPU up to 40, the batch of
#: the training shape (40, 313, 64, 64) the other benchmarks use.
DEFAULT_BATCHES = {"cpu": {"zhang": (2, 4), "small": (8, 16)}, "cuda": {"zhang": (16, 40), "small": (64, 128)}}
QUICK_BATCHES = {"tiny": (2,)}
K, SIGMA = 5, 5.0
BETAS = (0.9, 0.99)
LR = 3e-5  # the rate does not change the time of a step


# ----------------------------------------------------------------------------- the losses


def plain_loss(logits: torch.Tensor, ab: torch.Tensor, weights: torch.Tensor, k: int = K, sigma: float = SIGMA):
    """The class-rebalanced soft-target cross-entropy as a PyTorch user writes it (dense target).

    ``logits``: (N, 313, H, W); ``ab``: (N, 2, H, W) float32 on the same device; ``weights``:
    (313,) rarity weights. Returns the mean over the N*H*W pixels (a 0-dim float32 tensor).
    """
    n, _, h, w = logits.shape
    bins = centres_for(ab)  # (313, 2) float32, cached on the device (a user would keep it too)
    pixels = ab.permute(0, 2, 3, 1).reshape(-1, 2)
    dist, idx = torch.cdist(pixels, bins).topk(k, dim=1, largest=False)  # (P, k), nearest first
    z = torch.softmax(-dist.square() / (2 * sigma**2), dim=1)  # Gaussian, normalised over the k
    idx = idx.reshape(n, h, w, k).permute(0, 3, 1, 2)
    target = torch.zeros(n, Q, h, w, device=logits.device).scatter_(1, idx, z.reshape(n, h, w, k).permute(0, 3, 1, 2))
    v = weights[idx[:, 0]]  # rarity weight of the nearest bin (Zhang et al. 2016, eq. 3-4)
    return -(v * (target * torch.log_softmax(logits.float(), 1)).sum(1)).mean()


class AuthorsEncoder:
    """The authors' CPU soft-encoding: scikit-learn ``NearestNeighbors`` (ball tree) over the 313
    bins, fitted once, queried for every batch; returns the dense (N, 313, H, W) float32 target and
    the (N, H, W) rarity weight of its argmax, as numpy arrays."""

    def __init__(self, weights: np.ndarray, k: int = K, sigma: float = SIGMA):
        from sklearn.neighbors import NearestNeighbors

        self.nn = NearestNeighbors(n_neighbors=k, algorithm="ball_tree").fit(AB_BINS)
        self.weights, self.sigma = np.asarray(weights, np.float32), sigma

    def __call__(self, ab: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n, _, h, w = ab.shape
        pts = ab.transpose(0, 2, 3, 1).reshape(-1, 2)
        dist, idx = self.nn.kneighbors(pts)
        g = np.exp(-(dist**2) / (2 * self.sigma**2))
        g /= g.sum(1, keepdims=True)
        dense = np.zeros((pts.shape[0], Q), np.float32)
        dense[np.arange(pts.shape[0])[:, None], idx] = g
        v = self.weights[dense.argmax(1)]
        return (np.ascontiguousarray(dense.reshape(n, h, w, Q).transpose(0, 3, 1, 2)), v.reshape(n, h, w))


def dense_loss(logits: torch.Tensor, target: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Mean over pixels of ``-v * sum_q target_q log softmax(logits)_q`` (dense (N, 313, H, W) target)."""
    return -(v * (target * torch.log_softmax(logits.float(), 1)).sum(1)).mean()


# ----------------------------------------------------------------------------- one configuration


@dataclass
class Config:
    """One table block: a model at one batch size, its optimiser and its fixed batch."""

    model_name: str
    batch: int
    device: str
    precision: str = "fp32"
    seed: int = 0

    def __post_init__(self):
        make, self.px = MODELS[self.model_name]
        torch.manual_seed(self.seed)
        self.model = make().to(self.device).train()
        self.opt = torch.optim.Adam(self.model.parameters(), lr=LR, betas=BETAS)
        gen = torch.Generator().manual_seed(self.seed)
        hw = self.px // self.model.output_stride
        self.L = (torch.rand(self.batch, 1, self.px, self.px, generator=gen) * 100).to(self.device)
        self.ab_cpu = srgb_ab(self.batch, hw, hw, "cpu", gen)
        self.ab = self.ab_cpu.to(self.device)
        self.weights = (torch.rand(Q, generator=gen) * 4 + 0.1).to(self.device)
        self.encoder = AuthorsEncoder(self.weights.cpu().numpy())

    def autocast(self):
        return torch.autocast(torch.device(self.device).type, dtype=torch.bfloat16, enabled=self.precision == "bf16")

    def loss(self, variant: str, logits: torch.Tensor) -> torch.Tensor:
        if variant == "fused":
            return fc.rebalanced_cross_entropy(logits, self.ab, self.weights, k=K, sigma=SIGMA)
        if variant == "plain":
            return plain_loss(logits, self.ab, self.weights)
        if variant == "authors":
            dense, v = self.encoder(self.ab_cpu.numpy())
            return dense_loss(logits, torch.from_numpy(dense).to(self.device), torch.from_numpy(v).to(self.device))
        if variant == "floor":
            return logits.float().mean()
        raise ValueError(f"variant: expected one of {VARIANTS}, got {variant!r}")

    def step(self, variant: str) -> None:
        """One optimiser step: zero the gradients, forward, loss, backward, Adam."""
        self.opt.zero_grad(set_to_none=True)
        with self.autocast():
            loss = self.loss(variant, self.model(self.L))
        loss.backward()
        self.opt.step()

    def check(self) -> dict:
        """The three real losses and their gradients with respect to the same logits, before any
        step: the model's logits (nearly uniform at initialisation) and the same plus Gaussian
        noise of scale 3 (so that the target matters); the largest relative differences against
        the fused loss."""
        with torch.no_grad(), self.autocast():
            logits = self.model(self.L).float()
        noisy = logits + 3 * torch.randn(logits.shape, generator=torch.Generator().manual_seed(self.seed)).to(logits)
        res = {}
        for name, x0 in (("model", logits), ("noisy", noisy)):
            out = {}
            for variant in ("fused", "plain", "authors"):
                x = x0.detach().clone().requires_grad_(True)
                loss = self.loss(variant, x)
                loss.backward()
                out[variant] = (float(loss.detach()), x.grad.double())
            ref_l, ref_g = out["fused"]
            res[f"loss_{name}"] = ref_l
            for variant in ("plain", "authors"):
                loss_v, g = out[variant]
                for key, val in ((f"{variant}_loss_rel", abs(loss_v - ref_l) / abs(ref_l)),
                                 (f"{variant}_grad_rel", float((g - ref_g).norm() / ref_g.norm()))):
                    res[key] = max(res.get(key, 0.0), val)
        return res


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_config(cfg: Config, repeats: int | None, warmup: int = 0, target_s: float = 20.0) -> dict:
    """One untimed step (Adam's state, the allocator; :meth:`Config.check` has already called every
    loss once), ``warmup`` untimed rounds, then ``repeats`` rounds over every variant, the order
    rotated each round; returns variant -> list of seconds per step. ``repeats=None``: as many
    rounds as fit in about ``target_s`` by the untimed step's time, 3 to 15."""
    t0 = time.perf_counter()
    cfg.step("floor")
    _sync(cfg.device)
    if repeats is None:
        repeats = min(15, max(3, int(target_s / (len(VARIANTS) * (time.perf_counter() - t0)))))
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for r in range(warmup + repeats):
        for i in range(len(VARIANTS)):
            variant = VARIANTS[(i + r) % len(VARIANTS)]
            _sync(cfg.device)
            t0 = time.perf_counter()
            cfg.step(variant)
            _sync(cfg.device)
            if r >= warmup:
                times[variant].append(time.perf_counter() - t0)
    return times


def summarize_times(times: dict[str, list[float]], batch: int) -> dict:
    """Per variant: median, p10, p90 ms per step, images per second and the share above the floor
    (``(median - floor median) / floor median``)."""
    out = {}
    for variant, ts in times.items():
        ms = np.asarray(ts) * 1e3
        med = float(np.median(ms))
        out[variant] = dict(ms=med, p10=float(np.percentile(ms, 10)), p90=float(np.percentile(ms, 90)),
                            images_per_s=batch / (med / 1e3), repeats=len(ts))
    floor = out.get("floor", {}).get("ms")
    for variant, rec in out.items():
        if floor and variant != "floor":
            rec["above_floor"] = (rec["ms"] - floor) / floor
            rec["above_floor_ms"] = rec["ms"] - floor
    return out


def check_ok(check: dict, precision: str = "fp32") -> bool:
    """Whether the plain and the authors' losses match the fused one: the loss to 1e-4 (fp32), the
    gradient to 1e-2. The gradient's bound is loose because ``torch.cdist`` computes distances
    through a matrix product (its default beyond 25 points), which swaps near-equidistant bins
    among a pixel's five: ZhangNet.small at batch 8 measured 1.4e-3 for the plain loss, 9e-8 for
    the authors' exact distances; a missing or wrong class weight is off by far more."""
    tol_l, tol_g = (1e-4, 1e-2) if precision == "fp32" else (2e-2, 5e-2)
    return all(check[f"{v}_loss_rel"] <= tol_l and check[f"{v}_grad_rel"] <= tol_g for v in ("plain", "authors"))


def run(device: str, models=None, batches=None, repeats=None, precision="fp32", quick=False, budget=None,
        checkpoint=lambda res: None) -> dict:
    """The whole table: every model and batch size, each checked, then timed; ``budget`` (a
    :class:`~fastcolor.app.bench.common.Budget`) drops what does not fit; ``checkpoint(result)``
    after each row (a child process writes its JSON there)."""
    dev = torch.device(device).type
    plan = QUICK_BATCHES if quick else DEFAULT_BATCHES[dev]
    if models:
        plan = {m: (batches or plan.get(m) or DEFAULT_BATCHES[dev].get(m) or (2,)) for m in models}
    elif batches:
        plan = {m: batches for m in plan}
    if repeats is None and (quick or dev != "cpu"):
        repeats = 1 if quick else 10  # on the CPU: as many as fit in ~20 s per model and batch, 3 to 15
    res = dict(device=device, precision=precision, repeats=repeats, backend=backends.resolve("auto", dev),
               rows=[])
    for model_name, bs in plan.items():
        for batch in bs:
            rec = dict(model=model_name, label=LABELS[model_name], px=MODELS[model_name][1], batch=batch)
            if budget is not None and not budget.ok(10):
                rec["skipped"] = "time budget"
                res["rows"].append(rec)
                continue
            try:
                t0 = time.time()
                cfg = Config(model_name, batch, device, precision)
                rec["check"] = cfg.check()
                rec["check_ok"] = check_ok(rec["check"], precision)
                rec["variants"] = summarize_times(time_config(cfg, repeats, warmup=0 if dev == "cpu" else 1), batch)
                rec["seconds"] = time.time() - t0
                log(f"[train-step] {rec['label']} b{batch}: " + ", ".join(
                    f"{v} {r['ms']:.1f} ms" for v, r in rec["variants"].items()) + f" ({rec['seconds']:.0f} s)")
                del cfg
            except Exception as exc:  # noqa: BLE001 - e.g. out of memory at the largest batch: record, go on
                rec["error"] = repr(exc)[:500]
                log(f"[train-step] {rec['label']} b{batch} FAILED: {exc!r}")
            finally:
                if dev == "cuda":
                    torch.cuda.empty_cache()
            res["rows"].append(rec)
            checkpoint(res)
    return res
