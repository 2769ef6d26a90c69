"""Evaluation metrics: AUC (ties handled exactly), log loss, RelaImp (Eq. 20), and the standard
error of a paired AUC difference (DeLong)."""

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
    pos_rank_sum = midranks(s)[y].sum()
    return float((pos_rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def midranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of `values`, each run of ties at its average rank (scipy's rankdata 'average')."""
    order = np.argsort(values, kind="mergesort")
    s_sorted = values[order]
    boundaries = np.flatnonzero(np.diff(s_sorted)) + 1
    starts = np.concatenate(([0], boundaries))
    ends = np.concatenate((boundaries, [len(values)]))
    ranks = np.empty(len(values))
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)  # mean of ranks starts+1 .. ends
    return ranks


def paired_auc_difference(labels: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray) -> tuple[float, float]:
    """AUC(a) - AUC(b) on the same rows, and its standard error by DeLong, DeLong & Clarke-Pearson
    (1988), computed from midranks as in Sun & Xu (2014): O(n log n). The two AUCs are correlated
    (same rows), which is what makes the SE of their difference smaller than either AUC's own."""
    y = np.asarray(labels).astype(bool).ravel()
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos < 2 or n_neg < 2:
        return float("nan"), float("nan")
    v10, v01 = [], []  # per model: each positive's (negative's) share of pairs it ranks correctly
    for s in (scores_a, scores_b):
        s = np.asarray(s, dtype=np.float64).ravel()
        if s.shape != y.shape:
            raise ValueError(f"labels {y.shape} and scores {s.shape} differ in shape")
        ranks = midranks(s)
        v10.append((ranks[y] - midranks(s[y])) / n_neg)
        v01.append(1.0 - (ranks[~y] - midranks(s[~y])) / n_pos)
    diff = float(v10[0].mean() - v10[1].mean())
    var = np.var(v10[0] - v10[1], ddof=1) / n_pos + np.var(v01[0] - v01[1], ddof=1) / n_neg
    return diff, float(np.sqrt(max(var, 0.0)))


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
