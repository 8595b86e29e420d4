"""A trained colorizer as one ONNX graph: L in, ab out, runnable by any ONNX runtime.

The graph (:class:`ColorizerGraph`, exported by :func:`export_onnx`) takes

* ``L``: float32 (N, 1, S, S), the CIE Lab lightness in 0..100, at the network's input size S
  (``size``, default the model's training size ``config["input_size"]``), N free (a dynamic
  batch axis);

and returns

* ``ab``: float32 (N, 2, h, w), the predicted a and b in Lab units, **at the network's output
  resolution**: h = w = S / 4 for a Zhang model (its logits' resolution, Zhang et al. 2016,
  fig. 2), h = w = S for a fusion model. Upsampling ab to the photo and joining it with the
  photo's own full-resolution L is left to the caller, as :mod:`fastcolor.colorize` does, so that
  one resize (to whatever size the photo has) is all there is.

A Zhang model's decoding is the annealed mean (Zhang et al. 2016, eq. 5) written with standard
operators only: ``Softmax(logits * (1 / T))`` then a ``MatMul`` with the (313, 2) table of bin
centres :data:`fastcolor.AB_BINS` (for ``T`` below :data:`fastcolor.reference.T_MODE`, the mode:
``ArgMax`` and ``Gather``, as :func:`fastcolor.annealed_mean` does). fastcolor's custom ops
(``fastcolor::annealed_mean`` and the backends behind it) are never called, so none of them can
appear in the graph: every node is in the default ONNX domain. A fusion model (Deep
Koalarization) exports with its frozen torchvision backbone inside the graph, so its input is L
alone too; one built without a backbone (``backbone=None``, embeddings fed from outside) is
refused.

Needs the optional packages ``onnx`` and ``onnxscript`` (``pip install 'fastcolor[onnx]'``),
which ``torch.onnx.export`` (the ``torch.export``-based exporter) uses; ``onnxruntime`` is only
needed to run the result.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastcolor._extras import MissingExtraError
from fastcolor._version import __version__
from fastcolor.colorize import decode_temperature
from fastcolor.gamut import ab_bins
from fastcolor.io import atomic_write_bytes
from fastcolor.reference import T_MODE

__all__ = ["ColorizerGraph", "export_onnx", "DEFAULT_OPSET", "MIN_OPSET", "max_opset", "require_exporter"]

#: The ONNX opset written by default: the lowest that torch's exporter implements directly (lower
#: ones are converted down from it, see :data:`MIN_OPSET`); ONNX Runtime runs it from version 1.14.
DEFAULT_OPSET = 18
#: The lowest opset accepted. 16 and 17 are written by converting the opset-18 graph down (onnx's
#: version converter); below 16 that conversion failed for these networks (measured with
#: torch 2.14, onnx 1.23, onnxscript 0.7), so it is refused up front.
MIN_OPSET = 16


def max_opset() -> int:
    """The newest default-domain opset the installed ``onnx`` package knows."""
    import onnx

    return int(onnx.defs.onnx_opset_version())


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)  # DistributedDataParallel / DataParallel


def _arch(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    if not isinstance(model, nn.Module) or not isinstance(config, dict) or config.get("arch") not in ("zhang",
                                                                                                      "fusion"):
        raise TypeError(f"model must be a fastcolor ZhangNet or FusionNet (with a .config), got "
                        f"{type(model).__name__}")
    return config["arch"]


class ColorizerGraph(nn.Module):
    """A colorizer and its decoding as one module of plain torch operations (what
    :func:`export_onnx` exports): ``L`` (N, 1, S, S) in 0..100 -> ``ab`` (N, 2, h, w) in Lab units.

    Zhang model: ``softmax(logits / T) @ AB_BINS`` (the annealed mean, Zhang et al. 2016, eq. 5)
    at the logits' resolution h = S / 4; ``T < T_MODE`` gives the mode (the most likely bin's
    centre), as :func:`fastcolor.annealed_mean` does. Fusion model: its tanh output x 128 (its
    ab / 128 regression, Baldassarre et al. 2017) at h = S. The result equals
    ``fastcolor.annealed_mean(model(L), T)`` (or ``model(L) * 128``) to float32 rounding.

    Args:
        model: a :class:`~fastcolor.models.ZhangNet` or :class:`~fastcolor.models.FusionNet` (a
            DDP-wrapped one is unwrapped). It is used as is, not copied: call ``.eval()`` on it (or
            on this module) before running or exporting.
        T: the annealed-mean temperature, finite and > 0; ``None``: the model's own
            (:func:`fastcolor.colorize.decode_temperature`: 0.38, the paper's, or 1.0 for the
            authors' released weights). Ignored for a fusion model.

    Example:
        >>> import torch
        >>> from fastcolor.models import ZhangNet
        >>> graph = ColorizerGraph(ZhangNet.tiny(), T=0.38).eval()
        >>> graph(torch.rand(3, 1, 32, 32) * 100).shape
        torch.Size([3, 2, 8, 8])
    """

    def __init__(self, model: nn.Module, T: float | None = None):
        super().__init__()
        model = _unwrap(model)
        self.arch = _arch(model)
        if self.arch == "fusion" and getattr(model, "embedder", None) is None:
            raise ValueError("model: this fusion model was built without its backbone (backbone=None): its global "
                             "embedding comes from outside the network, so L alone cannot be one graph; export a "
                             "fusion model that has its backbone (e.g. build_model('fusion_small'))")
        if T is None:
            T = decode_temperature(model) if self.arch == "zhang" else 1.0
        if isinstance(T, bool) or not isinstance(T, (int, float)) or not (math.isfinite(T) and T > 0):
            raise ValueError(f"T must be a finite number > 0, got {T!r}")
        self.net = model
        self.T = float(T)
        self.mode = self.T < T_MODE
        # The bin centres as a float32 buffer: an initializer of the exported graph.
        self.register_buffer("bins", ab_bins(dtype=torch.float32), persistent=False)

    def forward(self, L: torch.Tensor) -> torch.Tensor:
        out = self.net(L)
        if self.arch == "fusion":
            return out.float() * 128.0
        logits = out.float()
        if self.mode:  # the T -> 0 limit: the centre of the most likely bin
            return self.bins[logits.argmax(1)].movedim(-1, 1)
        p = torch.softmax(logits * (1.0 / self.T), dim=1)           # (N, 313, h, w)
        return torch.matmul(p.movedim(1, -1), self.bins).movedim(-1, 1)  # (N, h, w, 313) @ (313, 2)


def _check_opset(opset: Any) -> int:
    if isinstance(opset, bool) or not isinstance(opset, int):
        raise TypeError(f"opset must be an int, got {type(opset).__name__}")
    top = max_opset()
    if not MIN_OPSET <= opset <= top:
        raise ValueError(f"opset must be from {MIN_OPSET} to {top} (the newest the installed onnx knows), got "
                         f"{opset}")
    return opset


def require_exporter() -> None:
    """Raise :class:`fastcolor.monitor.MissingExtraError` (an ``ImportError``) naming the packages
    and the extra to install when ``onnx`` or ``onnxscript`` is missing; import neither."""
    missing = [m for m in ("onnx", "onnxscript") if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingExtraError(f"exporting to ONNX needs the package(s) {', '.join(missing)}, which are not "
                                f"installed: pip install 'fastcolor[onnx]'")


def export_onnx(model: nn.Module, path: str | os.PathLike, *, T: float | None = None, size: int | None = None,
                opset: int = DEFAULT_OPSET) -> Path:
    """Write ``model`` and its decoding as one ONNX graph to ``path`` (atomically); returns the path.

    The graph is :class:`ColorizerGraph`: input ``L`` float32 (N, 1, size, size) in 0..100 with a
    dynamic batch axis N, output ``ab`` float32 (N, 2, size / 4, size / 4) in Lab units for a Zhang
    model, (N, 2, size, size) for a fusion model (the network's output resolution). The weights are
    stored inside the file (no external data). The model's metadata is recorded in the file's
    ``metadata_props``: ``fastcolor_version``, ``arch``, ``input_size``, ``output_stride``,
    ``temperature``, ``model_config`` (JSON).

    Args:
        model: a :class:`~fastcolor.models.ZhangNet` or a :class:`~fastcolor.models.FusionNet` with
            its backbone. It is exported in eval mode and left in the mode it was in.
        path: the ``.onnx`` file to write (its folder is created).
        T: annealed-mean temperature (Zhang models), > 0; ``None``: the model's own (0.38, the
            paper's; 1.0 for the authors' released weights).
        size: the square input size S, a multiple of 8 (the networks downsample by 8); ``None``: the
            model's ``config["input_size"]``. The graph's spatial size is fixed at S.
        opset: the default-domain ONNX opset, from :data:`MIN_OPSET` to :func:`max_opset`
            (default :data:`DEFAULT_OPSET`).

    Raises:
        fastcolor.monitor.MissingExtraError: ``onnx`` or ``onnxscript`` is missing (an ImportError
            whose message names the extra to install).
        TypeError, ValueError: a bad argument (named in the message), or a fusion model without
            its backbone.

    Example:
        >>> import onnxruntime, numpy as np                                  # doctest: +SKIP
        >>> from fastcolor.models import ZhangNet
        >>> export_onnx(ZhangNet.tiny(), "tiny.onnx", T=0.38)                 # doctest: +SKIP
        >>> sess = onnxruntime.InferenceSession("tiny.onnx")                 # doctest: +SKIP
        >>> sess.run(["ab"], {"L": np.full((3, 1, 32, 32), 50, np.float32)})[0].shape  # doctest: +SKIP
        (3, 2, 8, 8)
    """
    graph = ColorizerGraph(model, T)
    net = graph.net
    if size is None:
        size = net.config.get("input_size")
    if isinstance(size, bool) or not isinstance(size, int) or size < 8 or size % 8:
        raise ValueError(f"size must be a positive multiple of 8, got {size!r}")
    require_exporter()  # before the opset check, which imports onnx: say which extra is missing
    opset = _check_opset(opset)
    import onnx

    try:
        device = next(net.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    # Batch 2, not 1: torch.export specialises a dimension of size 0 or 1 to a constant.
    example = torch.full((2, 1, size, size), 50.0, dtype=torch.float32, device=device)
    was_training = net.training
    graph.eval()
    try:
        # no_grad: the frozen backbone's own no_grad then changes nothing, and is not captured as
        # a grad-mode region in the exported program.
        with torch.no_grad():
            program = torch.onnx.export(
                graph, (example,), None, dynamo=True, input_names=["L"], output_names=["ab"],
                dynamic_shapes={"L": {0: torch.export.Dim("batch")}}, opset_version=opset,
                external_data=False, verbose=False)
    finally:
        net.train(was_training)
    proto = program.model_proto
    written = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if written != opset:
        raise ValueError(f"opset {opset}: the exporter could not convert this model to it (it wrote opset "
                         f"{written}); use an opset from {DEFAULT_OPSET} to {max_opset()}")
    stride = 4 if graph.arch == "zhang" else 1
    onnx.helper.set_model_props(proto, {
        "fastcolor_version": __version__, "arch": graph.arch, "input_size": str(size),
        "output_stride": str(stride), "temperature": repr(graph.T) if graph.arch == "zhang" else "",
        "model_config": json.dumps(net.config, sort_keys=True, default=str)})
    proto.doc_string = (f"fastcolor {__version__} {graph.arch} colorizer: L float32 (N, 1, {size}, {size}) in 0..100 "
                        f"-> ab float32 (N, 2, {size // stride}, {size // stride}) in Lab units"
                        + (f", annealed mean at T = {graph.T:g}" if graph.arch == "zhang" else ""))
    return atomic_write_bytes(path, proto.SerializeToString())
