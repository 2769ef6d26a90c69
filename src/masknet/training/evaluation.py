"""A finished run's per-task report: metrics, calibration, the fitted calibrators.

For every task (one for single-label data): validation and test AUC and log loss, ECE,
predicted/observed ratio overall and per value of a chosen field, reliability bins, and with
an oracle (synthetic data) the true-probability measures; with `train.calibration` a
calibrator per task fitted on the validation split and the test measures after it. The
probabilities are those served: corrected for negative down-sampling (models.scoring).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from ..config import TrainConfig
from ..data.dataset import MISSING_LABEL, CTRDataset, Split
from ..errors import UserError
from ..models.base import CTRModel
from ..models.scoring import ScoreHead
from .calibration import calibration_metrics, calibration_spec, fit_calibrator, fit_logit_offsets, per_field_ratio, reliability
from .distributed import DistContext
from .metrics import auc, logloss
from .tasks import optional_head_spec, predictions_by_task
from .trainer import predict


@dataclass
class TaskReport:
    tasks: dict[str, Any]  # metrics.json's "tasks"
    summary: dict[str, Any]  # metrics.json's "calibration"
    spec: Optional[dict[str, Any]]  # calibration.json (None: scores are plain sigmoids)
    head: ScoreHead
    curves: dict[str, dict[str, list]]  # per task: reliability bins for the diagram


def calibration_field(data: CTRDataset, cfg: TrainConfig) -> tuple[int, str]:
    name = cfg.calibration_field or data.field_names[0]
    if name not in data.field_names:
        raise UserError(f"train.calibration_field: no field {name!r}; fields: {', '.join(data.field_names)}")
    return data.field_names.index(name), name


def _known(split: Split, t: int) -> np.ndarray:
    return split.label_matrix()[:, t] != MISSING_LABEL


def _measures(y: np.ndarray, p: np.ndarray, bins: int, p_true: Optional[np.ndarray] = None) -> dict[str, Any]:
    out = {"auc": auc(y, p), "logloss": logloss(y, p) if len(y) else float("nan"), "rows": int(len(y)), "positives": int(y.sum())}
    out.update(calibration_metrics(y, p, bins, p_true))
    return out


class _Logits:
    """A head for trainer.predict that returns the logits themselves."""

    def __call__(self, logits: torch.Tensor) -> tuple[torch.Tensor]:
        return (logits,)


_LOGITS = _Logits()


def report(model: CTRModel, data: CTRDataset, cfg: TrainConfig, ctx: DistContext = DistContext()) -> TaskReport:
    """Score valid and test, fit the calibrators (cfg.calibration), measure every task."""
    names = data.task_names if data.splits["valid"].labels is not None else data.task_names[:1]
    valid, test = data.splits["valid"], data.splits["test"]
    offsets = None
    if cfg.negative_sampling_rate < 1:  # the intercepts on unsampled held-out rows (models.scoring: why)
        logits = predictions_by_task(predict(model, valid, cfg.eval_batch_size, ctx, _LOGITS))
        offsets = fit_logit_offsets(logits, valid.label_matrix()[:, : len(names)], cfg.negative_sampling_rate, MISSING_LABEL)
    base = ScoreHead(optional_head_spec(cfg.negative_sampling_rate, offsets), len(names))
    u_valid = predictions_by_task(predict(model, valid, cfg.eval_batch_size, ctx, base))
    u_test = predictions_by_task(predict(model, test, cfg.eval_batch_size, ctx, base))
    calibrators = None
    if cfg.calibration != "none":
        calibrators = []
        for t in range(len(names)):
            k = _known(valid, t)
            calibrators.append(fit_calibrator(cfg.calibration, u_valid[k, t], valid.label_matrix()[k, t], cfg.calibration_max_slope))
    spec = None
    if cfg.calibration != "none" or cfg.negative_sampling_rate < 1:
        spec = calibration_spec(names, cfg.negative_sampling_rate, cfg.calibration, calibrators, offsets)
    head = ScoreHead(spec, len(names))
    c_test = head.calibrate(torch.from_numpy(u_test.astype(np.float32))).double().numpy() if head.calibrated else None
    field_index, field_name = calibration_field(data, cfg)
    oracle = test.prob_matrix()
    bins = cfg.calibration_bins
    tasks, curves = {}, {}
    for t, name in enumerate(names):
        kv, kt = _known(valid, t), _known(test, t)
        yv, yt = valid.label_matrix()[kv, t], test.label_matrix()[kt, t]
        p_true = None if oracle is None else np.asarray(oracle[kt, t], np.float64)
        values = np.asarray(test.x[:, field_index])[kt]
        entry = {"valid": _measures(yv, u_valid[kv, t], bins), "test": _measures(yt, u_test[kt, t], bins, p_true)}
        entry["test"]["per_field"] = per_field_ratio(yt, u_test[kt, t], values)
        curves[name] = {"uncalibrated": reliability(yt, u_test[kt, t], bins, p_true)}
        if p_true is not None:
            entry["test"]["oracle_auc"] = auc(yt, p_true)
            entry["test"]["oracle_ece"] = calibration_metrics(yt, p_true, bins)["ece"]  # the labels' noise floor
        if c_test is not None:
            cal = _measures(yt, c_test[kt, t], bins, p_true)
            cal["per_field"] = per_field_ratio(yt, c_test[kt, t], values)
            entry["test"]["calibrated"] = cal
            curves[name]["calibrated"] = reliability(yt, c_test[kt, t], bins, p_true)
        entry["test"]["reliability"] = curves[name]["uncalibrated"]
        tasks[name] = entry
    summary = {
        "method": cfg.calibration,
        "bins": bins,
        "binning": "equal-mass",
        "field": field_name,
        "negative_sampling_rate": cfg.negative_sampling_rate,
        **({"logit_offsets": offsets} if offsets is not None else {}),
        "fitted_on": "valid" if cfg.calibration != "none" else None,
    }
    return TaskReport(tasks, summary, spec, head, curves)


def reliability_png(curves: dict[str, dict[str, list]], title: str) -> bytes:
    """The reliability diagram as PNG bytes: one panel per task, the observed rate (and the mean
    true probability) against the mean prediction in each bin."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(4.6 * len(curves), 4.4), squeeze=False)
    for ax, (task, c) in zip(axes[0], curves.items()):
        hi = max(max(b["predicted"], b["observed"]) for kind in c.values() for b in kind)
        hi = min(1.0, hi * 1.05 + 1e-3)
        ax.plot([0, hi], [0, hi], color="0.6", lw=1, ls="--", label="perfect calibration")
        styles = {"uncalibrated": ("tab:blue", "o"), "calibrated": ("tab:orange", "s")}
        for kind, bins in c.items():
            color, marker = styles[kind]
            ax.plot([b["predicted"] for b in bins], [b["observed"] for b in bins], marker=marker, color=color, label=f"{kind}: observed rate")
            if "true" in bins[0]:
                ax.plot([b["predicted"] for b in bins], [b["true"] for b in bins], marker=marker, color=color, ls=":",
                        mfc="none", label=f"{kind}: mean true probability")
        ax.set_xlim(0, hi)
        ax.set_ylim(0, hi)
        ax.set_xlabel("mean predicted probability (equal-mass bins)")
        ax.set_ylabel("observed rate")
        ax.set_title(f"{task}")
        ax.legend(fontsize=7, loc="upper left")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()
