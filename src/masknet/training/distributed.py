"""Multi-process data-parallel training on torch.distributed (launched by torchrun).

Design (docs/distributed.md):
- One process per rank; torchrun sets RANK / WORLD_SIZE / MASTER_ADDR. Backend gloo (CPU).
- Every global batch of `batch_size` rows is the same as in a single-process run (same
  seed-derived block shuffle); rank r takes the disjoint slice [r*b/W, (r+1)*b/W) of it.
  DistributedDataParallel averages gradients over ranks, so with equal slices the update
  equals the single-process update on the whole batch (up to float summation order).
- Embedding gradients stay sparse: DDP all-reduces sparse tensors on gloo (indices and
  values are exchanged; nothing of the size of the vocabulary crosses the wire).
- Validation: each rank scores a disjoint shard of the valid split; the probabilities are
  gathered so every rank computes the same AUC over the whole split (same early stopping).
- Only rank 0 writes the run folder, checkpoints and the bundle.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, n: int) -> tuple[int, int]:
        """This rank's disjoint slice [lo, hi) of n items (sizes differ by at most one)."""
        return self.rank * n // self.world_size, (self.rank + 1) * n // self.world_size


def init_from_env() -> DistContext:
    """Join the process group torchrun describes in the environment; a plain run is rank 0 of 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return DistContext(dist.get_rank(), dist.get_world_size())


def gather_concat(local: np.ndarray, ctx: DistContext) -> np.ndarray:
    """Concatenate every rank's 1-D float array in rank order (all ranks get the result)."""
    if not ctx.enabled:
        return local
    sizes = [torch.zeros(1, dtype=torch.long) for _ in range(ctx.world_size)]
    dist.all_gather(sizes, torch.tensor([len(local)]))
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros(longest, dtype=torch.float64)
    padded[: len(local)] = torch.from_numpy(np.asarray(local, dtype=np.float64))
    parts = [torch.zeros(longest, dtype=torch.float64) for _ in range(ctx.world_size)]
    dist.all_gather(parts, padded)
    return np.concatenate([p[: int(s.item())].numpy() for p, s in zip(parts, sizes)])


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()
