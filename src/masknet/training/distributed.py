"""Multi-process data-parallel training on torch.distributed (launched by torchrun).

Design (docs/distributed.md):
- One process per rank; torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR. Backend
  gloo on CPU; NCCL when the run trains on CUDA (each rank on cuda:LOCAL_RANK).
- Every global batch of `batch_size` rows is the same as in a single-process run (same
  seed-derived block shuffle); rank r takes the disjoint slice [r*b/W, (r+1)*b/W) of it.
  DistributedDataParallel averages gradients over ranks, so with equal slices the update
  equals the single-process update on the whole batch (up to float summation order).
- Embedding gradients stay sparse: DDP all-reduces sparse tensors on gloo (indices and
  values are exchanged; nothing of the size of the vocabulary crosses the wire). NCCL has no
  sparse all-reduce, so on CUDA the tables get dense gradients and dense Adam (the cost is an
  all-reduce of every table per step; docs/distributed.md has the numbers and the TorchRec plan).
- Validation: each rank scores a disjoint shard of the valid split; the probabilities are
  gathered so every rank computes the same AUC over the whole split (same early stopping).
- Only rank 0 writes the run folder, checkpoints and the bundle.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from ..errors import UserError


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    device: str = "cpu"  # where this rank trains: "cpu" or "cuda:<local rank>"
    backend: str = "gloo"  # process-group backend when world_size > 1

    @property
    def sparse_allreduce(self) -> bool:
        """Whether DDP can all-reduce sparse embedding gradients (gloo can, NCCL cannot)."""
        return not self.enabled or self.backend == "gloo"

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, n: int) -> tuple[int, int]:
        """This rank's disjoint slice [lo, hi) of n items (sizes differ by at most one)."""
        return self.rank * n // self.world_size, (self.rank + 1) * n // self.world_size


def resolve_device(requested: str, local_rank: int = 0) -> str:
    """`train.device` -> a torch device string: auto = CUDA when present, else CPU."""
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return "cpu"
    if not torch.cuda.is_available():
        raise UserError("train.device=cuda, but PyTorch sees no CUDA device (this torch build: "
                        f"{torch.__version__}); use train.device=cpu or auto")
    if local_rank >= torch.cuda.device_count():
        raise UserError(f"rank with LOCAL_RANK={local_rank} has no GPU: only {torch.cuda.device_count()} visible")
    return f"cuda:{local_rank}"


def init_from_env(device: str = "cpu") -> DistContext:
    """Join the process group torchrun describes in the environment; a plain run is rank 0 of 1.
    `device` is `train.device` (auto, cpu or cuda): CUDA ranks use NCCL, CPU ranks gloo."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0")) if world > 1 else 0
    where = resolve_device(device, local_rank)
    if where.startswith("cuda"):
        torch.cuda.set_device(torch.device(where))
    if world <= 1:
        return DistContext(device=where)
    backend = "nccl" if where.startswith("cuda") else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)
        # a process that exits with the group alive can abort in teardown ("terminate called without an
        # active exception", seen once in CI on a rank that had finished): leave it before exit
        atexit.register(_leave_process_group)
    return DistContext(dist.get_rank(), dist.get_world_size(), where, backend)


def _leave_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def gather_concat(local: np.ndarray, ctx: DistContext) -> np.ndarray:
    """Concatenate every rank's 1-D float array in rank order (all ranks get the result)."""
    if not ctx.enabled:
        return local
    dev = ctx.device  # NCCL gathers device tensors only
    sizes = [torch.zeros(1, dtype=torch.long, device=dev) for _ in range(ctx.world_size)]
    dist.all_gather(sizes, torch.tensor([len(local)], device=dev))
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros(longest, dtype=torch.float64, device=dev)
    padded[: len(local)] = torch.from_numpy(np.asarray(local, dtype=np.float64)).to(dev)
    parts = [torch.zeros(longest, dtype=torch.float64, device=dev) for _ in range(ctx.world_size)]
    dist.all_gather(parts, padded)
    return np.concatenate([p[: int(s.item())].cpu().numpy() for p, s in zip(parts, sizes)])


def rng_states(ctx: DistContext) -> dict[str, torch.Tensor]:
    """Every rank's RNG states (collective: all ranks call it), keyed `rng.torch.rank<r>` and,
    on CUDA, `rng.cuda.rank<r>`: a checkpoint written by rank 0 can restore each rank's own
    dropout stream, so a resumed multi-process run continues exactly."""
    local = {"torch": torch.get_rng_state()}
    if ctx.device.startswith("cuda"):
        local["cuda"] = torch.cuda.get_rng_state(torch.device(ctx.device))
    if not ctx.enabled:
        return {f"rng.{k}.rank0": v for k, v in local.items()}
    out = {}
    for kind, state in local.items():
        dev = ctx.device if ctx.backend == "nccl" else "cpu"
        parts = [torch.empty_like(state, device=dev) for _ in range(ctx.world_size)]
        dist.all_gather(parts, state.to(dev))
        out.update({f"rng.{kind}.rank{r}": p.cpu() for r, p in enumerate(parts)})
    return out


def set_rng_states(states: dict[str, torch.Tensor], ctx: DistContext) -> None:
    """Restore this rank's states from `rng_states` output (older checkpoints: `rng.torch`)."""
    torch_state = states.get(f"rng.torch.rank{ctx.rank}", states.get("rng.torch"))
    if torch_state is not None:
        torch.set_rng_state(torch_state)
    cuda_state = states.get(f"rng.cuda.rank{ctx.rank}")
    if cuda_state is not None and ctx.device.startswith("cuda"):
        torch.cuda.set_rng_state(cuda_state, torch.device(ctx.device))


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()
