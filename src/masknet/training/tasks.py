"""Several labels in training: which tasks a run trains on, their loss, metrics, early stopping,
and negative down-sampling.

    labels y [B, T] float, -1 where a row's label is unknown: `mask = y >= 0`
    loss  = Σ_t w_t · mean over the rows labelled for t of BCE(logit_t, y_t)
    early stopping score: "first" (default) = the first task's validation AUC; "mean" = Σ_t w_t AUC_t / Σ_t w_t
    over the validation split; or a named task's AUC

A single-label run never comes here for its loss (trainer.loss_fn keeps today's exact path).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..config import TrainConfig
from ..data.dataset import MISSING_LABEL, CTRDataset, Split
from ..errors import UserError
from .metrics import auc, logloss


def select_tasks(data: CTRDataset, tasks: list[str]) -> CTRDataset:
    """`data` restricted to the labels `tasks` (in that order; empty: all of them).

    One task whose label is never missing becomes plain single-label data (y, p), exactly as a
    single-label dataset: a run on it is the single-task run of that label."""
    names = data.task_names
    if not tasks or tasks == names:
        return data
    unknown = [t for t in tasks if t not in names]
    if unknown:
        raise UserError(f"train.tasks: no label {unknown[0]!r} in the data; its labels are {', '.join(names)}")
    cols = [names.index(t) for t in tasks]
    labels_meta = [lab for lab in data.meta.get("labels", [{"name": names[0], "optional": False}])]
    meta = dict(data.meta, labels=[labels_meta[c] for c in cols])
    splits = {}
    for s, split in data.splits.items():
        lab = split.label_matrix()[:, cols]
        probs = split.prob_matrix()
        probs = None if probs is None else probs[:, cols]
        if len(cols) == 1 and not (lab == MISSING_LABEL).any():
            first_p = None if probs is None else np.ascontiguousarray(probs[:, 0])
            splits[s] = Split(split.x, np.ascontiguousarray(lab[:, 0]), first_p, split.seq, split.seq_weights)
        else:
            first_p = None if probs is None else probs[:, 0]
            splits[s] = Split(split.x, lab[:, 0], first_p, split.seq, split.seq_weights, lab, probs)
    if all(sp.labels is None for sp in splits.values()):
        meta["labels"] = meta["labels"][:1]
    return dataclasses.replace(data, splits=splits, meta=meta)


def task_weights(cfg: TrainConfig, num_tasks: int) -> list[float]:
    return list(cfg.task_weights) if cfg.task_weights else [1.0] * num_tasks


def multitask_loss(logits: torch.Tensor, y: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ_t w_t · task t's mean BCE over its labelled rows, the per-task means [T]).
    logits [B] or [B, T]; y [B, T] with -1 where unknown."""
    if logits.ndim == 1:
        logits = logits.unsqueeze(1)
    mask = (y >= 0).to(logits.dtype)
    bce = F.binary_cross_entropy_with_logits(logits, y.clamp(min=0), reduction="none") * mask
    per_task = bce.sum(0) / mask.sum(0).clamp(min=1)
    return (per_task * weights.to(per_task.dtype)).sum(), per_task.detach()


def task_metrics(labels: np.ndarray, probs: np.ndarray, names: list[str]) -> dict[str, dict[str, float]]:
    """AUC, log loss and counts per task over the rows whose label is known."""
    out = {}
    for t, name in enumerate(names):
        known = labels[:, t] != MISSING_LABEL
        y, p = labels[known, t], probs[known, t]
        out[name] = {"auc": auc(y, p), "logloss": logloss(y, p) if len(y) else float("nan"), "rows": int(known.sum()), "positives": int(y.sum())}
    return out


def selection_score(metrics: dict[str, Any], cfg: TrainConfig) -> float:
    """The validation number early stopping maximises (module docstring)."""
    tasks = metrics.get("tasks")
    if not tasks:
        return metrics["auc"]
    if cfg.early_stopping == "first":
        return next(iter(tasks.values()))["auc"]
    if cfg.early_stopping != "mean":
        return tasks[cfg.early_stopping]["auc"]
    weights = task_weights(cfg, len(tasks))
    return float(sum(w * m["auc"] for w, m in zip(weights, tasks.values())) / sum(weights))


def check_tasks(data: CTRDataset, cfg: TrainConfig, multitask_model: bool) -> None:
    """Refuse what cannot train: several labels without a multi-task model, an unknown early-stopping
    task, a task without both classes in the validation split, down-sampling a task that it biases."""
    names = data.task_names
    valid = data.splits["valid"]
    if valid.labels is not None and not multitask_model and len(names) > 1:
        raise UserError(
            f"the data has {len(names)} labels ({', '.join(names)}): train a multi-task model "
            f"(--set model.multitask=shared_bottom or mmoe) or pick one label (--set train.tasks={names[0]})"
        )
    if cfg.early_stopping not in ("first", "mean") and cfg.early_stopping not in names:
        raise UserError(
            f"train.early_stopping: expected 'first', 'mean' or one of the tasks ({', '.join(names)}), got {cfg.early_stopping!r}"
        )
    if cfg.task_weights and len(cfg.task_weights) != len(names):
        raise UserError(f"train.task_weights: {len(cfg.task_weights)} weights for {len(names)} tasks ({', '.join(names)})")
    lab = valid.label_matrix()
    for t, name in enumerate(names):
        known = lab[:, t][lab[:, t] != MISSING_LABEL]
        if np.unique(known).size < 2:
            raise UserError(f"the valid split has only one class for task {name!r}: its validation AUC is undefined")
    if cfg.negative_sampling_rate < 1 and len(names) > 1:
        train = data.splits["train"].label_matrix()
        first_negative = train[:, 0] == 0
        for t, name in enumerate(names[1:], start=1):
            if (first_negative & (train[:, t] == 1)).any():
                raise UserError(
                    f"train.negative_sampling_rate: task {name!r} has positives on rows negative on {names[0]!r}, so "
                    f"down-sampling those rows would bias it beyond correction (docs/calibration.md); use rate 1"
                )


def downsample_negatives(split: Split, rate: float, seed: int) -> Split:
    """Every row positive on the first task, and exactly round(rate · negatives) of the others
    (a seeded choice without replacement), in their order: an in-memory split. Exactly, not each
    with probability `rate`: models.scoring corrects the scores with the nominal rate, and an
    independent coin per row realises rate ± sqrt(rate(1 − rate)/negatives) (0.0991 for 0.1 on the
    built-in 96,000 training rows), a bias the correction passes on to every served probability."""
    y = np.asarray(split.y)
    negatives = np.flatnonzero(y != 1)
    chosen = np.random.default_rng([seed, 0x5A3]).permutation(len(negatives))[: round(rate * len(negatives))]
    keep = np.zeros(len(y), dtype=bool)
    keep[y == 1] = True
    keep[negatives[chosen]] = True
    return split.take(np.flatnonzero(keep))


def predictions_by_task(probs: np.ndarray) -> np.ndarray:
    """[n] or [n, T] -> [n, T]."""
    return probs.reshape(len(probs), -1)


def first_task(probs: np.ndarray) -> np.ndarray:
    return probs if probs.ndim == 1 else probs[:, 0]


def optional_head_spec(rate: float, offsets: Optional[list[float]] = None) -> Optional[dict[str, Any]]:
    """The ScoreHead spec of the down-sampling correction alone (training-time evaluation: without
    the intercepts, fitted after training)."""
    if rate == 1:
        return None
    return {"negative_sampling_rate": rate} | ({"logit_offsets": offsets} if offsets is not None else {})
