"""Mean ± std over seeds, and verdicts on the paper's claims.

A comparison "A > B" is decided from the per-seed test AUCs:
  diff = mean(A) - mean(B); se = sqrt(var(A)/n_A + var(B)/n_B) (sample variances, Welch).
  diff >  2 se  -> "holds"         (the paper's direction, beyond the seed-to-seed spread)
  diff < -2 se  -> "does not hold" (reversed beyond the spread)
  otherwise     -> "not resolved"  (within noise)
With one seed there is no spread: every verdict is "not resolved (1 seed)".
A claim of "no real difference" (the paper's |Δ| < 0.0005) holds when the whole interval
diff ± 2 se lies within ±0.002 AUC (EQUIVALENT), does not hold when |diff| > 2 se, and is
not resolved otherwise (the noise is too wide to tell "equal" from "different").

The seeds vary initialisation and shuffling on a fixed split, so the spread does not include
the sampling noise of the test set itself; `auc_standard_error` (Hanley & McNeil 1982) gives
that floor for one AUC, and the report prints it beside the verdicts.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

NEGLIGIBLE = 0.0005  # a published |Δ AUC| below this is read as "no real difference"
EQUIVALENT = 0.002  # "no real difference" holds here when diff ± 2 se stays within ±EQUIVALENT


def mean_std(values: Sequence[float]) -> dict[str, Any]:
    vals = [float(v) for v in values if v is not None and not math.isnan(v)]
    n = len(vals)
    if n == 0:
        return {"mean": None, "std": None, "n": 0, "values": []}
    mean = sum(vals) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std, "n": n, "values": vals}


def compare(a: Sequence[float], b: Sequence[float], paper_diff: Optional[float] = None) -> dict[str, Any]:
    """Is mean(a) - mean(b) in the paper's direction (sign of paper_diff; None = "a > b")?"""
    sa, sb = mean_std(a), mean_std(b)
    if not sa["n"] or not sb["n"]:
        return {"diff": None, "se": None, "verdict": "missing"}
    diff = sa["mean"] - sb["mean"]
    if sa["n"] < 2 or sb["n"] < 2:
        return {"diff": diff, "se": None, "verdict": "not resolved (1 seed)"}
    se = math.sqrt(sa["std"] ** 2 / sa["n"] + sb["std"] ** 2 / sb["n"])
    se = max(se, 1e-12)
    if paper_diff is not None and abs(paper_diff) < NEGLIGIBLE:
        if abs(diff) > 2 * se:
            verdict = "does not hold (a clear difference)"
        elif abs(diff) + 2 * se <= EQUIVALENT:
            verdict = f"holds (equal within ±{EQUIVALENT})"
        else:
            verdict = "not resolved"
    else:
        sign = 1.0 if paper_diff is None or paper_diff > 0 else -1.0
        z = sign * diff / se
        verdict = "holds" if z > 2 else ("does not hold" if z < -2 else "not resolved")
    return {"diff": diff, "se": se, "z": diff / se, "verdict": verdict}


def auc_standard_error(auc: float, n_pos: int, n_neg: int) -> float:
    """Hanley & McNeil (1982) standard error of one AUC on n_pos positives and n_neg negatives."""
    if not (0 < auc < 1) or n_pos < 1 or n_neg < 1:
        return float("nan")
    q1 = auc / (2 - auc)
    q2 = 2 * auc * auc / (1 + auc)
    var = (auc * (1 - auc) + (n_pos - 1) * (q1 - auc * auc) + (n_neg - 1) * (q2 - auc * auc)) / (n_pos * n_neg)
    return math.sqrt(max(var, 0.0))


def fmt_ms(s: dict[str, Any], digits: int = 4, pct: bool = False) -> str:
    if s.get("mean") is None:
        return "n/a"
    if pct:
        return f"{s['mean']:+.2%} ± {s['std']:.2%}" if s["n"] > 1 else f"{s['mean']:+.2%}"
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}" if s["n"] > 1 else f"{s['mean']:.{digits}f}"


def fmt_cmp(c: dict[str, Any]) -> str:
    if c.get("diff") is None:
        return "n/a"
    se = f" ± {c['se']:.4f}" if c.get("se") is not None else ""
    return f"{c['diff']:+.4f}{se}: {c['verdict']}"
