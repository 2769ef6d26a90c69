"""Ranking by several tasks: a multi-task bundle's per-task probabilities combined into one score.

    combined score = Σ_t w_t · p_t        p_t: task t's served (calibrated) probability

Weights come from start-up (`masknet serve --task-weights click=1,purchase=20`; default 1 for
every task) or from a request's `"weights": {"purchase": 20}`, which replaces the start-up
weights of the tasks it names. A weight must be a finite number >= 0; an unknown task or a
bad weight is a one-line error naming it (UserError at start-up, 422 in a request).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np

from ..errors import UserError


def default_weights(tasks: list[str]) -> dict[str, float]:
    return {t: 1.0 for t in tasks}


def parse_weights(text: Optional[str], tasks: list[str]) -> dict[str, float]:
    """`--task-weights click=1,purchase=20` -> every task's weight (unnamed tasks keep 1)."""
    weights = default_weights(tasks)
    if not text:
        return weights
    for item in text.split(","):
        name, sep, value = item.partition("=")
        name = name.strip()
        try:
            w = float(value)
        except ValueError:
            w = float("nan")
        if not sep or not name:
            raise UserError(f"--task-weights {item!r}: expected TASK=WEIGHT, e.g. --task-weights {tasks[0]}=1")
        if name not in weights:
            raise UserError(f"--task-weights: no task {name!r}; the model's tasks are {', '.join(tasks)}")
        if not (math.isfinite(w) and w >= 0):
            raise UserError(f"--task-weights {item!r}: a weight must be a number >= 0")
        weights[name] = w
    return weights


def request_weights(given: Optional[dict[str, Any]], base: dict[str, float], error: type[Exception]) -> dict[str, float]:
    """The start-up weights with a request's `weights` applied; `error(message)` for bad ones."""
    if not given:
        return base
    out = dict(base)
    for name, w in given.items():
        if name not in out:
            raise error(f"weights.{name}: no such task; the model's tasks are {', '.join(out)}")
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not (math.isfinite(w) and w >= 0):
            raise error(f"weights.{name}: must be a number >= 0, got {w!r}")
        out[name] = float(w)
    return out


def combine(task_scores: np.ndarray, tasks: list[str], weights: dict[str, float]) -> np.ndarray:
    """[n, T] probabilities -> [n] combined scores (float64)."""
    w = np.array([weights[t] for t in tasks], dtype=np.float64)
    return task_scores.astype(np.float64) @ w
