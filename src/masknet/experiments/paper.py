"""The paper's published numbers (Tables 2-6, RQ4 claims), kept as data in paper_results.json."""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from typing import Any


@lru_cache(maxsize=1)
def published() -> dict[str, Any]:
    """The published results: the paper's Tables 2-6 and its RQ4 claims (Section 4, experiments)."""
    text = resources.files("masknet.experiments").joinpath("paper_results.json").read_text()
    return json.loads(text)


def table2_auc(model: str, dataset: str = "Criteo") -> float | None:
    return published()["table2"]["auc"].get(model, {}).get(dataset)


def table2_relaimp(model: str, dataset: str = "Criteo") -> float | None:
    return published()["table2"]["relaimp"].get(model, {}).get(dataset)


def table3_auc(model: str, variant: str) -> float | None:
    return published()["table3"]["auc"].get(model, {}).get(variant)


def sweep_auc(table: str, model: str, value: float) -> float | None:
    """Published AUC of `model` at hyperparameter `value` in table4/5/6 (None if not in the paper)."""
    t = published()[table]
    for v, a in zip(t["values"], t["auc"].get(model, [])):
        if float(v) == float(value):
            return a
    return None
