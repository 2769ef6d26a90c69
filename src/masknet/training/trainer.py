"""The training loop: Adam on mini-batches, validation on a step schedule, early stopping on AUC.

Top to bottom: the objective (`loss_fn`), scoring (`predict`, `evaluate`), the optimizer, one
training step (`train_step`), the schedule (when to validate, when to stop, the learning rate),
the run's state (`TrainState`, everything a checkpoint holds), and `fit`, which strings them together.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from ..config import ModelConfig, TrainConfig
from ..data.batch import Batch
from ..data.dataset import CTRDataset, Split, iterate_batches
from ..errors import UserError
from ..models.base import CTRModel
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .distributed import DistContext, gather_concat, rng_states
from .embedding_update import LazyAdam
from .factor_phase import FactorPhase
from .memory import keep_freed_memory
from .metrics import auc, logloss
from .tasks import (
    check_tasks, downsample_negatives, multitask_loss, optional_head_spec, selection_score, task_metrics, task_weights,
)


@dataclass
class L2Prior:
    """`train.l2_prior` = c: a Gaussian prior on every embedding row, in the mean-loss objective
    (c / N) · Σ_j ||e_j||² over all rows of every table, N = train rows. For LR that is
    scikit-learn's LogisticRegression penalty with C = 1 / (2c); its weight falls as the data
    grows. Applied lazily, to the rows a batch looks up: each lookup of row j carries c / n_j
    (n_j = the row's count in the train split), which is unbiased for the sum over all rows and
    costs O(rows looked up), so rare rows are shrunk hard and frequent ones hardly at all.
    Dense weights are left to `l2_dense`: a prior of the same strength on a deep network's
    ~10^5-10^6 weights outweighs the log loss on small data (docs/model.md).
    `c` is the current strength (a regularisation path changes it between stages); `c_factors`, when
    set, replaces it on the tables in `factor_ids` (FM's second phase, training.factor_phase)."""

    inverse_counts: torch.Tensor  # [Σ cardinalities] 1 / n_j (0 for rows absent from train)
    c: float = 0.0
    c_factors: Optional[float] = None
    factor_ids: frozenset[int] = frozenset()  # id() of the tables c_factors is for

    @classmethod
    def for_data(cls, train: Split, cardinalities: list[int], device: torch.device, chunk_rows: int = 1 << 20) -> "L2Prior":
        offsets = np.concatenate([[0], np.cumsum(cardinalities)[:-1]]).astype(np.int64)
        counts = np.zeros(int(sum(cardinalities)), dtype=np.int64)
        for lo in range(0, len(train), chunk_rows):  # memory-mapped splits: one chunk in memory at a time
            rows = np.asarray(train.x[lo : lo + chunk_rows]).astype(np.int64) + offsets
            counts += np.bincount(rows.ravel(), minlength=len(counts))
        inverse = np.divide(1.0, counts, out=np.zeros(len(counts)), where=counts > 0)
        return cls(torch.tensor(inverse, dtype=torch.float32, device=device))

    def penalty(self, model: CTRModel, x: Batch | torch.Tensor) -> torch.Tensor:
        # the single-valued fields' rows (a multi-valued field's rows are not counted: no prior on them)
        ids = x.x if isinstance(x, Batch) else x  # [B, f_s]
        tables = model.embeddings()  # every table has the fields' layout (one row per category)
        rows = ids + tables[0].offsets
        per_lookup = self.inverse_counts[rows].unsqueeze(-1)  # [B, f_s, 1]
        strengths = [(self.c_factors if id(t) in self.factor_ids and self.c_factors is not None else self.c, t) for t in tables]
        total = sum(
            c * (per_lookup * F.embedding(rows, t.weight, sparse=t.sparse).pow(2)).sum() for c, t in strengths if c > 0
        )
        return total / ids.shape[0]


def with_model_defaults(cfg: TrainConfig, model: type[CTRModel], model_cfg: Optional[ModelConfig] = None) -> TrainConfig:
    """`cfg` with every setting it leaves to the model (None) set to the model's `train_defaults`
    (for a model built from `model_cfg`: a MaskNet with a first-order term takes LR's as well)."""
    defaults = model.train_defaults_for(model_cfg)
    filled = {k: copy.deepcopy(v) for k, v in defaults.items() if getattr(cfg, k) is None}
    return dataclasses.replace(cfg, **filled) if filled else cfg


def loss_fn(
    model: CTRModel, x: Batch | torch.Tensor, y: torch.Tensor, cfg: TrainConfig, forward: Optional[torch.nn.Module] = None,
    prior: Optional[L2Prior] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Objective (Eq. 18-19): mean log loss + L2. Returns (total, log loss alone).

    The L2 term has up to three coefficients: `l2_embedding` on the embedding rows this batch
    looks up (Σ over fields of ||e_i||², averaged over the batch: only touched rows, as
    sparse CTR training does; a multi-valued field's e_i is its pooled embedding), `l2_dense` on
    every dense weight matrix, and the data-size-scaled `prior` (`train.l2_prior`, see L2Prior).
    `forward` is the module to call (the DistributedDataParallel wrapper in multi-process runs).
    Multi-task labels y [B, T] (training.tasks): the log loss is Σ_t w_t · task t's mean over its
    labelled rows, with w = `cfg.task_weights`.
    """
    logits = (forward if forward is not None else model)(x)
    if logits.ndim == 2 and y.ndim == 1:  # a multi-task model of one task on single-label data
        y = y.unsqueeze(1)
    if y.ndim == 2:
        weights = torch.tensor(task_weights(cfg, y.shape[1]), device=y.device)
        bce = multitask_loss(logits, y, weights)[0]
    else:
        bce = F.binary_cross_entropy_with_logits(logits, y)  # -(y log σ + (1-y) log(1-σ)), mean
    total = bce
    if cfg.l2_embedding > 0:
        emb_sq = sum(table(x).pow(2).sum() for table in model.embeddings())
        total = total + cfg.l2_embedding * emb_sq / len(x)
    if cfg.l2_dense > 0:
        total = total + cfg.l2_dense * sum(w.pow(2).sum() for w in model.dense_weights())
    if prior is not None:
        total = total + prior.penalty(model, x)
    return total, bce


@torch.no_grad()
def predict(
    model: CTRModel, split: Split, batch_size: int = 8192, ctx: DistContext = DistContext(), head: Optional[Any] = None,
    uncalibrated: bool = False,
) -> np.ndarray:
    """Click probabilities for every row of `split`, in order. [n] float64 ([n, T] for a multi-task
    model). `head` (models.scoring.ScoreHead) turns logits into scores (its uncalibrated ones with
    `uncalibrated`); without it a score is the logit's sigmoid.

    In a multi-process run each rank scores its own shard and the shards are gathered."""
    was_training = model.training
    model.eval()
    lo, hi = ctx.shard(len(split))
    dev = next(model.parameters()).device

    def scores(logits: torch.Tensor) -> torch.Tensor:
        if head is None:
            return torch.sigmoid(logits)
        return head.uncalibrated(logits) if uncalibrated else head(logits)[0]

    out = [
        scores(model(x.to(dev, non_blocking=True))).double().cpu().numpy()
        for x, _ in iterate_batches(split, batch_size, start=lo, stop=hi)
    ]
    model.train(was_training)
    local = np.concatenate(out) if out else np.zeros(0)
    if local.ndim == 2:  # gathered one task at a time (gather_concat takes 1-D arrays)
        return np.stack([gather_concat(local[:, t], ctx) for t in range(local.shape[1])], axis=1)
    return gather_concat(local, ctx)


def evaluate(
    model: CTRModel, split: Split, batch_size: int = 8192, ctx: DistContext = DistContext(), head: Optional[Any] = None,
    tasks: Optional[list[str]] = None,
) -> dict[str, Any]:
    """{"auc", "logloss"} of the first task; with several tasks also "tasks": {name: {...}}."""
    probs = predict(model, split, batch_size, ctx, head)
    if probs.ndim == 1 and split.labels is None:
        labels = np.asarray(split.y)
        return {"auc": auc(labels, probs), "logloss": logloss(labels, probs)}
    probs = probs.reshape(len(probs), -1)  # [n, T]
    names = tasks or [f"task{t}" for t in range(probs.shape[1])]
    per_task = task_metrics(split.label_matrix(), probs, names)
    first = next(iter(per_task.values()))
    return {"auc": first["auc"], "logloss": first["logloss"], "tasks": per_task}


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
        cfg = with_model_defaults(cfg, type(model), model.cfg)
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
        self.lr = cfg.lr

    def set_lr(self, lr: float) -> None:
        self.lr = lr  # the rate of the last step (history records it)
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["lr"] = lr

    def zero_grad(self) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()


def finite_step(loss: torch.Tensor, model: CTRModel) -> bool:
    """Whether the loss and every dense gradient are finite (an update with them is safe)."""
    if not torch.isfinite(loss):
        return False
    grads = [p.grad for p in model.dense_weights() if p.grad is not None]
    # one multi-tensor kernel for all the norms (a NaN or inf anywhere makes its norm non-finite)
    return not grads or bool(torch.isfinite(torch.stack(torch._foreach_norm(grads))).all())


def embedding_update(sparse: bool) -> str:
    """What updates the embedding tables: row-wise lazy Adam with sparse gradients, else dense Adam."""
    return "lazy-adam-row-wise" if sparse else "adam-dense"


@dataclass
class StepResult:
    loss: torch.Tensor  # the objective (log loss + L2) of the batch
    bce: torch.Tensor  # its log loss alone
    applied: bool  # False: the loss or a gradient was not finite and the update was skipped


def train_step(
    model: CTRModel, optimizer: Optimizer, x: Batch | torch.Tensor, y: torch.Tensor, cfg: TrainConfig,
    forward: Optional[torch.nn.Module] = None, prior: Optional[L2Prior] = None,
) -> StepResult:
    """One optimizer step on the batch (x, y): forward (bf16 autocast with `cfg.precision`),
    loss, backward, and the update, unless the loss or a gradient is not finite.
    The one step `fit` and `masknet bench` both run."""
    device_type = y.device.type
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
        loss, bce = loss_fn(model, x, y, cfg, forward, prior)
    optimizer.zero_grad()
    loss.backward()
    applied = finite_step(loss, model)
    if applied:
        optimizer.step()
    return StepResult(loss, bce, applied)


# ---------------------------------------------------------------------------
# The schedule: when to validate, when to stop, which learning rate


@dataclass(frozen=True)
class Schedule:
    """Validation on a step schedule (docs/model.md, "Training defaults"): every `eval_every`
    optimizer steps and at the run's last step. With evals_per_epoch = 1 and eval_min_steps = 1
    that is every epoch end."""

    batch_size: int  # train.batch_size, halved until an epoch has min_batches_per_epoch steps
    steps_per_epoch: int
    eval_every: int
    max_epochs: int
    last_step: int  # the epoch cap (raised to reach min_steps) or max_steps, whichever comes first
    budget_steps: int = 0  # the epoch cap in steps, before max_steps (each of FM's phases gets it)

    @classmethod
    def for_run(cls, cfg: TrainConfig, train_rows: int) -> "Schedule":
        batch, min_batches = cfg.batch_size, cfg.min_batches_per_epoch or 0
        while batch > MIN_AUTO_BATCH and math.ceil(train_rows / batch) < min_batches:
            batch //= 2
        per_epoch = math.ceil(train_rows / batch)
        eval_every = max(cfg.eval_min_steps, math.ceil(per_epoch / cfg.evals_per_epoch))
        max_epochs = max(cfg.epochs, math.ceil(cfg.min_steps / per_epoch))
        budget = last = max_epochs * per_epoch
        if cfg.max_steps:
            last = min(last, cfg.max_steps)
        return cls(batch, per_epoch, eval_every, max_epochs, last, budget)

    def evaluates_at(self, global_step: int, last_step: Optional[int] = None) -> bool:
        """Whether to validate after `global_step`: on the schedule, and at the last step (the
        run's, or `last_step`: the end of FM's current phase)."""
        return global_step % self.eval_every == 0 or global_step >= (self.last_step if last_step is None else last_step)


MIN_AUTO_BATCH = 64  # min_batches_per_epoch never halves the batch below this


def learning_rate(cfg: TrainConfig, global_step: int, plateau_scale: float, first_phase: bool = False) -> float:
    """The rate for the next step: linear warm-up over `lr_warmup_steps`, then `lr` (in the first
    phase of a two-phase fit, `first_phase_lr` where set), times the reductions on plateau so far."""
    warm = min(1.0, (global_step + 1) / cfg.lr_warmup_steps) if cfg.lr_warmup_steps else 1.0
    rate = cfg.first_phase_lr if first_phase and cfg.first_phase_lr is not None else cfg.lr
    return rate * warm * plateau_scale


def warmup_start(cfg: TrainConfig, state: "TrainState") -> int:
    """The global step the warm-up in force began at: 0, or phase 2's first (`second_phase_warmup`)."""
    return state.phase_start if cfg.second_phase_warmup and state.factor_stage >= 0 else 0


def phase_rate(cfg: TrainConfig, state: "TrainState", phases: FactorPhase) -> float:
    """learning_rate for the run's next step, in the phase it is in."""
    step = state.global_step - warmup_start(cfg, state)
    return learning_rate(cfg, step, state.plateau_scale, first_phase=phases.pending(state))


# ---------------------------------------------------------------------------
# The run's state


@dataclass
class TrainState:
    """Where a run stands: everything needed to continue it exactly (a checkpoint's state.json)."""

    epoch: int = 1  # the epoch in progress, from 1
    step: int = 0  # steps done in this epoch
    global_step: int = 0
    steps_per_epoch: int = 0  # the schedule's (0 in checkpoints written before it was recorded)
    best_epoch: int = 0
    best_step: int = 0
    best_valid: dict[str, float] = field(default_factory=lambda: {"auc": -math.inf})
    bad_evals: int = 0  # evaluations in a row without a better validation AUC
    plateau_scale: float = 1.0  # product of the learning-rate reductions on plateau
    prior_stage: int = 0  # which value of the l2_prior path is in force
    best_prior_stage: int = 0  # the prior_stage of the best evaluation
    factor_stage: int = -1  # which value of the factor_prior path is in force (-1: FM's phase 2 has not begun)
    phase_start: int = 0  # the global step FM's phase 2 began at
    history: list[dict] = field(default_factory=list)  # one record per evaluation
    train_seconds: float = 0.0
    samples_seen: int = 0
    # the window since the last evaluation: its log loss, rows, training time and skipped batches
    window_loss_sum: float = 0.0
    window_seen: int = 0
    window_seconds: float = 0.0
    skipped_batches: int = 0
    done: bool = False

    # names in checkpoints written before evaluations were on a step schedule (one per epoch)
    _OLD_NAMES = {"bad_epochs": "bad_evals", "epoch_loss_sum": "window_loss_sum", "epoch_seen": "window_seen",
                  "epoch_seconds": "window_seconds"}

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> "TrainState":
        names = {f.name for f in dataclasses.fields(cls)}
        renamed = {cls._OLD_NAMES.get(k, k): v for k, v in saved.items()}
        return cls(**{k: v for k, v in renamed.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def add_batch(self, bce: float, rows: int) -> None:
        self.window_loss_sum += bce * rows
        self.window_seen += rows

    def next_epoch(self) -> None:
        self.epoch += 1
        self.step = 0

    def completed_epochs(self) -> int:
        """Epochs trained to their end: a state at an epoch's last step has completed that epoch
        (the next one starts lazily). Without a recorded steps_per_epoch (older checkpoints) the
        epoch in progress counts as unfinished (one fewer at an epoch end: lenient, never more)."""
        at_end = self.steps_per_epoch > 0 and self.step >= self.steps_per_epoch
        return self.epoch if at_end else self.epoch - 1


def _summed_over_ranks(state: TrainState, device: torch.device) -> tuple[float, int]:
    """The window's running loss sum and row count over all ranks (collective)."""
    totals = torch.tensor([state.window_loss_sum, float(state.window_seen)], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(totals)
    return totals[0].item(), int(totals[1].item())


class TrainingDiverged(UserError):
    """The loss or a gradient became NaN or infinite. `where`: the step and the last good
    checkpoint; train_run replaces the generic advice by a command for its run folder."""

    def __init__(self, where: str, advice: str = "lower train.lr, or set train.on_nan=skip-batch to skip such batches"):
        super().__init__(f"{where}; {advice}")
        self.where = where


def _training_head(cfg: TrainConfig) -> Optional[Any]:
    """The down-sampling correction applied to validation scores (None: plain sigmoids)."""
    spec = optional_head_spec(cfg.negative_sampling_rate)
    if spec is None:
        return None
    from ..models.scoring import ScoreHead

    return ScoreHead(spec, 1)  # the correction has no per-task parameters


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))


@dataclass
class FitResult:
    best_epoch: int
    best_valid: dict[str, float]
    history: list[dict] = field(default_factory=list)
    train_seconds: float = 0.0
    samples_seen: int = 0
    best_step: int = 0
    steps: int = 0
    batch_size: int = 0  # the batch the run used (train.batch_size or less, see Schedule)

    @property
    def samples_per_second(self) -> float:
        return self.samples_seen / self.train_seconds if self.train_seconds > 0 else 0.0


# ---------------------------------------------------------------------------
# fit and its parts


def _check_splits(data: CTRDataset) -> tuple[Split, Split]:
    train, valid = data.splits["train"], data.splits["valid"]
    if len(train) == 0:
        raise UserError("the train split is empty")
    if len(valid) == 0:
        raise UserError("the valid split is empty: early stopping needs validation rows")
    if np.unique(np.asarray(valid.y)).size < 2:
        raise UserError("the valid split has only one class: validation AUC is undefined")
    return train, valid


def _epoch_batches(
    train: Split, cfg: TrainConfig, batch_size: int, state: TrainState, ctx: DistContext, device: torch.device
) -> Iterator[tuple[Batch, torch.Tensor]]:
    """The rest of this epoch's batches (a pure function of seed and epoch), this rank's slice of each."""
    for x, y in iterate_batches(train, batch_size, (cfg.seed, state.epoch), cfg.shuffle_block_rows, skip_batches=state.step):
        if ctx.enabled:  # this rank's disjoint slice of the global batch
            lo, hi = ctx.shard(len(y))
            x, y = x[lo:hi], y[lo:hi]
        yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def _diverged(state: TrainState, loss: torch.Tensor, run_dir: Optional[Path], writing: bool) -> TrainingDiverged:
    last = latest_checkpoint(run_dir) if writing else None
    where = f"; the last good checkpoint is {last}" if last else ""
    return TrainingDiverged(
        f"non-finite loss or gradient at epoch {state.epoch}, step {state.step} (global step "
        f"{state.global_step}, loss {loss.item()}){where}"
    )


def _validate(
    model: CTRModel, valid: Split, cfg: TrainConfig, ctx: DistContext, state: TrainState, seconds: float, device: torch.device,
    head: Optional[Any] = None, tasks: Optional[list[str]] = None, lr: float = 0.0,
) -> dict:
    """Score the valid split, close the window into a history record, and update early stopping
    (on `selection_score`: the AUC, or with several tasks the one `train.early_stopping` names).
    Returns the record; `state.done`'s early-stopping part is the caller's (it knows the schedule)."""
    if ctx.enabled:  # the window's loss over all ranks' rows
        state.window_loss_sum, state.window_seen = _summed_over_ranks(state, device)
    state.train_seconds += seconds
    state.samples_seen += state.window_seen
    metrics = evaluate(model, valid, cfg.eval_batch_size, ctx, head, tasks)
    record = {
        "epoch": state.epoch,
        "step": state.global_step,
        "train_logloss": state.window_loss_sum / max(state.window_seen, 1),
        "valid_auc": metrics["auc"],
        "valid_logloss": metrics["logloss"],
        "lr": lr,
        "seconds": seconds,
        "samples_per_second": state.window_seen / seconds if seconds > 0 else 0.0,
    }
    if cfg.l2_prior:
        record["l2_prior"] = cfg.l2_prior[state.prior_stage]
    if state.factor_stage >= 0:
        record["factor_prior"] = cfg.factor_prior[state.factor_stage]
    if state.skipped_batches:
        record["skipped_batches"] = state.skipped_batches
    if "tasks" in metrics:
        record["tasks"] = {t: {"valid_auc": m["auc"], "valid_logloss": m["logloss"]} for t, m in metrics["tasks"].items()}
        record["valid_score"] = selection_score(metrics, cfg)
    if selection_score(metrics, cfg) > selection_score(state.best_valid, cfg):
        state.best_epoch, state.best_step, state.best_valid = state.epoch, state.global_step, metrics
        state.best_prior_stage, state.bad_evals = state.prior_stage, 0
    else:
        state.bad_evals += 1
        state.plateau_scale *= cfg.lr_plateau_factor
    record["best_epoch"] = state.best_epoch
    state.history.append(record)
    state.window_loss_sum, state.window_seen, state.window_seconds, state.skipped_batches = 0.0, 0, 0.0, 0
    return record


def _out_of_patience(state: TrainState, cfg: TrainConfig) -> bool:
    """`patience` evaluations in a row without a better validation AUC: the run stops, unless an
    l2_prior path has a weaker prior left, which then takes over (and patience starts again).
    Not during the warm-up: a model judged at a fraction of its learning rate may just be slow
    (AutoInt on criteo-8k stopped at step 75 of 300 with its best at step 15).
    In FM's phase 2 the factor_prior path is the one that moves on (training.factor_phase)."""
    if state.bad_evals < cfg.patience or state.global_step - warmup_start(cfg, state) < cfg.lr_warmup_steps:
        return False
    if state.factor_stage >= 0:
        if state.factor_stage + 1 < len(cfg.factor_prior):
            state.factor_stage += 1
            state.bad_evals = 0
            return False
        return True
    if state.prior_stage + 1 < len(cfg.l2_prior):
        state.prior_stage += 1
        state.bad_evals = 0
        return False
    return True


class _Checkpointer:
    """Writes checkpoints of a run (rank 0), when it has a run folder and checkpoints are on."""

    def __init__(
        self, run_dir: Optional[Path], cfg: TrainConfig, model: CTRModel, optimizer: Optimizer, ctx: DistContext,
        device: torch.device, meta: Optional[dict[str, Any]] = None,
    ):
        self.run_dir, self.cfg, self.model, self.optimizer, self.ctx, self.device = run_dir, cfg, model, optimizer, ctx, device
        self.meta = meta  # stored in every checkpoint's manifest (train_run: the run's config and fingerprint)
        self.writing = run_dir is not None and ctx.is_main
        self.enabled = run_dir is not None and (cfg.checkpoints or cfg.checkpoint_every_steps > 0)
        self.last_write_seconds = 0.0  # the last checkpoint's write (0: none yet, the first evaluation writes)
        self.last_write_end = time.perf_counter()

    def at_step_mark(self, state: TrainState) -> bool:
        every = self.cfg.checkpoint_every_steps
        return bool(every) and state.global_step % every == 0

    def after_evaluation(self, state: TrainState, best_weights: dict[str, torch.Tensor]) -> None:
        if self._due_at_evaluation(state):
            self.save(state, best_weights)

    def _due_at_evaluation(self, state: TrainState) -> bool:
        """Whether this evaluation writes a checkpoint: the last evaluation always does; others while
        writing keeps to `train.checkpoint_overhead` of the wall time. An 8k-row epoch of a 10M-parameter
        model evaluates every ~0.2 s and a checkpoint takes ~0.3 s to write: without the bound, writing
        was 28% of the built-in run. Rank 0's clock decides for every rank (saving is collective)."""
        if not self.enabled:
            return False
        share = self.cfg.checkpoint_overhead
        since = time.perf_counter() - self.last_write_end
        due = state.done or since * share >= self.last_write_seconds * (1.0 - share)  # share 1: always
        if self.ctx.enabled:
            flag = torch.tensor([float(due)], device=self.device if self.ctx.backend == "nccl" else "cpu")
            torch.distributed.broadcast(flag, src=0)
            due = bool(flag.item())
        return due

    def save(self, state: TrainState, best_weights: dict[str, torch.Tensor]) -> None:
        if not self.enabled:
            return
        started = time.perf_counter()
        rng = rng_states(self.ctx)  # collective: every rank takes part, rank 0 writes
        saved = state.to_dict()
        if self.ctx.enabled:  # mid-window: the running loss over all ranks (rank 0 restores it)
            saved["window_loss_sum"], saved["window_seen"] = _summed_over_ranks(state, self.device)
        if self.writing:
            save_checkpoint(
                self.run_dir, self.model, self.optimizer.optimizers, best_weights, saved, self.cfg.keep_checkpoints, rng, self.meta
            )
        self.last_write_end = time.perf_counter()
        self.last_write_seconds = self.last_write_end - started


class _Progress:
    """The progress bar (rank 0, with `cfg.progress`): steps over the run's last step."""

    def __init__(self, cfg: TrainConfig, ctx: DistContext, schedule: Schedule, state: TrainState):
        self.schedule = schedule
        self.bar = tqdm(total=schedule.last_step, initial=state.global_step, unit="step", disable=not (cfg.progress and ctx.is_main),
                        file=sys.stderr, leave=False, mininterval=0.5)

    def epoch(self, state: TrainState) -> None:
        self.bar.set_description(f"epoch {state.epoch}/{self.schedule.max_epochs}")

    def step(self) -> None:
        self.bar.update(1)

    def extend(self, last_step: int) -> None:
        self.bar.total = last_step
        self.bar.refresh()

    def evaluated(self, record: dict, state: TrainState) -> None:
        self.bar.set_postfix(loss=f"{record['train_logloss']:.4f}", valid_auc=f"{record['valid_auc']:.4f}",
                             best=f"{state.best_valid['auc']:.4f}")

    def close(self) -> None:
        self.bar.close()


def _training_data(model: CTRModel, data: CTRDataset, cfg: TrainConfig) -> tuple[Split, Split, TrainConfig]:
    """The train and valid splits (negatives down-sampled when asked) and the config with the
    model's defaults filled in; refuses data the run cannot train on."""
    train, valid = _check_splits(data)
    cfg = with_model_defaults(cfg, type(model), model.cfg)
    check_tasks(data, cfg, multitask_model=getattr(model, "tasks", None) is not None)
    if cfg.negative_sampling_rate < 1:
        train = downsample_negatives(train, cfg.negative_sampling_rate, cfg.seed)
    return train, valid, cfg


def _place(model: CTRModel, cfg: TrainConfig, ctx: DistContext) -> tuple[torch.device, Optimizer]:
    """Threads, allocator, device; the optimizer (before DDP, which `_forward_module` builds)."""
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    keep_freed_memory()  # every step allocates the same tensors again: no page faults for them
    device = torch.device(ctx.device)
    model.to(device)
    # NCCL cannot all-reduce sparse gradients: multi-GPU runs update the tables densely
    optimizer = Optimizer(model, cfg, sparse=cfg.sparse_embeddings and ctx.sparse_allreduce)  # before DDP
    return device, optimizer


def _forward_module(model: CTRModel, ctx: DistContext, device: torch.device, first_phase: bool) -> torch.nn.Module:
    """The module a step calls: the model, or in a multi-process run its DDP wrapper. In phase 1 of
    LR first (training.factor_phase) a MaskNet's deep part is not run: DDP is told to leave its
    parameters out (it cannot wait for sparse gradients that never come), and is built again when
    phase 2 brings them in."""
    if not ctx.enabled:
        return model
    ignored = model.unused_in_first_phase() if first_phase else []
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignored)
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def _start(
    model: CTRModel, optimizer: Optimizer, resume_from: Optional[Path], ctx: DistContext
) -> tuple[TrainState, dict[str, torch.Tensor]]:
    """A fresh state and the initial weights as the best so far, or both from checkpoint `resume_from`."""
    if resume_from is None:
        return TrainState(), copy.deepcopy(model.state_dict())
    saved, best_weights = load_checkpoint(resume_from, model, optimizer.optimizers, ctx)
    state = TrainState.from_dict(saved)
    if not ctx.is_main:  # the saved running loss is the sum over all ranks: count it once
        state.window_loss_sum, state.window_seen = 0.0, 0
    return state, best_weights


def _count_step(state: TrainState, result: StepResult, rows: int, cfg: TrainConfig, run_dir: Optional[Path], writing: bool) -> None:
    """Book the step into the state; a non-finite step is skipped (on_nan=skip-batch) or ends the run."""
    state.step += 1
    state.global_step += 1
    if result.applied:
        state.add_batch(result.bce.item(), rows)
    elif cfg.on_nan == "skip-batch":
        state.skipped_batches += 1
    else:
        raise _diverged(state, result.loss, run_dir, writing)


def _phases_and_prior(
    model: CTRModel, cfg: TrainConfig, train: Split, cardinalities: list[int], device: torch.device, fresh: bool
) -> tuple[FactorPhase, Optional[L2Prior]]:
    """A two-phase fit's phases (FM, a MaskNet with its first-order term: LR first; a new run starts
    phase 1 with phase 2's part at zero) and the L2 prior, when the run has one."""
    phases = FactorPhase.for_run(model, cfg)
    prior = L2Prior.for_data(train, cardinalities, device) if any(cfg.l2_prior) or phases.enabled else None
    if prior is not None:
        prior.factor_ids = phases.factor_ids()
    if phases.enabled and fresh:
        phases.hold_at_zero(model)
    return phases, prior


def _begin_second_phase(
    model: CTRModel, phases: FactorPhase, state: TrainState, best_weights: dict[str, torch.Tensor], cfg: TrainConfig,
    ctx: DistContext, device: torch.device,
) -> torch.nn.Module:
    """Phase 1 has run out: phase 2 begins (FM: the factors; a MaskNet: its deep part), and the run
    goes on. Returns the module a step now calls (DDP built again, with the deep part in)."""
    phases.begin(model, state, best_weights, cfg.seed)
    state.done = False
    return _forward_module(model, ctx, device, first_phase=False)


def fit(
    model: CTRModel,
    data: CTRDataset,
    cfg: TrainConfig,
    on_eval: Optional[Callable[[dict], None]] = None,
    run_dir: Optional[Path] = None,
    resume_from: Optional[Path] = None,
    ctx: DistContext = DistContext(),
    checkpoint_meta: Optional[dict[str, Any]] = None,
) -> FitResult:
    """Train on data.splits['train'], validate on the schedule, early-stop on validation AUC and
    restore the best evaluation's weights.

    `on_eval(record)` is called after every evaluation (an exception it raises, e.g. a tuner's
    pruning signal, ends the run). With `run_dir`, checkpoints are written after evaluations (as often
    as `cfg.checkpoint_overhead` allows, always after the last) and every `cfg.checkpoint_every_steps`
    steps; `resume_from` (a checkpoint folder) continues a run exactly where it stopped: same batches,
    same RNG, same optimizer moments. In a multi-process run (`ctx`), each rank trains on its slice of
    every global batch through DistributedDataParallel, and only rank 0 writes checkpoints.
    `checkpoint_meta` is stored in every checkpoint's manifest (train_run: the run's config and fingerprint).
    """
    train, valid, cfg = _training_data(model, data, cfg)
    head, tasks = _training_head(cfg), data.task_names
    device, optimizer = _place(model, cfg, ctx)
    schedule = Schedule.for_run(cfg, len(train))
    phases, prior = _phases_and_prior(model, cfg, train, data.cardinalities, device, fresh=resume_from is None)
    state, best_weights = _start(model, optimizer, resume_from, ctx)
    if phases.enabled:  # a resumed run: the model does what its phase does
        model.set_phase(second=not phases.pending(state))
    forward = _forward_module(model, ctx, device, first_phase=phases.pending(state))
    state.steps_per_epoch = schedule.steps_per_epoch
    checkpointer = _Checkpointer(run_dir, cfg, model, optimizer, ctx, device, checkpoint_meta)
    if not state.done and state.global_step >= phases.end_step(schedule, cfg, state) and not phases.pending(state):
        # a resume whose cap (train.epochs lowered to the epochs already trained) is behind it: stop here
        state.done = True
        checkpointer.save(state, best_weights)
    progress = _Progress(cfg, ctx, schedule, state)
    window_start = time.perf_counter() - state.window_seconds
    model.train()
    while not state.done:
        if state.step >= schedule.steps_per_epoch:
            state.next_epoch()
        progress.epoch(state)
        for x, y in _epoch_batches(train, cfg, schedule.batch_size, state, ctx, device):
            optimizer.set_lr(phase_rate(cfg, state, phases))
            if prior is not None:
                phases.set_prior(prior, state, cfg)
            result = train_step(model, optimizer, x, y, cfg, forward, prior)
            _count_step(state, result, len(y), cfg, run_dir, checkpointer.writing)
            progress.step()
            phase_end = phases.end_step(schedule, cfg, state)
            if schedule.evaluates_at(state.global_step, phase_end):
                record = _validate(model, valid, cfg, ctx, state, time.perf_counter() - window_start, device, head, tasks, optimizer.lr)
                if phases.enabled:  # which phase of a two-phase fit this evaluation is in (a tuner's pruner skips phase 1)
                    record["phase"] = 1 if phases.pending(state) else 2
                model.train()
                state.done = _out_of_patience(state, cfg) or state.global_step >= phase_end
                progress.evaluated(record, state)
                if state.best_step == state.global_step:
                    best_weights = copy.deepcopy(model.state_dict())
                if state.done and phases.pending(state) and state.global_step < (cfg.max_steps or math.inf):
                    forward = _begin_second_phase(model, phases, state, best_weights, cfg, ctx, device)
                    progress.extend(phases.end_step(schedule, cfg, state))
                if on_eval is not None:
                    on_eval(record)
                checkpointer.after_evaluation(state, best_weights)
                window_start = time.perf_counter()
                if state.done:
                    break
            elif checkpointer.at_step_mark(state):
                state.window_seconds = time.perf_counter() - window_start
                checkpointer.save(state, best_weights)
    progress.close()
    model.load_state_dict(best_weights)
    if phases.enabled:  # stopped in phase 1: the deep part's prediction layer is zero, the full forward is LR's
        model.set_phase(second=True)
    return FitResult(
        best_epoch=state.best_epoch, best_valid=state.best_valid, history=state.history, train_seconds=state.train_seconds,
        samples_seen=state.samples_seen, best_step=state.best_step, steps=state.global_step, batch_size=schedule.batch_size,
    )
