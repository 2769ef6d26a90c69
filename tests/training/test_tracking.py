"""--log tensorboard|mlflow: each evaluation's record reaches the tracker; off means no effect."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
import types

import pytest

from masknet.cli import main
from masknet.training.tracking import scalars

TINY = ["--epochs", "2", "--quiet", "--set", "data.synthetic.rows=2000", "--set", "model.block_dim=8",
        "--set", "model.num_blocks=1", "--set", "train.threads=1", "--set", "train.batch_size=256",
        "--set", "model.linear_term=false"]  # one phase: the tracked history is the plain one


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_tensorboard_gets_every_evaluation_and_changes_nothing(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert main(["train", *TINY, "--log", "tensorboard", "--output", str(tmp_path / "tb")]) == 0
    assert main(["train", *TINY, "--output", str(tmp_path / "plain")]) == 0
    assert not (tmp_path / "plain" / "tensorboard").exists()
    # tracking has no effect on training: the same weights and metrics
    assert _sha(tmp_path / "tb" / "model.safetensors") == _sha(tmp_path / "plain" / "model.safetensors")
    strip = lambda m: {k: v for k, v in m.items() if k not in ("train_seconds", "samples_per_second")}  # noqa: E731
    assert strip(json.loads((tmp_path / "tb" / "metrics.json").read_text())) == strip(
        json.loads((tmp_path / "plain" / "metrics.json").read_text()))

    acc = EventAccumulator(str(tmp_path / "tb" / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/logloss", "valid/auc", "valid/logloss", "lr", "samples_per_second"} <= tags
    log = [json.loads(line) for line in (tmp_path / "tb" / "log.jsonl").read_text().splitlines()]
    auc = acc.Scalars("valid/auc")
    # one point per evaluation (several per epoch on the step schedule), at its global step
    assert len(log) >= 2 and [r["epoch"] for r in log][-1] == 2
    assert [e.step for e in auc] == [r["step"] for r in log]
    assert [e.value for e in auc] == pytest.approx([r["valid_auc"] for r in log], rel=1e-6)
    assert [e.value for e in acc.Scalars("lr")] == pytest.approx([r["lr"] for r in log], rel=1e-6)


def test_missing_package_is_one_line_before_any_folder(tmp_path, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    assert main(["train", *TINY, "--set", "train.mlflow=true", "--output", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "masknet train: error: train.mlflow: needs the mlflow package: pip install mlflow"
    assert not (tmp_path / "run").exists()


def test_mlflow_receives_params_metrics_and_the_end(tmp_path, monkeypatch):
    """Against a stand-in `mlflow` module that records the calls (MLflow itself is not installed
    by the test extras): the calls and arguments masknet makes."""
    calls = []
    fake = types.ModuleType("mlflow")
    fake.start_run = lambda **kw: calls.append(("start_run", kw))
    fake.log_params = lambda p: calls.append(("log_params", p))
    fake.set_tag = lambda k, v: calls.append(("set_tag", k))
    fake.log_metrics = lambda m, step: calls.append(("log_metrics", m, step))
    fake.end_run = lambda status: calls.append(("end_run", status))
    fake.__spec__ = importlib.machinery.ModuleSpec("mlflow", None)
    monkeypatch.setitem(sys.modules, "mlflow", fake)
    assert main(["train", *TINY, "--log", "mlflow", "--output", str(tmp_path / "run")]) == 0
    assert calls[0] == ("start_run", {"run_name": "run"})
    assert calls[1][0] == "log_params" and calls[1][1]["model.block_dim"] == 8
    metrics = [c for c in calls if c[0] == "log_metrics"]
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert len(log) >= 2 and [m[2] for m in metrics] == [r["step"] for r in log]
    assert {"train_logloss", "valid_auc", "valid_logloss", "lr", "samples_per_second"} <= set(metrics[0][1])
    assert calls[-1] == ("end_run", "FINISHED")


def test_records_with_more_keys_pass_through():
    """The trainer's record gains keys (a step schedule, say): they are logged, at `step`."""
    rec = {"epoch": 1, "step": 250, "train_logloss": 0.5, "valid_auc": 0.7, "lr": 5e-4, "eval_rows": 100,
           "best_epoch": 1, "note": "text", "flag": True}
    assert scalars(rec, lr=1e-3) == {"train/logloss": 0.5, "valid/auc": 0.7, "lr": 5e-4, "eval_rows": 100.0}


def test_multitask_records_log_each_task():
    """A multi-task run's record nests each task's validation metrics: one scalar per task."""
    rec = {"epoch": 1, "valid_auc": 0.7, "tasks": {"click": {"valid_auc": 0.7, "valid_logloss": 0.4},
                                                   "purchase": {"valid_auc": 0.8, "valid_logloss": 0.1}}}
    assert scalars(rec, lr=1e-3) == {"valid/auc": 0.7, "lr": 1e-3, "valid/auc/click": 0.7, "valid/logloss/click": 0.4,
                                     "valid/auc/purchase": 0.8, "valid/logloss/purchase": 0.1}
