"""Experiment tracking: each evaluation's record to TensorBoard and/or MLflow (optional).

    masknet train --log tensorboard        # or --set train.tensorboard=true: RUN/tensorboard/ event files
    masknet train --log mlflow             # or --set train.mlflow=true: an MLflow run (MLFLOW_TRACKING_URI)

A consumer of the trainer's per-evaluation callback (`on_epoch` in run.py): whatever numbers the
record holds are written (train/logloss, valid/auc, valid/logloss, samples_per_second, ...; new
keys of the record appear on their own), plus the learning rate, at the record's `step` when it
has one, else its `epoch`. Off by default; when off nothing is imported or written. A missing
package is a one-line error before training starts.
"""

from __future__ import annotations

import contextlib
import importlib.util
from pathlib import Path
from typing import Any, Optional

from ..errors import ConfigError

NOT_LOGGED = ("epoch", "step", "best_epoch")  # positions, not measurements


def _need(package: str, key: str, pip_name: str) -> None:
    if importlib.util.find_spec(package) is None:
        raise ConfigError(f"{key}: needs the {pip_name} package: pip install {pip_name}")


def check_available(cfg: Any) -> None:
    """Fail before anything is written if a tracker the config asks for is not installed."""
    if cfg.train.tensorboard:
        _need("tensorboard", "train.tensorboard", "tensorboard")
    if cfg.train.mlflow:
        _need("mlflow", "train.mlflow", "mlflow")


def scalars(record: dict[str, Any], lr: float) -> dict[str, float]:
    """The record's numbers under tracker names: train_logloss -> train/logloss, ..."""
    out = {}
    for key, value in record.items():
        if key in NOT_LOGGED or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        name = key.replace("_", "/", 1) if key.startswith(("train_", "valid_", "test_")) else key
        out[name] = float(value)
    out.setdefault("lr", float(record.get("lr", lr)))
    return out


class Trackers:
    """The trackers a run's config asks for; `log(record)` per evaluation, `close()` at the end."""

    def __init__(self, cfg: Any, run_dir: Path, enabled: bool = True):
        self.lr = cfg.train.lr
        self.tb = None
        self.mlflow = None
        if not enabled:
            return
        check_available(cfg)
        if cfg.train.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))
        if cfg.train.mlflow:
            import mlflow

            self.mlflow = mlflow
            mlflow.start_run(run_name=Path(run_dir).name)
            mlflow.log_params(_flat(cfg.to_dict()))
            mlflow.set_tag("masknet.run_dir", str(Path(run_dir).resolve()))

    @property
    def active(self) -> bool:
        return self.tb is not None or self.mlflow is not None

    def log(self, record: dict[str, Any]) -> None:
        if not self.active:
            return
        step = int(record.get("step", record.get("epoch", 0)))
        values = scalars(record, self.lr)
        if self.tb is not None:
            for name, value in values.items():
                self.tb.add_scalar(name, value, step)
            self.tb.flush()
        if self.mlflow is not None:
            self.mlflow.log_metrics({n.replace("/", "_"): v for n, v in values.items()}, step=step)

    def close(self, status: Optional[str] = None) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.mlflow is not None:
            self.mlflow.end_run(status=status or "FINISHED")


@contextlib.contextmanager
def open_trackers(cfg: Any, run_dir: Path, enabled: bool = True):
    """The run's trackers (none unless the config asks; `enabled=False` on non-main ranks),
    closed however training ends; an MLflow run that raised is marked FAILED."""
    trackers = Trackers(cfg, run_dir, enabled and (cfg.train.tensorboard or cfg.train.mlflow))
    try:
        yield trackers
    except BaseException:
        trackers.close("FAILED")
        raise
    trackers.close()


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
