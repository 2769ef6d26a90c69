"""Evaluation metrics: AUC (ties handled exactly), log loss, RelaImp (Eq. 20)."""

from __future__ import annotations

import numpy as np


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve via the Mann-Whitney statistic with average ranks for ties.

    Equal to scikit-learn's roc_auc_score (ties included). NaN if only one class is present.
    """
    y = np.asarray(labels).astype(bool).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels {y.shape} and scores {s.shape} differ in shape")
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    s_sorted = s[order]
    # average rank (1-based) of each run of tied scores
    boundaries = np.flatnonzero(np.diff(s_sorted)) + 1
    starts = np.concatenate(([0], boundaries))
    ends = np.concatenate((boundaries, [len(s)]))
    avg_rank = (starts + ends + 1) / 2.0  # mean of ranks starts+1 .. ends
    ranks = np.repeat(avg_rank, ends - starts)
    pos_rank_sum = ranks[y[order]].sum()
    return float((pos_rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def logloss(labels: np.ndarray, probs: np.ndarray, eps: float = 1e-7) -> float:
    """L = -(1/N) Σ [y log p + (1 - y) log(1 - p)] (Eq. 18), p clipped to [eps, 1 - eps]."""
    y = np.asarray(labels, dtype=np.float64).ravel()
    p = np.clip(np.asarray(probs, dtype=np.float64).ravel(), eps, 1 - eps)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log1p(-p)))


def relaimp(auc_model: float, auc_base: float) -> float:
    """RelaImp = (AUC(model) - 0.5) / (AUC(base) - 0.5) - 1  (Eq. 20)."""
    if auc_base <= 0.5:
        raise ValueError(f"RelaImp needs a base AUC above 0.5, got {auc_base}")
    return (auc_model - 0.5) / (auc_base - 0.5) - 1.0
