"""Deep Koalarization (Baldassarre, Morin & Rodes-Guirao 2017): encoder + global embedding fusion + decoder.

The network regresses ab / 128 (tanh) at the input resolution from L (N, 1, H, W) in 0..100
(H, W divisible by 8) and a global image embedding (N, D) from a frozen classification
backbone fed the grayscale image. The backbone is a torchvision model built with
``weights=None``; pretrained weights are loaded only from a local file. Embeddings can be
precomputed once and cached on disk (:class:`EmbeddingCache`).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
import torchvision
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
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


class Embedder(nn.Module):
    """Frozen torchvision classifier turning L (N, 1, H, W) into a global embedding (N, 1000).

    Args:
        backbone: a key of :data:`BACKBONES`.
        weights: optional local file (``.safetensors`` or a torch file loaded with
            ``weights_only=True``) with the backbone's state dict. Without it the backbone is
            randomly initialised (fine for tests, useless for quality).
        input_size: the square size the grayscale image is resized to (default: the backbone's).
        softmax: return class probabilities (as the paper) instead of logits.
    """

    def __init__(self, backbone: str = "resnet50", weights: str | os.PathLike | None = None,
                 input_size: int | None = None, softmax: bool = True):
        super().__init__()
        if backbone not in BACKBONES:
            raise ValueError(f"backbone must be one of {sorted(BACKBONES)}, got {backbone!r}")
        kwargs, default_size = BACKBONES[backbone]
        self.backbone_name = backbone
        self.input_size = int(input_size or default_size)
        self.softmax = softmax
        # Without weights the backbone is random but reproducible (seed 0), so embeddings
        # cached by one process match a model rebuilt later from its config.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
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
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        with torch.no_grad():
            self.dim = int(self.net(torch.zeros(1, 3, self.input_size, self.input_size)).shape[1])

    def train(self, mode: bool = True) -> "Embedder":
        return super().train(False)  # always frozen, BatchNorm in eval mode

    @torch.no_grad()
    def forward(self, L: torch.Tensor) -> torch.Tensor:
        x = gray_rgb(L.float())
        if x.shape[-2:] != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", antialias=True,
                              align_corners=False)
        out = self.net((x - self.mean) / self.std)
        return out.softmax(1) if self.softmax else out


def _c(channels: int, width: float) -> int:
    return max(1, int(round(channels * width)))


def _conv(c_in: int, c_out: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1), nn.ReLU(inplace=True)]


class FusionNet(nn.Module):
    """The Deep Koalarization colorizer. ``forward(L, embedding=None) -> ab / 128`` in [-1, 1], (N, 2, H, W).

    Args:
        input_size: the square training size (224 in the paper; recorded, not enforced).
        width: channel multiplier (1.0 = the paper's widths) for small variants.
        backbone, backbone_weights, embed_size, embed_softmax: see :class:`Embedder`.
            ``backbone=None`` builds no backbone: embeddings of size ``embed_dim`` must then be
            passed to ``forward`` (e.g. from an :class:`EmbeddingCache`).
        embed_dim: embedding size when ``backbone`` is None (otherwise taken from the backbone).
    """

    def __init__(self, input_size: int = 224, width: float = 1.0, backbone: str | None = "resnet50",
                 backbone_weights: str | None = None, embed_size: int | None = None, embed_softmax: bool = True,
                 embed_dim: int | None = None):
        super().__init__()
        if not isinstance(input_size, int) or input_size < 8 or input_size % 8:
            raise ValueError(f"input_size must be a positive int divisible by 8, got {input_size!r}")
        if not (isinstance(width, (int, float)) and width > 0):
            raise ValueError(f"width must be a positive number, got {width!r}")
        if backbone is not None:
            self.embedder: Embedder | None = Embedder(backbone, backbone_weights, embed_size, embed_softmax)
            embed_dim = self.embedder.dim
            embed_size = self.embedder.input_size
        else:
            if not isinstance(embed_dim, int) or embed_dim < 1:
                raise ValueError(f"embed_dim must be a positive int when backbone is None, got {embed_dim!r}")
            self.embedder = None
        self.config: dict[str, Any] = {
            "arch": "fusion", "input_size": input_size, "width": float(width), "backbone": backbone,
            "backbone_weights": None if backbone_weights is None else str(backbone_weights),
            "embed_size": embed_size, "embed_softmax": embed_softmax, "embed_dim": embed_dim,
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
    def tiny(cls, input_size: int = 32, backbone: str | None = "mobilenet_v3_small", embed_size: int = 64) -> "FusionNet":
        """Narrow variant with a small backbone at a small embedding size, for tests and demos."""
        return cls(input_size=input_size, width=0.125, backbone=backbone, embed_size=embed_size,
                   embed_dim=None if backbone else 1000)

    @property
    def output_stride(self) -> int:
        return 1

    def embed(self, L: torch.Tensor) -> torch.Tensor:
        if self.embedder is None:
            raise ValueError("embedding must be given: this FusionNet was built with backbone=None")
        return self.embedder(L)

    def forward(self, L: torch.Tensor, embedding: torch.Tensor | None = None) -> torch.Tensor:
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

    The key is a hash of the file's absolute path, mtime and size and of the embedder's
    identity (backbone, input size, softmax, weights file), so a changed image or backbone
    misses the cache instead of returning a stale embedding.
    """

    def __init__(self, directory: str | os.PathLike, embedder: Embedder | None = None, identity: dict | None = None):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.embedder = embedder
        if identity is None:
            if embedder is None:
                raise ValueError("embedder or identity must be given")
            identity = {"backbone": embedder.backbone_name, "size": embedder.input_size, "softmax": embedder.softmax,
                        "weights": embedder.weights_id}
        self.identity = json.dumps(identity, sort_keys=True)

    def key(self, path: str | os.PathLike) -> str:
        p = Path(path).resolve()
        st = p.stat()
        raw = f"{p}|{st.st_mtime_ns}|{st.st_size}|{self.identity}"
        return hashlib.sha1(raw.encode()).hexdigest()

    def _file(self, path) -> Path:
        return self.directory / f"{self.key(path)}.safetensors"

    def get(self, path: str | os.PathLike) -> torch.Tensor | None:
        from safetensors.torch import load_file

        try:
            f = self._file(path)
            return load_file(str(f))["embedding"] if f.is_file() else None
        except (OSError, ValueError, KeyError, RuntimeError):  # missing image or damaged cache file: a miss
            return None

    def put(self, path: str | os.PathLike, embedding: torch.Tensor) -> None:
        save_tensors(self._file(path), {"embedding": embedding.detach().float().cpu()})

    @torch.no_grad()
    def precompute(self, paths: Iterable[str | os.PathLike], load_l: Callable[[str], torch.Tensor],
                   batch_size: int = 32, device: str | torch.device = "cpu") -> int:
        """Embed every path not yet cached; ``load_l(path)`` returns L (1, S, S) at the embedder's size.
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
            for p, e in zip(ok, emb):
                self.put(p, e)
            done += len(ok)
        return done
