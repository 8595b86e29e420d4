"""Optional dependencies: :class:`MissingExtraError`, raised when one is not installed.

A module of its own (importing nothing of fastcolor) so that any layer can raise it: the
data shards (webdataset), export (onnx), the monitor (tensorboard).
"""
from __future__ import annotations

__all__ = ["MissingExtraError"]


class MissingExtraError(ImportError):
    """An optional dependency of fastcolor is not installed; the message names the extra to install."""
