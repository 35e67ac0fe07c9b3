"""torch.distributed set-up for runs under ``torchrun`` (NCCL on CUDA, gloo on CPU)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from logitcache.pipeline.errors import ConfigError


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_reduce_sum(self, value: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value


def resolve_device(preference: str, local_rank: int = 0) -> torch.device:
    """``auto``: this rank's CUDA GPU when there is one, else the CPU; ``cpu``; ``cuda`` or ``cuda:N``."""
    if preference == "cpu":
        return torch.device("cpu")
    if preference not in ("auto", "cuda") and not preference.startswith("cuda:"):
        raise ConfigError(f"Expected device auto, cpu, cuda or cuda:N. Got {preference!r}.")
    if preference != "auto" and not torch.cuda.is_available():
        raise ConfigError(f"Expected a CUDA GPU for device {preference!r}. Found none; use auto or cpu.")
    if preference.startswith("cuda:"):
        return torch.device(preference)
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def launched_rank() -> int:
    """This process's rank as torchrun set it (0 when run alone): for output before or after the group."""
    return int(os.environ.get("RANK", "0"))


def init_distributed(device_preference: str) -> DistContext:
    """Join the process group that torchrun describes in the environment (or run alone)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = launched_rank()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_preference, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistContext(rank=rank, world_size=world_size, device=device)


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
