"""Distributed training under torchrun: which rank this process is, and its device.

The environment variables torchrun sets decide (``WORLD_SIZE``, ``LOCAL_RANK``); nccl on GPU,
gloo on CPU. One process alone is a world of one, and every collective is then a no-op.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["Dist", "setup_distributed", "resolve_device"]
@dataclass
class Dist:
    """This process's place in the run: ``rank`` of ``world`` processes, ``local_rank`` on its
    machine; ``owns_group``: this process made the process group (and destroys it at the end)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def setup_distributed(device: str) -> Dist:
    """Join (or make) the process group torchrun's environment describes; a world of one without it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    owns = False
    if not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and not device.startswith("cpu")
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if use_cuda else "gloo")
        owns = True
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank, owns)


def resolve_device(pref: str, d: Dist) -> torch.device:
    """The device of this rank: ``"auto"`` is its local GPU (else the CPU); ``"cuda"`` its local GPU."""
    if pref == "auto":
        return torch.device(f"cuda:{d.local_rank}" if torch.cuda.is_available() else "cpu")
    dev = torch.device(pref)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device(f"cuda:{d.local_rank}")
    return dev
