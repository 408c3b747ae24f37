"""One code path for one process and for ``torchrun`` (DDP)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistContext"]


@dataclass
class DistContext:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_env(cls, device: str | None = None) -> DistContext:
        """Read torchrun's RANK/LOCAL_RANK/WORLD_SIZE; start the process group when > 1."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        wanted = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if wanted not in ("cpu", "cuda") and not wanted.startswith("cuda:"):
            raise ValueError(f"Device must be 'cpu' or 'cuda', got {wanted!r}.")
        if wanted.startswith("cuda"):
            if not torch.cuda.is_available():
                raise ValueError("Device 'cuda' requested but CUDA is not available.")
            resolved = torch.device("cuda", local_rank if world_size > 1 else torch.device(wanted).index or 0)
            torch.cuda.set_device(resolved)
        else:
            resolved = torch.device("cpu")
        if world_size > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if resolved.type == "cuda" else "gloo")
        return cls(rank, local_rank, world_size, resolved)

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is True on some rank (early stop together)."""
        value = torch.tensor([1.0 if flag else 0.0], device=self.device)
        return bool(self.all_reduce_sum(value).item() > 0)

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()
