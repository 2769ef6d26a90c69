"""What keeps a study's best from being the luck of one seed (docs/model.md, "masknet tune").

The default is a candidate: trial 0 of every study is the model's default setting (enqueued, so
the sampler also learns from it). The keys whose default a range cannot express (e.g. "no L2
prior" in a 0.01..100 range) are left out of that trial: it keeps the base config's value for them,
so it trains exactly what `masknet train` trains.

The best is re-checked: on a small validation split the best of 30 single-seed draws is mostly the
draw with the luckiest seed (criteo-8k, 409 rows: best valid 0.7239 on seed 2021, 0.700 on seeds
1-3, below the default). So, when a study has at least `min_trials` trials, the last
`seeds × (top + 1)` of them are re-checks: the `top` best complete trials besides the default, and the
default, are each
trained on `seeds` more seeds (the base seed + 1, + 2, ...), and best.yaml is the candidate with the
best mean validation AUC over all its seeds. The re-checks count in `--trials`, by the same rule for
every model, so `masknet reproduce --tune N` still gives every model the same budget.

More seeds guard against a lucky seed, not against a small validation split: every candidate is
scored on the same rows, and on criteo-8k's 409 a 0.005 edge in mean validation AUC picked a
learning rate 9x LR's default that lost 0.032 on test (docs/model.md). So the winner must also beat
the default by more than `margin_se` standard errors of the paired AUC difference (DeLong, on the
re-check seeds' validation scores, which each re-check saves): the one-standard-error rule, with
the default as the simpler model. Otherwise best.yaml is the default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np

from ..config import RunConfig
from ..models import REGISTRY
from ..models.search import Choice, Float, Int, Layers, Range, SearchSpace
from ..training.metrics import paired_auc_difference
from ..training.trainer import Schedule, with_model_defaults

# user attributes of a trial: `keys` (a fixed trial: only these keys are set), `seed`, `recheck_of`
DEFAULT, KEYS, SEED, RECHECK_OF = "default", "keys", "seed", "recheck_of"
CARRIED = (DEFAULT, KEYS, SEED, RECHECK_OF)  # what a retried (killed) trial keeps
FAILED_RECHECK_AUC = 0.5  # a re-check run that diverged counts as a random ranker


@dataclass(frozen=True)
class Recheck:
    top: int = 3  # best complete trials re-checked (the default is re-checked as well)
    seeds: int = 2  # more seeds per candidate
    min_trials: int = 20  # smaller studies have no re-check: the search keeps every trial
    margin_se: float = 1.0  # the winner's edge over the default, in SEs of the paired difference (0: off)

    def runs(self, trials: int) -> int:
        """Trials of a `trials`-trial study spent on re-checks."""
        return self.seeds * (self.top + 1) if trials >= self.min_trials and self.seeds > 0 else 0


def _contains(r: Range, value: Any) -> bool:
    if isinstance(r, Layers):
        return isinstance(value, list) and bool(value) and len(set(value)) == 1 and value[0] in r.widths and len(value) in r.depths
    if isinstance(r, Choice):
        return value in r.values
    if isinstance(r, (Float, Int)) and isinstance(value, (int, float)) and not isinstance(value, bool):
        return r.low <= value <= r.high and (isinstance(r, Float) or float(value).is_integer())
    return False


def default_settings(base: RunConfig, space: SearchSpace, train_rows: int) -> dict[str, Any]:
    """The default's value of every key of `space` whose range contains it, by config key. The batch
    is the one the default trains at (the batch rule halves it on small data; a study does not)."""
    resolved = with_model_defaults(base.train, REGISTRY[base.model.name])
    out = {}
    for key, r in space.items():
        section, name = key.split(".", 1)
        value = getattr(resolved if section == "train" else base.model, name, None)
        if key == "train.batch_size":
            value = Schedule.for_run(resolved, train_rows).batch_size
        if _contains(r, value):
            out[key] = value
    return out


def optuna_params(settings: dict[str, Any], space: SearchSpace) -> dict[str, Any]:
    """Config values as Optuna's flat parameters (a Layers key is `<key>.width` and `<key>.depth`)."""
    out = {}
    for key, value in settings.items():
        if isinstance(space[key], Layers):
            out[f"{key}.width"], out[f"{key}.depth"] = value[0], len(value)
        else:
            out[key] = value
    return out


def trial_keys(params: dict[str, Any], space: SearchSpace) -> list[str]:
    """The config keys Optuna parameters `params` set."""
    return [k for k in space if k in params or f"{k}.width" in params]


@dataclass
class Candidate:
    number: int  # its search trial
    params: dict[str, Any]
    values: dict[int, float]  # validation AUC by seed
    default: bool
    edge_se: Optional[float] = None  # SE of (its AUC - the default's) on the validation rows; None: not known

    @property
    def mean(self) -> float:
        return sum(self.values.values()) / len(self.values)

    def to_dict(self) -> dict[str, Any]:
        return {"trial": self.number, "default": self.default, "params": self.params,
                "valid_auc_by_seed": self.values, "mean_valid_auc": self.mean, "edge_se": self.edge_se}


def candidates(trials: list, recheck: Recheck) -> list[Candidate]:
    """The `top` best complete search trials other than the default, then the default (so a study
    always re-checks top + 1 settings, whether or not the default is among the best)."""
    search = [t for t in trials if t.state.name == "COMPLETE" and RECHECK_OF not in t.user_attrs]
    drawn = [t for t in search if not t.user_attrs.get(DEFAULT)]
    chosen = sorted(drawn, key=lambda t: (-t.value, t.number))[: recheck.top]
    chosen += [t for t in search if t.user_attrs.get(DEFAULT)][:1]
    return [Candidate(t.number, dict(t.params), {}, bool(t.user_attrs.get(DEFAULT))) for t in chosen]


def recheck_seeds(base_seed: int, recheck: Recheck) -> list[int]:
    return [base_seed + i for i in range(1, recheck.seeds + 1)]


def scored(cands: list[Candidate], trials: list, base_seed: int) -> list[Candidate]:
    """Each candidate's validation AUC on the base seed (its search trial) and on every re-check."""
    by_number = {t.number: t for t in trials}
    for c in cands:
        c.values = {base_seed: by_number[c.number].value}
        for t in trials:
            if t.user_attrs.get(RECHECK_OF) == c.number and t.state.name in ("COMPLETE", "PRUNED"):
                c.values[t.user_attrs[SEED]] = t.value if t.value is not None else FAILED_RECHECK_AUC
    return cands


def with_edge_se(cands: list[Candidate], labels: np.ndarray, seeds: list[int],
                 scores: Callable[[int, int], Optional[np.ndarray]], rows_scale: float = 1.0) -> list[Candidate]:
    """Set each non-default candidate's `edge_se`: DeLong's SE of its AUC minus the default's, on the
    validation rows `scores(trial, seed)` scored, root-mean-square over the seeds both were scored
    on. The seeds share the rows, so their errors are not independent and are not averaged down.
    `rows_scale` (n scored / n rows, when a sample of the rows was kept) scales it to all rows."""
    default = next((c for c in cands if c.default), None)
    if default is None:
        return cands
    for c in cands:
        if c.default:
            continue
        variances = []
        for s in seeds:
            a, b = scores(c.number, s), scores(default.number, s)
            if a is not None and b is not None:
                se = paired_auc_difference(labels, a, b)[1]
                if math.isfinite(se):
                    variances.append(se * se)
        c.edge_se = math.sqrt(sum(variances) / len(variances) * rows_scale) if variances else None
    return cands


def best(cands: list[Candidate], margin_se: float = 0.0) -> Optional[Candidate]:
    """The best mean validation AUC (ties: the earlier trial), unless its edge over the default is
    within `margin_se` of its `edge_se`: then the default (a candidate without an SE is taken as is)."""
    top = max(cands, key=lambda c: (c.mean, -c.number), default=None)
    default = next((c for c in cands if c.default), None)
    if top is None or default is None or top is default or top.edge_se is None:
        return top
    return top if top.mean - default.mean > margin_se * top.edge_se else default
