"""From a model's logits to served probabilities: negative down-sampling correction, then an
optional post-hoc calibrator per task (isotonic or Platt). One torch module, used alike by
training-time evaluation, `masknet predict`, the service and the exported ONNX graph.

    q_t = sigmoid(logit_t + δ_t)                            what the model learnt (on sampled data),
                                                            δ_t: its intercept re-estimated (below)
    u_t = q_t · r / (1 − q_0 + r · q_0)                     "uncalibrated": corrected for keeping a
                                                            share r of the rows negative on task 0
    s_t = c_t(u_t)                                          "score": task t's calibrator (or u_t)

The correction is exact for task 0 (it is q / (q + (1 − q) / r), He et al. 2014) and for every task
whose positives are rows positive on task 0 (a conversion after a click): dropping rows negative
on task 0 scales every such task's odds of a kept row by the same factor (docs/calibration.md).
Isotonic: piecewise-linear through the fitted points, constant outside them (as scikit-learn's
IsotonicRegression predicts); Platt: sigmoid(a · logit(u) + b).

The formula assumes q is unbiased on unseen rows of the sampled distribution. An early-stopped
model of the kept rows is not (it scores the negatives it never saw higher than those it trained
on), and the correction multiplies a relative error in q by 1 / (1 − q_0 (1 − r)), about 3 at the
built-in click's q_0 ≈ 0.77: so with down-sampling the bundle also stores `logit_offsets` δ_t, the
intercept shift that makes task t's corrected mean equal its observed rate on the (unsampled)
validation split (training/calibration.fit_logit_offsets; docs/calibration.md has the numbers).

The spec is JSON (`calibration.json` in a run folder; training/calibration.py fits it):
    {"format": "masknet-calibration", "version": 1, "tasks": [...], "negative_sampling_rate": r,
     "logit_offsets": [δ_t, ...] (with r < 1; absent: 0), "method": "isotonic" | "platt" | "none",
     "calibrators": [{"task": ..., "method": "isotonic", "x": [...], "y": [...]} | {"method": "platt",
                     "a": ..., "b": ...} | {"method": "none"}, ...]}
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import torch
from torch import nn

CALIBRATION_FILE = "calibration.json"  # in a run folder (model bundle)
CALIBRATION_FORMAT = "masknet-calibration"
CALIBRATION_VERSION = 1
EPS = 1e-7  # probabilities are clamped to [EPS, 1 - EPS] before a logit


class Isotonic(nn.Module):
    """Piecewise-linear interpolation through increasing knots x with values y; clipped outside.

    Exportable: the segment of each score is found by counting the knots at or below it (a
    comparison and a sum, no search op), then two gathers."""

    def __init__(self, x: Sequence[float], y: Sequence[float]):
        super().__init__()
        if len(x) != len(y) or len(x) == 0:
            raise ValueError("isotonic calibrator: x and y need the same, non-zero length")
        if len(x) == 1:  # a constant: one segment of slope 0
            x, y = [x[0], x[0] + 1.0], [y[0], y[0]]
        self.register_buffer("x", torch.tensor(list(x), dtype=torch.float32))
        self.register_buffer("y", torch.tensor(list(y), dtype=torch.float32))

    def forward(self, p: torch.Tensor) -> torch.Tensor:
        n = self.x.shape[0]
        at_or_below = (p.unsqueeze(-1) >= self.x).sum(-1)  # [B]: knots <= p
        i = (at_or_below - 1).clamp(0, n - 2)
        x0, x1, y0, y1 = self.x[i], self.x[i + 1], self.y[i], self.y[i + 1]
        t = ((p - x0) / (x1 - x0)).clamp(0.0, 1.0)
        return y0 + t * (y1 - y0)


class Platt(nn.Module):
    """sigmoid(a · logit(p) + b)."""

    def __init__(self, a: float, b: float):
        super().__init__()
        self.a, self.b = float(a), float(b)

    def forward(self, p: torch.Tensor) -> torch.Tensor:
        p = p.clamp(EPS, 1 - EPS)
        return torch.sigmoid(self.a * (torch.log(p) - torch.log1p(-p)) + self.b)


def calibrator(entry: dict[str, Any]) -> nn.Module:
    method = entry.get("method", "none")
    if method == "isotonic":
        return Isotonic(entry["x"], entry["y"])
    if method == "platt":
        return Platt(entry["a"], entry["b"])
    if method == "none":
        return nn.Identity()
    raise ValueError(f"unknown calibration method {method!r}")


class ScoreHead(nn.Module):
    """logits [B] (single task) or [B, T] -> (score, uncalibrated), each of the logits' shape."""

    def __init__(self, spec: Optional[dict[str, Any]], num_tasks: int):
        super().__init__()
        spec = spec or {}
        self.rate = float(spec.get("negative_sampling_rate", 1.0))
        offsets = spec.get("logit_offsets")
        if offsets is not None and len(offsets) != num_tasks:
            raise ValueError(f"calibration: {len(offsets)} logit offsets for {num_tasks} tasks")
        self.offsets = [float(o) for o in offsets] if offsets is not None else None
        # [T] (a scalar shape for single-task logits [B]); None: no shift
        self.register_buffer("offset", None if offsets is None else torch.tensor(self.offsets, dtype=torch.float32).reshape(-1 if num_tasks > 1 else ()))
        entries = spec.get("calibrators") or [{"method": "none"}] * num_tasks
        if len(entries) != num_tasks:
            raise ValueError(f"calibration: {len(entries)} calibrators for {num_tasks} tasks")
        self.calibrators = nn.ModuleList(calibrator(e) for e in entries)
        self.calibrated = any(e.get("method", "none") != "none" for e in entries)
        self.log_rate = math.log(self.rate)

    def without_calibrators(self) -> "ScoreHead":
        """The same down-sampling correction, no calibrators (the "uncalibrated" scores)."""
        return ScoreHead({"negative_sampling_rate": self.rate, "logit_offsets": self.offsets}, len(self.calibrators))

    @property
    def identity(self) -> bool:
        """True when scores are plain sigmoids of the logits (no correction, no calibrator)."""
        return self.rate == 1.0 and self.offset is None and not self.calibrated

    def uncalibrated(self, logits: torch.Tensor) -> torch.Tensor:
        if self.offset is not None:
            logits = logits + self.offset.to(logits.dtype)
        q = torch.sigmoid(logits)
        if self.rate == 1.0:
            return q
        q0 = q if q.ndim == 1 else q[:, :1]
        return q * self.rate / (1.0 - q0 + self.rate * q0)

    def calibrate(self, u: torch.Tensor) -> torch.Tensor:
        """Each task's calibrator on its uncalibrated scores u ([B] or [B, T])."""
        if not self.calibrated:
            return u
        if u.ndim == 1:
            return self.calibrators[0](u)
        return torch.stack([c(u[:, t]) for t, c in enumerate(self.calibrators)], dim=1)

    def forward(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        u = self.uncalibrated(logits)
        return self.calibrate(u), u
