"""The training loop: Adam on mini-batches, validation every epoch, early stopping on AUC.

Linear, top to bottom: loss, predict/evaluate, fit.
"""

from __future__ import annotations

import copy
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from ..config import TrainConfig
from ..data.dataset import CTRDataset, Split, iterate_batches
from ..errors import UserError
from ..models.base import CTRModel
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .distributed import DistContext, gather_concat, rng_states
from .embedding_update import LazyAdam
from .memory import keep_freed_memory
from .metrics import auc, logloss


def loss_fn(
    model: CTRModel, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig, forward: Optional[torch.nn.Module] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Objective (Eq. 18-19): mean log loss + L2. Returns (total, log loss alone).

    The L2 term has two coefficients: `l2_embedding` on the embedding rows this batch
    looks up (Σ over fields of ||e_i||², averaged over the batch: only touched rows, as
    sparse CTR training does), and `l2_dense` on every dense weight matrix.
    `forward` is the module to call (the DistributedDataParallel wrapper in multi-process runs).
    """
    logits = (forward if forward is not None else model)(x)
    bce = F.binary_cross_entropy_with_logits(logits, y)  # -(y log σ + (1-y) log(1-σ)), mean
    total = bce
    if cfg.l2_embedding > 0:
        emb_sq = sum(table(x).pow(2).sum() for table in model.embeddings())
        total = total + cfg.l2_embedding * emb_sq / x.shape[0]
    if cfg.l2_dense > 0:
        total = total + cfg.l2_dense * sum(w.pow(2).sum() for w in model.dense_weights())
    return total, bce


@torch.no_grad()
def predict(model: CTRModel, split: Split, batch_size: int = 8192, ctx: DistContext = DistContext()) -> np.ndarray:
    """Click probabilities for every row of `split`, in order. [n] float64.

    In a multi-process run each rank scores its own shard and the shards are gathered."""
    was_training = model.training
    model.eval()
    lo, hi = ctx.shard(len(split))
    dev = next(model.parameters()).device
    out = [
        torch.sigmoid(model(x.to(dev, non_blocking=True))).double().cpu().numpy()
        for x, _ in iterate_batches(split, batch_size, start=lo, stop=hi)
    ]
    model.train(was_training)
    return gather_concat(np.concatenate(out) if out else np.zeros(0), ctx)


def evaluate(model: CTRModel, split: Split, batch_size: int = 8192, ctx: DistContext = DistContext()) -> dict[str, float]:
    probs = predict(model, split, batch_size, ctx)
    labels = np.asarray(split.y)
    return {"auc": auc(labels, probs), "logloss": logloss(labels, probs)}


class Optimizer:
    """Adam for the dense parameters, plus, with `sparse_embeddings`, lazy Adam for the tables.

    Lazy Adam (SparseAdam's update, run by embedding_update.LazyAdam in fewer passes): only
    the rows a batch looked up have their moments and values updated, so a step costs
    O(rows touched) instead of O(vocabulary). Rows not in the batch keep their moments
    unchanged (dense Adam would decay them); this is the usual choice for CTR embeddings
    (TensorFlow's LazyAdam, TorchRec's fused row-wise optimizers).
    Adam runs fused (one pass over each tensor instead of one per arithmetic op: same update,
    about 6x less optimizer time on CPU, docs/performance.md).
    `embedding_update` names what updates the tables (recorded in metrics.json).
    """

    def __init__(self, model: CTRModel, cfg: TrainConfig, sparse: Optional[bool] = None):
        sparse = cfg.sparse_embeddings if sparse is None else sparse
        tables = model.embeddings()
        for table in tables:
            table.sparse = sparse
        if sparse:
            table_ids = {id(t.weight) for t in tables}
            dense = [p for p in model.parameters() if id(p) not in table_ids]
            self.optimizers = [LazyAdam([t.weight for t in tables], lr=cfg.lr)]
            if dense:
                self.optimizers.append(torch.optim.Adam(dense, lr=cfg.lr, fused=True))
        else:
            self.optimizers = [torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=True)]
        self.embedding_update = embedding_update(sparse)

    def zero_grad(self) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()


def embedding_update(sparse: bool) -> str:
    """What updates the embedding tables: row-wise lazy Adam with sparse gradients, else dense Adam."""
    return "lazy-adam-row-wise" if sparse else "adam-dense"


@dataclass
class FitResult:
    best_epoch: int
    best_valid: dict[str, float]
    history: list[dict] = field(default_factory=list)
    train_seconds: float = 0.0
    samples_seen: int = 0

    @property
    def samples_per_second(self) -> float:
        return self.samples_seen / self.train_seconds if self.train_seconds > 0 else 0.0


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))


class TrainingDiverged(UserError):
    """The loss or a gradient became NaN or infinite. `where`: the step and the last good
    checkpoint; train_run replaces the generic advice by a command for its run folder."""

    def __init__(self, where: str, advice: str = "lower train.lr, or set train.on_nan=skip-batch to skip such batches"):
        super().__init__(f"{where}; {advice}")
        self.where = where


def _finite_step(loss: torch.Tensor, model: CTRModel) -> bool:
    if not torch.isfinite(loss):
        return False
    grads = [p.grad for p in model.dense_weights() if p.grad is not None]
    # one multi-tensor kernel for all the norms (a NaN or inf anywhere makes its norm non-finite)
    return not grads or bool(torch.isfinite(torch.stack(torch._foreach_norm(grads))).all())


@dataclass
class StepResult:
    loss: torch.Tensor  # the objective (log loss + L2) of the batch
    bce: torch.Tensor  # its log loss alone
    applied: bool  # False: the loss or a gradient was not finite and the update was skipped


def train_step(
    model: CTRModel, optimizer: Optimizer, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig,
    forward: Optional[torch.nn.Module] = None,
) -> StepResult:
    """One optimizer step on the batch (x, y): forward (bf16 autocast with `cfg.precision`),
    loss, backward, and the update, unless the loss or a gradient is not finite.
    The one step `fit` and `masknet bench` both run."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
        loss, bce = loss_fn(model, x, y, cfg, forward)
    optimizer.zero_grad()
    loss.backward()
    applied = _finite_step(loss, model)
    if applied:
        optimizer.step()
    return StepResult(loss, bce, applied)


def _summed_over_ranks(st: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The epoch's running loss sum and row count over all ranks (collective)."""
    totals = torch.tensor([st["epoch_loss_sum"], float(st["epoch_seen"])], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(totals)
    return {"epoch_loss_sum": totals[0].item(), "epoch_seen": int(totals[1].item())}


def fit(
    model: CTRModel,
    data: CTRDataset,
    cfg: TrainConfig,
    on_epoch: Optional[Callable[[dict], None]] = None,
    run_dir: Optional[Path] = None,
    resume_from: Optional[Path] = None,
    ctx: DistContext = DistContext(),
    checkpoint_meta: Optional[dict[str, Any]] = None,
) -> FitResult:
    """Train on data.splits['train'], early-stop on validation AUC, restore the best epoch.

    With `run_dir`, checkpoints are written at every epoch end (`cfg.checkpoints`) and every
    `cfg.checkpoint_every_steps` steps; `resume_from` (a checkpoint folder) continues a run
    exactly where it stopped: same batches, same RNG, same optimizer moments.
    In a multi-process run (`ctx`), each rank trains on its slice of every global batch
    through DistributedDataParallel, and only rank 0 writes checkpoints. `checkpoint_meta` is
    stored in every checkpoint's manifest (train_run: the run's config and fingerprint).
    """
    train, valid = data.splits["train"], data.splits["valid"]
    if len(train) == 0:
        raise UserError("the train split is empty")
    if len(valid) == 0:
        raise UserError("the valid split is empty: early stopping needs validation rows")
    if np.unique(np.asarray(valid.y)).size < 2:
        raise UserError("the valid split has only one class: validation AUC is undefined")
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    keep_freed_memory()  # every step allocates the same tensors again: no page faults for them
    device = torch.device(ctx.device)
    model.to(device)
    # NCCL cannot all-reduce sparse gradients: multi-GPU runs update the tables densely
    optimizer = Optimizer(model, cfg, sparse=cfg.sparse_embeddings and ctx.sparse_allreduce)  # before DDP
    if ctx.enabled:
        forward = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    else:
        forward = model
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    # progress: everything needed to continue exactly (saved in every checkpoint)
    st: dict[str, Any] = {
        "epoch": 1, "step": 0, "global_step": 0, "best_epoch": 0, "best_valid": {"auc": -math.inf},
        "bad_epochs": 0, "history": [], "train_seconds": 0.0, "samples_seen": 0,
        "epoch_loss_sum": 0.0, "epoch_seen": 0, "epoch_seconds": 0.0, "skipped_batches": 0, "done": False,
    }
    best_state = copy.deepcopy(model.state_dict())
    if resume_from is not None:
        st, best_state = load_checkpoint(resume_from, model, optimizer.optimizers, ctx)
        if not ctx.is_main:  # the saved running loss is the sum over all ranks: count it once
            st.update(epoch_loss_sum=0.0, epoch_seen=0)
    writing = run_dir is not None and ctx.is_main

    def checkpoint() -> Optional[Path]:
        if run_dir is not None and (cfg.checkpoints or cfg.checkpoint_every_steps):
            rng = rng_states(ctx)  # collective: every rank takes part, rank 0 writes
            saved = st
            if ctx.enabled:  # mid-epoch: the running loss over all ranks (rank 0 restores it)
                saved = dict(st, **_summed_over_ranks(st, device))
            if writing:
                return save_checkpoint(
                    run_dir, model, optimizer.optimizers, best_state, saved, cfg.keep_checkpoints, rng, checkpoint_meta
                )
        return None

    while not st["done"] and st["epoch"] <= cfg.epochs:
        epoch = st["epoch"]
        model.train()
        t0 = time.perf_counter() - st["epoch_seconds"]
        bar = tqdm(
            total=steps_per_epoch, initial=st["step"], desc=f"epoch {epoch}/{cfg.epochs}", unit="batch",
            disable=not (cfg.progress and ctx.is_main), file=sys.stderr, leave=False, mininterval=0.5,
        )
        batches = iterate_batches(train, cfg.batch_size, (cfg.seed, epoch), cfg.shuffle_block_rows, skip_batches=st["step"])
        for x, y in batches:
            if ctx.enabled:  # this rank's disjoint slice of the global batch
                lo, hi = ctx.shard(len(y))
                x, y = x[lo:hi], y[lo:hi]
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            result = train_step(model, optimizer, x, y, cfg, forward)
            loss, bce = result.loss, result.bce
            st["step"] += 1
            st["global_step"] += 1
            if result.applied:
                st["epoch_loss_sum"] += bce.item() * len(y)
                st["epoch_seen"] += len(y)
            elif cfg.on_nan == "skip-batch":
                st["skipped_batches"] += 1
            else:
                last = latest_checkpoint(run_dir) if writing else None
                where = f"; the last good checkpoint is {last}" if last else ""
                raise TrainingDiverged(
                    f"non-finite loss or gradient at epoch {epoch}, step {st['step']} (global step "
                    f"{st['global_step']}, loss {loss.item()}){where}"
                )
            bar.update(1)
            if st["step"] % 20 == 0:
                seen = max(st["epoch_seen"], 1)
                bar.set_postfix(loss=f"{st['epoch_loss_sum'] / seen:.4f}", samples_s=f"{seen / (time.perf_counter() - t0):,.0f}")
            if cfg.checkpoint_every_steps and st["global_step"] % cfg.checkpoint_every_steps == 0 and st["step"] < steps_per_epoch:
                st["epoch_seconds"] = time.perf_counter() - t0
                checkpoint()
        bar.close()
        epoch_seconds = time.perf_counter() - t0
        st["train_seconds"] += epoch_seconds
        if ctx.enabled:  # the epoch's loss over all ranks' rows
            st.update(_summed_over_ranks(st, device))
        st["samples_seen"] += st["epoch_seen"]
        valid_metrics = evaluate(model, valid, cfg.eval_batch_size, ctx)
        record = {
            "epoch": epoch,
            "train_logloss": st["epoch_loss_sum"] / max(st["epoch_seen"], 1),
            "valid_auc": valid_metrics["auc"],
            "valid_logloss": valid_metrics["logloss"],
            "epoch_seconds": epoch_seconds,
            "samples_per_second": st["epoch_seen"] / epoch_seconds,
        }
        if st["skipped_batches"]:
            record["skipped_batches"] = st["skipped_batches"]
        improved = valid_metrics["auc"] > st["best_valid"]["auc"]
        if improved:
            st["best_epoch"], st["best_valid"] = epoch, valid_metrics
            best_state = copy.deepcopy(model.state_dict())
            st["bad_epochs"] = 0
        else:
            st["bad_epochs"] += 1
        record["best_epoch"] = st["best_epoch"]
        st["history"].append(record)
        if on_epoch is not None:
            on_epoch(record)
        # patience epochs without a better validation AUC, or the last epoch: done
        st["done"] = st["bad_epochs"] >= cfg.patience or epoch == cfg.epochs
        st.update(epoch=epoch + 1, step=0, epoch_loss_sum=0.0, epoch_seen=0, epoch_seconds=0.0, skipped_batches=0)
        checkpoint()
    model.load_state_dict(best_state)
    return FitResult(
        best_epoch=st["best_epoch"], best_valid=st["best_valid"], history=st["history"],
        train_seconds=st["train_seconds"], samples_seen=st["samples_seen"],
    )
