"""Deep Koalarization (Baldassarre, Morin & Rodes-Guirao 2017): encoder + global embedding fusion + decoder.

The network regresses ab / 128 (tanh) at the input resolution from L (N, 1, H, W) in 0..100
(H, W divisible by 8) and a global image embedding (N, D) from a frozen classification
backbone fed the grayscale image. The backbone is a torchvision model built with
``weights=None``; pretrained weights are loaded only from a local file.

The embedding, as Deep Koalarization built it: their code (``dataset/lab_batch.py`` of
baldassarreFe/deep-koalarization, TensorFlow-slim) turns the image grey, stacks it to three
channels, scales it to the classifier's input range ([-1, 1]) and stores the *first output of
``inception_resnet_v2``*, which TF-slim's network returns before its softmax: the 1001 logits of
Inception-ResNet-v2 (ImageNet's 1000 classes and a background class), not the probabilities.
So ``embedding="logits"`` is the default here; ``"probs"`` (fastcolor v1's default; its config
key ``embed_softmax: true``) and ``"features"`` (the penultimate layer, the input of the
classifier's last ``Linear``) are options. (The student study reproduced here built its fusion
model in Keras.) Deviations: the backbones are torchvision's (1000 classes, no background class; no
Inception-ResNet-v2 there) and take ImageNet mean/std normalisation instead of [-1, 1].

The embedding is computed from exactly the L the network sees, by one function,
:meth:`FusionNet.embed` (= :meth:`Embedder.forward`): L at the network's input size ->
the backbone's input size (bilinear, antialiased) -> grey sRGB in 3 equal channels ->
the backbone's normalisation -> the backbone -> logits / probabilities / features.
Training (per batch, from the augmented L), evaluation and colorization all call it. Embeddings
of un-augmented images can be precomputed once and cached on disk (:class:`EmbeddingCache`),
through that same function, from the L a :class:`~fastcolor.data.ColorizationDataset` yields.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fastcolor.color import gray_rgb
from fastcolor.io import load_state_file, save_tensors

#: name -> (builder kwargs, default input size). Every builder gets ``weights=None``.
BACKBONES: dict[str, tuple[dict[str, Any], int]] = {
    "resnet50": ({}, 224),
    "resnet18": ({}, 224),
    "mobilenet_v3_small": ({}, 224),
    "inception_v3": ({"aux_logits": True, "init_weights": False}, 299),
}
#: What a fusion model's embedding is (the ``embedding`` key of its config): the classifier's
#: logits (Deep Koalarization's choice, the default), its softmax probabilities (fastcolor v1's
#: default), or the penultimate features (the input of the classifier's last ``Linear``).
EMBEDDINGS = ("logits", "probs", "features")
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def resolve_embedding(embedding: str | None, embed_softmax: bool | None) -> str:
    """The embedding kind of a config: ``embedding`` if given, else what a config that only has
    fastcolor v1's ``embed_softmax`` meant (True: ``"probs"``, False: ``"logits"``), else
    ``"logits"`` (Deep Koalarization's). Both given and disagreeing is an error."""
    if embedding is not None and embedding not in EMBEDDINGS:
        raise ValueError(f"embedding must be one of {EMBEDDINGS}, got {embedding!r}")
    if embed_softmax is not None and not isinstance(embed_softmax, bool):
        raise ValueError(f"embed_softmax must be True, False or None, got {embed_softmax!r}")
    implied = None if embed_softmax is None else ("probs" if embed_softmax else "logits")
    if embedding is not None and implied is not None and embedding != implied:
        raise ValueError(f"embedding={embedding!r} contradicts embed_softmax={embed_softmax!r} (fastcolor v1's key, "
                         f"meaning embedding={implied!r}); give only embedding")
    return embedding or implied or "logits"


class Embedder(nn.Module):
    """Frozen torchvision classifier turning L (N, 1, H, W) into a global embedding (N, D).

    Args:
        backbone: a key of :data:`BACKBONES`.
        weights: optional local file (``.safetensors`` or a torch file loaded with
            ``weights_only=True``) with the backbone's state dict. Without it the backbone is
            randomly initialised (fine for tests, useless for quality).
        input_size: the square size the grayscale image is resized to (default: the backbone's).
        embedding: one of :data:`EMBEDDINGS`: ``"logits"`` (default, Deep Koalarization's: D =
            the number of classes, 1000 for torchvision's), ``"probs"`` (their softmax) or
            ``"features"`` (the penultimate layer: D = 2048 for resnet50, 1024 for
            mobilenet_v3_small).
        softmax: fastcolor v1's switch (True = ``"probs"``, False = ``"logits"``); prefer ``embedding``.

    Example:
        >>> e = Embedder("mobilenet_v3_small", input_size=32)
        >>> e(torch.full((2, 1, 64, 64), 50.0)).shape
        torch.Size([2, 1000])
    """

    def __init__(self, backbone: str = "resnet50", weights: str | os.PathLike | None = None,
                 input_size: int | None = None, embedding: str | None = None, softmax: bool | None = None):
        super().__init__()
        if backbone not in BACKBONES:
            raise ValueError(f"backbone must be one of {sorted(BACKBONES)}, got {backbone!r}")
        kwargs, default_size = BACKBONES[backbone]
        self.backbone_name = backbone
        self.input_size = int(input_size or default_size)
        self.embedding = resolve_embedding(embedding, softmax)
        # Without weights the backbone is random but reproducible (seed 0), so embeddings
        # cached by one process match a model rebuilt later from its config.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            import torchvision  # here: it imports torch._dynamo (~1 s), which only a fusion model needs

            self.net = getattr(torchvision.models, backbone)(weights=None, **kwargs)
        self.weights_id = None
        if weights is not None:
            st = Path(weights).stat() if Path(weights).is_file() else None
            self.weights_id = f"{Path(weights).resolve()}|{st.st_mtime_ns if st else ''}"

            try:
                self.net.load_state_dict(load_state_file(weights))
            except RuntimeError as exc:  # missing/unexpected keys, size mismatches: another network's weights
                raise ValueError(f"weights: {weights} does not fit the {backbone} backbone: "
                                 f"{' '.join(str(exc).split())[:400]}") from exc
        self.net.requires_grad_(False)
        self.net.eval()
        # "features": the input of the classifier's last Linear (resnet ``fc``, mobilenet
        # ``classifier[3]``, inception ``fc``: the last Linear registered), captured by a hook so the
        # backbone's state dict, and so its weights files, stay the classifier's.
        self._features: list[torch.Tensor] = []
        if self.embedding == "features":
            head = [m for m in self.net.modules() if isinstance(m, nn.Linear)][-1]
            head.register_forward_pre_hook(self._keep_features)
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        with torch.no_grad():
            out = self.net(torch.zeros(1, 3, self.input_size, self.input_size))
            self.dim = int((self._features.pop() if self._features else out).flatten(1).shape[1])

    def _keep_features(self, _module: nn.Module, args: tuple) -> None:
        self._features.append(args[0])

    def train(self, mode: bool = True) -> Embedder:
        return super().train(False)  # always frozen, BatchNorm in eval mode

    @property
    def softmax(self) -> bool:
        """fastcolor v1's name: whether the embedding is the probabilities."""
        return self.embedding == "probs"

    @torch.no_grad()
    def forward(self, L: torch.Tensor) -> torch.Tensor:
        """The embedding (N, D) float32 of L (N, 1, H, W) in 0..100 at the colorizer's input size.

        The one preprocessing (see the module docstring): L resized to ``input_size`` (bilinear,
        antialiased; skipped when it already is), grey sRGB in 3 equal channels
        (:func:`fastcolor.color.gray_rgb`), ImageNet mean/std, the backbone, then the head
        ``embedding`` asks for. It runs in float32 outside any autocast region, so a bf16
        training step computes the same embedding as float32 colorization.
        """
        if not isinstance(L, torch.Tensor) or L.dim() != 4 or L.shape[1] != 1:
            got = tuple(L.shape) if isinstance(L, torch.Tensor) else type(L).__name__
            raise ValueError(f"L must be a tensor of shape (N, 1, H, W), got {got}")
        # (autocast knows cpu/cuda/...; the meta device of colorize's memory estimate has none)
        off = torch.autocast(L.device.type, enabled=False) if L.device.type != "meta" else contextlib.nullcontext()
        with off:
            x = gray_rgb(L.float())
            if x.shape[-2:] != (self.input_size, self.input_size):
                x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", antialias=True,
                                  align_corners=False)
            self._features.clear()
            out = self.net((x - self.mean) / self.std)
            if self.embedding == "features":
                out = self._features.pop().flatten(1)
            return out.softmax(1) if self.embedding == "probs" else out


def _c(channels: int, width: float) -> int:
    return max(1, int(round(channels * width)))


def _conv(c_in: int, c_out: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1), nn.ReLU(inplace=True)]


class FusionNet(nn.Module):
    """The Deep Koalarization colorizer. ``forward(L, embedding=None) -> ab / 128`` in [-1, 1], (N, 2, H, W).

    ``L``: (N, 1, H, W) lightness in 0..100 (H, W multiples of 8), scaled to (L - 50) / 50;
    ``embedding``: (N, D) from :meth:`embed` (computed from L when None). The encoder runs at
    1/8 of the input size, the embedding is tiled over it and fused by a 1x1 conv, and the
    decoder upsamples back to (H, W); ab in Lab units is the output times 128
    (:func:`fastcolor.colorize.decode_ab`).

    Args:
        input_size: the square training size (224 in the paper; recorded, not enforced).
        width: channel multiplier (1.0 = the paper's widths) for small variants.
        backbone, backbone_weights, embed_size: see :class:`Embedder`.
            ``backbone=None`` builds no backbone: embeddings of size ``embed_dim`` must then be
            passed to ``forward`` (e.g. from an :class:`EmbeddingCache`).
        embedding: one of :data:`EMBEDDINGS`, default ``"logits"`` (Deep Koalarization's code
            feeds Inception-ResNet-v2's 1001 logits). Recorded in ``config["embedding"]``.
        embed_softmax: fastcolor v1's key (True = ``"probs"``, False = ``"logits"``). Every v1
            model file records it (v1's default was True), so a v1 model without ``embedding``
            loads with the embedding it was trained with; new configs record only ``embedding``.
        embed_dim: embedding size when ``backbone`` is None (otherwise taken from the backbone).

    Example:
        >>> import torch
        >>> net = FusionNet.tiny(input_size=32)               # mobilenet_v3_small backbone, D = 1000
        >>> out = net(torch.full((2, 1, 32, 32), 50.0))        # L in 0..100
        >>> out.shape, bool(out.abs().max() <= 1)              # ab / 128
        (torch.Size([2, 2, 32, 32]), True)
        >>> FusionNet.tiny(backbone=None)(torch.zeros(1, 1, 32, 32), torch.zeros(1, 1000)).shape
        torch.Size([1, 2, 32, 32])
    """

    def __init__(self, input_size: int = 224, width: float = 1.0, backbone: str | None = "resnet50",
                 backbone_weights: str | None = None, embed_size: int | None = None, embedding: str | None = None,
                 embed_softmax: bool | None = None, embed_dim: int | None = None):
        super().__init__()
        if not isinstance(input_size, int) or input_size < 8 or input_size % 8:
            raise ValueError(f"input_size must be a positive int divisible by 8, got {input_size!r}")
        if not (isinstance(width, (int, float)) and width > 0):
            raise ValueError(f"width must be a positive number, got {width!r}")
        embedding = resolve_embedding(embedding, embed_softmax)
        if backbone is not None:
            self.embedder: Embedder | None = Embedder(backbone, backbone_weights, embed_size, embedding)
            embed_dim = self.embedder.dim
            embed_size = self.embedder.input_size
        else:
            if not isinstance(embed_dim, int) or embed_dim < 1:
                raise ValueError(f"embed_dim must be a positive int when backbone is None, got {embed_dim!r}")
            self.embedder = None
        self.config: dict[str, Any] = {
            "arch": "fusion", "input_size": input_size, "width": float(width), "backbone": backbone,
            "backbone_weights": None if backbone_weights is None else str(backbone_weights),
            "embed_size": embed_size, "embedding": embedding, "embed_dim": embed_dim,
        }
        w = width
        self.encoder = nn.Sequential(
            *_conv(1, _c(64, w), 2), *_conv(_c(64, w), _c(128, w)), *_conv(_c(128, w), _c(128, w), 2),
            *_conv(_c(128, w), _c(256, w)), *_conv(_c(256, w), _c(256, w), 2), *_conv(_c(256, w), _c(512, w)),
            *_conv(_c(512, w), _c(512, w)), *_conv(_c(512, w), _c(256, w)),
        )
        self.fusion = nn.Sequential(nn.Conv2d(_c(256, w) + embed_dim, _c(256, w), 1), nn.ReLU(inplace=True))
        up = nn.Upsample(scale_factor=2, mode="nearest")
        self.decoder = nn.Sequential(
            *_conv(_c(256, w), _c(128, w)), up, *_conv(_c(128, w), _c(64, w)), *_conv(_c(64, w), _c(64, w)),
            nn.Upsample(scale_factor=2, mode="nearest"), *_conv(_c(64, w), _c(32, w)),
            nn.Conv2d(_c(32, w), 2, 3, padding=1), nn.Tanh(), nn.Upsample(scale_factor=2, mode="nearest"),
        )

    @classmethod
    def tiny(cls, input_size: int = 32, backbone: str | None = "mobilenet_v3_small", embed_size: int = 64) -> FusionNet:
        """Narrow variant with a small backbone at a small embedding size, for tests and demos.

        Width 1/8 of the paper's, ``mobilenet_v3_small`` fed 64 x 64; ``backbone=None``: no
        backbone, embeddings (N, 1000) must be passed to ``forward``.
        """
        return cls(input_size=input_size, width=0.125, backbone=backbone, embed_size=embed_size,
                   embed_dim=None if backbone else 1000)

    @property
    def output_stride(self) -> int:
        """How much smaller than the input the output is: 1 (ab at the input's (H, W))."""
        return 1

    def embed(self, L: torch.Tensor) -> torch.Tensor:
        """The global embedding (N, D) of L (N, 1, H, W) in 0..100 at this network's input size:
        the one preprocessing function that training, evaluation, colorization and the
        :class:`EmbeddingCache` share (:meth:`Embedder.forward`). No gradient flows (frozen).

        Example:
            >>> m = FusionNet.tiny(input_size=32)
            >>> m.embed(torch.full((1, 1, 32, 32), 50.0)).shape
            torch.Size([1, 1000])
        """
        if self.embedder is None:
            raise ValueError("embedding must be given: this FusionNet was built with backbone=None")
        return self.embedder(L)

    def forward(self, L: torch.Tensor, embedding: torch.Tensor | None = None) -> torch.Tensor:
        """ab / 128 (N, 2, H, W) in [-1, 1] (tanh) from L (N, 1, H, W) in 0..100 and the embedding
        (N, D), computed by :meth:`embed` when None. H and W must be multiples of 8."""
        if not isinstance(L, torch.Tensor) or L.dim() != 4 or L.shape[1] != 1:
            got = tuple(L.shape) if isinstance(L, torch.Tensor) else type(L).__name__
            raise ValueError(f"L must be a tensor of shape (N, 1, H, W), got {got}")
        if L.shape[-1] % 8 or L.shape[-2] % 8:
            raise ValueError(f"L height and width must be divisible by 8, got {tuple(L.shape[-2:])}")
        if embedding is None:
            embedding = self.embed(L)
        dim = self.config["embed_dim"]
        if embedding.shape != (L.shape[0], dim):
            raise ValueError(f"embedding must have shape ({L.shape[0]}, {dim}), got {tuple(embedding.shape)}")
        x = self.encoder((L - 50.0) / 50.0)
        tiled = embedding.to(x.dtype)[:, :, None, None].expand(-1, -1, *x.shape[-2:])
        return self.decoder(self.fusion(torch.cat([x, tiled], 1)))


class EmbeddingCache:
    """Backbone embeddings of image files, one small safetensors file each under ``directory``.

    Only for images that are not augmented: an embedding must be computed from exactly the L
    the network sees, so with augmentation on it is computed per batch from the augmented L
    (:meth:`FusionNet.embed`) and no cache is used; :class:`~fastcolor.data.ColorizationDataset`
    refuses a cache together with augmentation. Embeddings are computed by the embedder's
    forward (= :meth:`FusionNet.embed`) from the L the dataset yields, at ``image_size`` (the
    network's input size).

    The key is a hash of the file's absolute path, mtime and size and of the embedder's
    identity (backbone, backbone input size, embedding kind, weights file, and ``image_size``),
    so a changed image, backbone or size misses the cache instead of returning a stale embedding.

    Args:
        directory: where the files go (created if missing).
        embedder: the :class:`Embedder` (``FusionNet.embedder``) that computes embeddings;
            needed by :meth:`precompute`, and gives the identity when ``identity`` is None.
        identity: the embedder's identity as a dict, to read a cache without building the
            backbone.
        image_size: the network's input size, the side of the L that embeddings are computed from.

    Example:
        >>> import tempfile, numpy as np, torch
        >>> from PIL import Image
        >>> from fastcolor.data import load_l
        >>> tmp = tempfile.TemporaryDirectory()
        >>> photo = f"{tmp.name}/grey.png"
        >>> Image.fromarray(np.full((40, 40, 3), 128, np.uint8)).save(photo)
        >>> net = FusionNet.tiny(input_size=32)
        >>> cache = EmbeddingCache(f"{tmp.name}/cache", net.embedder, image_size=32)
        >>> cache.precompute([photo], lambda p: load_l(p, 32))  # L (1, 32, 32) in 0..100
        1
        >>> e = cache.get(photo)
        >>> e.shape, torch.allclose(e, net.embed(load_l(photo, 32)[None])[0])
        (torch.Size([1000]), True)
        >>> tmp.cleanup()
    """

    def __init__(self, directory: str | os.PathLike, embedder: Embedder | None = None, identity: dict | None = None,
                 image_size: int | None = None):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.embedder = embedder
        if identity is None:
            if embedder is None:
                raise ValueError("embedder or identity must be given")
            identity = {"backbone": embedder.backbone_name, "size": embedder.input_size,
                        "embedding": embedder.embedding, "weights": embedder.weights_id}
            if image_size is not None:
                identity["image_size"] = int(image_size)
        self.identity = json.dumps(identity, sort_keys=True)

    def key(self, path: str | os.PathLike) -> str:
        """The hex SHA-1 naming ``path``'s cache file (its absolute path, mtime, size, and the identity)."""
        p = Path(path).resolve()
        st = p.stat()
        raw = f"{p}|{st.st_mtime_ns}|{st.st_size}|{self.identity}"
        return hashlib.sha1(raw.encode()).hexdigest()

    def _file(self, path) -> Path:
        return self.directory / f"{self.key(path)}.safetensors"

    def get(self, path: str | os.PathLike) -> torch.Tensor | None:
        """The cached embedding (D,) float32 of the image ``path``, or None (not cached, changed,
        missing, or a damaged cache file)."""
        from safetensors.torch import load_file

        try:
            f = self._file(path)
            return load_file(str(f))["embedding"] if f.is_file() else None
        except (OSError, ValueError, KeyError, RuntimeError):  # missing image or damaged cache file: a miss
            return None

    def put(self, path: str | os.PathLike, embedding: torch.Tensor) -> None:
        """Store ``embedding`` (D,) for the image ``path`` (as float32 on the CPU, written atomically)."""
        save_tensors(self._file(path), {"embedding": embedding.detach().float().cpu()})

    @torch.no_grad()
    def precompute(self, paths: Iterable[str | os.PathLike], load_l: Callable[[str], torch.Tensor],
                   batch_size: int = 32, device: str | torch.device = "cpu") -> int:
        """Embed every path not yet cached; ``load_l(path)`` returns L (1, S, S) as the network sees
        it (:func:`fastcolor.data.load_l` at the network's input size is what
        :class:`~fastcolor.data.ColorizationDataset` yields without augmentation).
        Unreadable files are skipped. Returns how many were computed."""
        if self.embedder is None:
            raise ValueError("precompute needs an embedder")
        todo = [p for p in paths if self.get(p) is None]
        self.embedder.to(device)
        done = 0
        for i in range(0, len(todo), batch_size):
            batch, ok = [], []
            for p in todo[i:i + batch_size]:
                try:
                    batch.append(load_l(p))
                    ok.append(p)
                except Exception:  # noqa: BLE001 - unreadable images are reported by the dataset
                    continue
            if not batch:
                continue
            emb = self.embedder(torch.stack(batch).to(device))
            for p, e in zip(ok, emb, strict=True):
                self.put(p, e)
            done += len(ok)
        return done
