"""Calibration: how well predicted probabilities match observed rates, and post-hoc calibrators.

Measures (every model, every task; docs/calibration.md):
    ece            expected calibration error over `bins` equal-mass bins of the predicted
                   probability: Σ_b (n_b / N) · |mean p̂_b − mean y_b|
    ece_true       the same bins against the true probabilities (synthetic data): no label noise
    mae_true       mean |p̂ − p_true| (synthetic data)
    ratio          predicted / observed rate: mean p̂ / mean y (1 = unbiased on average)
    per field value: rows, observed rate, mean p̂ and their ratio for a field's most frequent values

Calibrators, fitted on the validation split's (down-sampling-corrected) probabilities:
    isotonic       pool-adjacent-violators (PAV) on the sorted scores, weighted by ties (the same
                   blocks and values as scikit-learn's IsotonicRegression: tests check), served as
                   centred isotonic regression: one knot per block at its mean score, linear between
                   (fit_centered_isotonic says why)
    platt          sigmoid(a · logit(p) + b), a and b by Newton's method on the log loss
Applied by models.scoring.ScoreHead (predict, serve, ONNX).
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from ..models.scoring import CALIBRATION_FORMAT, CALIBRATION_VERSION, EPS

PER_FIELD_VALUES = 20  # the most frequent values of the chosen field reported one by one


def equal_mass_bins(p: np.ndarray, bins: int) -> list[np.ndarray]:
    """Row indices of `bins` bins of (nearly) equal size, by increasing predicted probability."""
    order = np.argsort(p, kind="stable")
    return [b for b in np.array_split(order, min(bins, max(len(p), 1))) if len(b)]


def reliability(y: np.ndarray, p: np.ndarray, bins: int, p_true: Optional[np.ndarray] = None) -> list[dict[str, float]]:
    """Per equal-mass bin: rows, mean prediction, observed rate (and mean true probability)."""
    out = []
    for b in equal_mass_bins(p, bins):
        row = {"rows": int(len(b)), "predicted": float(p[b].mean()), "observed": float(y[b].mean())}
        if p_true is not None:
            row["true"] = float(p_true[b].mean())
        out.append(row)
    return out


def ece(y: np.ndarray, p: np.ndarray, bins: int, against: Optional[np.ndarray] = None) -> float:
    """Expected calibration error over equal-mass bins; `against` replaces the labels (e.g. the
    true probabilities)."""
    target = np.asarray(y, np.float64) if against is None else np.asarray(against, np.float64)
    p = np.asarray(p, np.float64)
    n = len(p)
    if n == 0:
        return float("nan")
    return float(sum(len(b) / n * abs(p[b].mean() - target[b].mean()) for b in equal_mass_bins(p, bins)))


def ratio(y: np.ndarray, p: np.ndarray) -> float:
    """Mean prediction over the observed rate (NaN when no row is positive)."""
    observed = float(np.mean(y)) if len(y) else 0.0
    return float(np.mean(p)) / observed if observed > 0 else float("nan")


def per_field_ratio(y: np.ndarray, p: np.ndarray, values: np.ndarray, top: int = PER_FIELD_VALUES) -> list[dict[str, Any]]:
    """Rows, observed rate, mean prediction and ratio for the `top` most frequent field values."""
    uniq, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    pos = np.bincount(inverse, weights=y.astype(np.float64), minlength=len(uniq))
    pred = np.bincount(inverse, weights=p.astype(np.float64), minlength=len(uniq))
    out = []
    for k in np.argsort(-counts, kind="stable")[:top]:
        obs, mean_p = pos[k] / counts[k], pred[k] / counts[k]
        out.append({
            "value": int(uniq[k]), "rows": int(counts[k]), "observed": float(obs), "predicted": float(mean_p),
            "ratio": float(mean_p / obs) if obs > 0 else None,
        })
    return out


def calibration_metrics(y: np.ndarray, p: np.ndarray, bins: int, p_true: Optional[np.ndarray] = None) -> dict[str, float]:
    out = {"ece": ece(y, p, bins), "ratio": ratio(y, p)}
    if p_true is not None:
        out["ece_true"] = ece(y, p, bins, against=p_true)
        out["mae_true"] = float(np.mean(np.abs(np.asarray(p, np.float64) - p_true)))
    return out


# ---------------------------------------------------------------------------
# Fitting calibrators


def _pav_blocks(p: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int, float]]]:
    """Pool-adjacent-violators over the distinct scores: (distinct scores, their row counts,
    blocks as (first, last) distinct-score indices and the block's mean label)."""
    p = np.asarray(p, np.float64)
    y = np.asarray(y, np.float64)
    xs, counts = np.unique(p, return_counts=True)
    sums = np.bincount(np.searchsorted(xs, p), weights=y, minlength=len(xs))
    b_sum, b_w, b_lo, b_hi = [], [], [], []  # the blocks so far, as a stack
    for i in range(len(xs)):
        s, w, lo = sums[i], float(counts[i]), i
        while b_sum and b_sum[-1] / b_w[-1] >= s / w:  # violates (or ties) the order: pool
            s += b_sum.pop()
            w += b_w.pop()
            lo = b_lo.pop()
            b_hi.pop()
        b_sum.append(s), b_w.append(w), b_lo.append(lo), b_hi.append(i)
    return xs, counts, [(lo, hi, s / w) for s, w, lo, hi in zip(b_sum, b_w, b_lo, b_hi)]


def fit_isotonic(p: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Increasing least-squares fit of y on p (PAV), as scikit-learn's IsotonicRegression: the knots
    (x, y) are each block's first and last score, the function is linear between knots."""
    xs, _, blocks = _pav_blocks(p, y)
    knots_x, knots_y = [], []
    for lo, hi, value in blocks:
        knots_x.append(xs[lo]), knots_y.append(value)
        if hi > lo:
            knots_x.append(xs[hi]), knots_y.append(value)
    return np.asarray(knots_x), np.asarray(knots_y)


def fit_centered_isotonic(p: np.ndarray, y: np.ndarray, max_slope: float = np.inf) -> tuple[np.ndarray, np.ndarray]:
    """Centred isotonic regression (Oron & Flournoy 2017): PAV's blocks and values, one knot per
    block at its mean score, linear between knots. The served calibrator (train.calibration=
    isotonic): PAV's function jumps between a block's last score and the next block's first, so
    a score moved by one float32 rounding (PyTorch vs onnxruntime) could move the calibrated
    probability by 1e-4 and more; between block centres the slopes are far smaller, and ties
    inside a block are not created, so ranking (AUC) is kept. Segments steeper than `max_slope`
    are pooled (pool_steep)."""
    xs, counts, blocks = _pav_blocks(p, y)
    centers = [float(np.dot(xs[lo : hi + 1], counts[lo : hi + 1]) / counts[lo : hi + 1].sum()) for lo, hi, _ in blocks]
    rows = [float(counts[lo : hi + 1].sum()) for lo, hi, _ in blocks]
    return pool_steep(np.asarray(centers), np.asarray([v for _, _, v in blocks]), np.asarray(rows), max_slope)


def pool_steep(x: np.ndarray, y: np.ndarray, rows: np.ndarray, max_slope: float) -> tuple[np.ndarray, np.ndarray]:
    """Pool the two blocks of the steepest segment (their rows' mean score and mean label) until no
    segment rises faster than `max_slope`. Served scores differ between runtimes by float32
    rounding (PyTorch vs onnxruntime, ~1e-6), and a segment of slope s multiplies that by s: two
    one-row blocks 1e-6 apart gave slopes of 10^4 on a 12,000-row validation split. Pooling blocks
    keeps the fit monotone and is what PAV itself does to violators."""
    x, y, rows = list(x), list(y), list(rows)
    while len(x) > 1:
        slopes = np.diff(y) / np.maximum(np.diff(x), 1e-300)
        i = int(np.argmax(slopes))
        if slopes[i] <= max_slope:
            break
        w = rows[i] + rows[i + 1]
        x[i : i + 2] = [(x[i] * rows[i] + x[i + 1] * rows[i + 1]) / w]
        y[i : i + 2] = [(y[i] * rows[i] + y[i + 1] * rows[i + 1]) / w]
        rows[i : i + 2] = [w]
    return np.asarray(x), np.asarray(y)


def fit_platt(p: np.ndarray, y: np.ndarray, iterations: int = 100) -> tuple[float, float]:
    """(a, b) of sigmoid(a · logit(p) + b), maximum likelihood by Newton's method, with a >= 0:
    a calibrator never reverses the model's order (where the likelihood wants a < 0, e.g. on a
    tiny validation split, a = 0 and b = logit of the observed rate)."""
    pc = np.clip(np.asarray(p, np.float64), EPS, 1 - EPS)
    z = np.log(pc) - np.log1p(-pc)
    y = np.asarray(y, np.float64)
    a, b = 1.0, 0.0

    def nll(a: float, b: float) -> float:  # the negative log-likelihood, stable for any a · z + b
        t = a * z + b
        return float(np.sum(np.logaddexp(0.0, t) - y * t))

    for _ in range(iterations):
        t = np.clip(a * z + b, -500, 500)
        q = 1.0 / (1.0 + np.exp(-t))
        g = np.array([np.dot(q - y, z), np.sum(q - y)])
        w = q * (1 - q)
        h = np.array([[np.dot(w, z * z), np.dot(w, z)], [np.dot(w, z), np.sum(w)]]) + 1e-12 * np.eye(2)
        step = np.linalg.solve(h, g)
        # backtracking: a full Newton step can overshoot where the Hessian is nearly singular
        # (measured: a = 2e15 on a 1,000-row validation split of a weak, down-sampled model)
        current, scale = nll(a, b), 1.0
        while scale > 1e-8 and not nll(a - scale * step[0], b - scale * step[1]) <= current:
            scale /= 2
        a, b = a - scale * step[0], b - scale * step[1]
        if np.max(np.abs(scale * step)) < 1e-10:
            break
    if not (np.isfinite(a) and np.isfinite(b)) or a < 0:
        rate = np.clip(y.mean(), EPS, 1 - EPS)
        a, b = 0.0, float(np.log(rate) - np.log1p(-rate))
    return float(a), float(b)


def fit_logit_offsets(logits: np.ndarray, labels: np.ndarray, rate: float, missing: int) -> list[float]:
    """Per task t, the shift δ_t of its logits after which the down-sampling correction's mean over
    the rows labelled for t equals their observed rate (models.scoring: why). logits, labels
    [n, T] of unsampled rows (the validation split), `missing` marks an unknown label.

    Task 0's corrected score is sigmoid(z_0 + δ_0 + log r), a task t's is sigmoid(z_t + δ_t) · c
    with c = r / (1 − q_0 + r · q_0) fixed once δ_0 is: each mean rises monotonically with its δ,
    so bisection finds it (to 1e-9 in 60 halvings of [-20, 20])."""
    z = np.asarray(logits, np.float64).reshape(len(logits), -1)
    lab = np.asarray(labels).reshape(len(labels), -1)
    offsets: list[float] = []
    c = None
    for t in range(z.shape[1]):
        known = lab[:, t] != missing
        zt, target = z[known, t], float(lab[known, t].sum())

        def corrected_sum(d: float) -> float:
            if t == 0:
                return float(_sigmoid(zt + d + np.log(rate)).sum())
            return float((_sigmoid(zt + d) * c[known]).sum())

        lo, hi = -20.0, 20.0
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if corrected_sum(mid) < target else (lo, mid)
        offsets.append((lo + hi) / 2)
        if t == 0:
            q0 = _sigmoid(z[:, 0] + offsets[0])
            c = rate / (1 - q0 + rate * q0)
    return offsets


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1 + np.tanh(0.5 * z))  # no overflow warnings at large |z|


def fit_calibrator(method: str, p: np.ndarray, y: np.ndarray, max_slope: float = np.inf) -> dict[str, Any]:
    """One task's calibrator entry (models.scoring) fitted on probabilities p and labels y."""
    if method == "isotonic":
        x, v = fit_centered_isotonic(p, y, max_slope)
        return {"method": "isotonic", "x": x.tolist(), "y": v.tolist()}
    if method == "platt":
        a, b = fit_platt(p, y)
        return {"method": "platt", "a": a, "b": b}
    return {"method": "none"}


def calibration_spec(
    tasks: list[str], rate: float, method: str, calibrators: Optional[list[dict]] = None, offsets: Optional[list[float]] = None,
) -> dict[str, Any]:
    """The calibration.json of a run (models.scoring.ScoreHead reads it)."""
    entries = calibrators or [{"method": "none"} for _ in tasks]
    return {
        "format": CALIBRATION_FORMAT,
        "version": CALIBRATION_VERSION,
        "tasks": list(tasks),
        "negative_sampling_rate": float(rate),
        **({"logit_offsets": list(offsets)} if offsets is not None else {}),
        "sampling_task": tasks[0],
        "method": method,
        "fitted_on": "valid" if method != "none" else None,
        "calibrators": [{"task": t, **e} for t, e in zip(tasks, entries)],
    }
