"""A training run: config in, run folder out.

A run folder holds:
    config.yaml      the resolved RunConfig (re-run with `masknet train --config RUN/config.yaml`)
    model.json       model name, model config, field names and cardinalities (rebuilds the model)
    model.safetensors the best epoch's weights (no pickle anywhere)
    dataset.json     the dataset's meta (fields, split sizes, source; the encoder for prepared data)
    metrics.json     {"valid": {auc, logloss}, "test": {auc, logloss}, "oracle_auc", "train_seconds",
                      "samples_per_second", "best_epoch", "model", ["relaimp", "base_run"]}
    log.jsonl        one line per epoch
    encoder.json     (prepared data only) the fitted encoder: turns raw rows into the model's inputs
    manifest.json    versions and the SHA-256 of every file above (masknet.serving.bundle)
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_file, save_file

from ..config import ModelConfig, RunConfig, _from_dict, save_config
from ..data.dataset import CTRDataset, load_prepared
from ..data.synthetic import generate
from ..errors import UserError
from ..models import CTRModel, build_model
from .metrics import auc, relaimp
from .trainer import evaluate, fit, seed_everything


@dataclass
class RunResult:
    path: Path
    metrics: dict[str, Any]
    model: CTRModel


def load_data(cfg: RunConfig) -> CTRDataset:
    if cfg.data.path:
        return load_prepared(cfg.data.path)
    return generate(cfg.data.synthetic.rows, cfg.data.synthetic.seed)


def default_output(cfg: RunConfig) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = Path("runs") / f"{cfg.model.name}-{stamp}"
    n = 1
    while path.exists():
        n += 1
        path = Path("runs") / f"{cfg.model.name}-{stamp}-{n}"
    return path


def read_base_auc(base_run: str) -> float:
    path = Path(base_run) / "metrics.json"
    if not path.is_file():
        raise UserError(f"{path}: base run has no metrics.json (is {base_run} a finished run folder?)")
    try:
        return float(json.loads(path.read_text())["test"]["auc"])
    except (KeyError, TypeError, ValueError, json.JSONDecodeError):
        raise UserError(f"{path}: no test AUC in the base run's metrics") from None


def train_run(cfg: RunConfig, data: Optional[CTRDataset] = None, log: Any = print) -> RunResult:
    """Train `cfg.model` on `cfg.data` and write the run folder. Returns its metrics."""
    cfg.validate()
    base_auc = read_base_auc(cfg.base_run) if cfg.base_run else None  # fail before training, not after
    data = data if data is not None else load_data(cfg)
    out = Path(cfg.output) if cfg.output else default_output(cfg)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")

    seed_everything(cfg.train.seed)
    model = build_model(cfg.model, data.cardinalities)
    n_params = sum(p.numel() for p in model.parameters())
    log(
        f"{cfg.model.name}: {n_params:,} parameters; data: {data.meta.get('source', {}).get('name', cfg.data.path)} "
        f"(train {len(data.splits['train']):,} / valid {len(data.splits['valid']):,} / test {len(data.splits['test']):,} rows, "
        f"{data.num_fields} fields); run folder: {out}"
    )
    with open(out / "log.jsonl", "w") as log_file:

        def on_epoch(record: dict) -> None:
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()
            log(
                f"epoch {record['epoch']}: train logloss {record['train_logloss']:.4f}  "
                f"valid AUC {record['valid_auc']:.4f}  logloss {record['valid_logloss']:.4f}  "
                f"({record['samples_per_second']:,.0f} samples/s)"
            )

        result = fit(model, data, cfg.train, on_epoch)

    test = evaluate(model, data.splits["test"], cfg.train.eval_batch_size)
    metrics: dict[str, Any] = {
        "model": cfg.model.name,
        "valid": result.best_valid,
        "test": test,
        "best_epoch": result.best_epoch,
        "train_seconds": result.train_seconds,
        "samples_per_second": result.samples_per_second,
        "parameters": n_params,
    }
    if data.has_oracle():
        split = data.splits["test"]
        metrics["oracle_auc"] = auc(split.y, split.p)
    if base_auc is not None:
        metrics["relaimp"] = relaimp(test["auc"], base_auc)
        metrics["base_run"] = {"path": str(cfg.base_run), "test_auc": base_auc}
    save_model(out, model, cfg.model, data, data_path=cfg.data.path)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    from ..serving.bundle import write_manifest  # lazy: serving imports this module

    write_manifest(out)
    oracle = f"  (oracle {metrics['oracle_auc']:.4f})" if "oracle_auc" in metrics else ""
    rel = f"  RelaImp {metrics['relaimp']:+.2%}" if "relaimp" in metrics else ""
    log(f"best epoch {result.best_epoch}: test AUC {test['auc']:.4f}  logloss {test['logloss']:.4f}{oracle}{rel}")
    return RunResult(out, metrics, model)


def save_model(
    out: Path, model: CTRModel, model_cfg: ModelConfig, data: CTRDataset, data_path: Optional[str | Path] = None
) -> None:
    """Write model.json, dataset.json, model.safetensors and, when the data is a prepared folder
    with an encoder, a copy of its encoder.json (so the run folder alone can encode raw rows)."""
    encoder = Path(data_path) / "encoder.json" if data_path else None
    spec = {
        "model": model_cfg.name,
        "model_config": asdict(model_cfg),
        "field_names": data.field_names,
        "cardinalities": data.cardinalities,
        "encoder": "encoder.json" if encoder is not None and encoder.is_file() else None,
    }
    if spec["encoder"]:
        shutil.copyfile(encoder, out / "encoder.json")
    (out / "model.json").write_text(json.dumps(spec, indent=2))
    (out / "dataset.json").write_text(json.dumps(data.meta, indent=2, default=str))
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"))


def load_model(run: str | Path, verify: bool = True) -> CTRModel:
    """Rebuild a trained model from a run folder (model.json + model.safetensors).

    With `verify` (default) and a manifest.json in the folder, every file's SHA-256 is checked
    first (a UserError names the first modified, truncated or missing file)."""
    run = Path(run)
    if verify and (run / "manifest.json").is_file():
        from ..serving.bundle import verify_manifest

        verify_manifest(run)
    spec_path, weights = run / "model.json", run / "model.safetensors"
    for p in (spec_path, weights):
        if not p.is_file():
            raise UserError(f"{p}: missing; is {run} a finished run folder?")
    spec = json.loads(spec_path.read_text())
    model_cfg = _from_dict(ModelConfig, spec["model_config"], prefix="model.")
    model = build_model(model_cfg, spec["cardinalities"])
    model.load_state_dict(load_file(str(weights)))
    model.eval()
    return model
