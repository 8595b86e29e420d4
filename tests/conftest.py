import os

import pytest
import torch

from fastcolor import backends

#: (backend, device) pairs that the generic backend tests cover.
KERNEL_TARGETS = [
    ("torch", "cpu"),
    ("numba", "cpu"),
    ("cpp", "cpu"),
    ("torch", "cuda"),
    ("triton", "cuda"),
    ("cuda", "cuda"),
]


def require_backend(name: str, device: str) -> None:
    """Skip only for a missing GPU (or an extension deliberately not built); otherwise an
    unavailable backend is a failure, never a silent skip."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device on this machine")
    if name in ("cpp", "cuda") and os.environ.get("FASTCOLOR_NO_EXT"):
        pytest.skip("FASTCOLOR_NO_EXT is set: the compiled extension was not built")
    reason = backends.unavailable_reason(name, device)
    if reason is not None:
        pytest.fail(f"backend {name!r} should run on {device} here but: {reason}")


@pytest.fixture(params=KERNEL_TARGETS, ids=[f"{b}-{d}" for b, d in KERNEL_TARGETS])
def target(request):
    name, device = request.param
    require_backend(name, device)
    return name, device
