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
import os
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
from ..models import REGISTRY, CTRModel, build_model
from .metrics import auc, relaimp
from .checkpoint import latest_checkpoint
from .distributed import init_from_env
from .trainer import evaluate, fit, seed_everything, with_model_defaults


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
        value = float(json.loads(path.read_text())["test"]["auc"])
    except (KeyError, TypeError, ValueError, json.JSONDecodeError):
        raise UserError(f"{path}: no test AUC in the base run's metrics") from None
    if not value > 0.5:  # RelaImp divides by AUC(base) - 0.5
        raise UserError(f"{path}: the base run's test AUC is {value:.4f}; RelaImp (Eq. 20) needs a base above 0.5")
    return value


def train_run(cfg: RunConfig, data: Optional[CTRDataset] = None, log: Any = print, resume: bool = False) -> RunResult:
    """Train `cfg.model` on `cfg.data` and write the run folder. Returns its metrics."""
    cfg.validate()
    cfg.train = with_model_defaults(cfg.train, REGISTRY[cfg.model.name])  # config.yaml records the values used
    base_auc = read_base_auc(cfg.base_run) if cfg.base_run else None  # fail before training, not after
    data = data if data is not None else load_data(cfg)
    ctx = init_from_env(cfg.train.device)  # rank 0 of 1 unless launched by torchrun
    if not ctx.is_main:
        log = _quiet
    if ctx.enabled and not cfg.output:
        raise UserError("a multi-process run needs --output (every rank must agree on the run folder)")
    out = Path(cfg.output) if cfg.output else default_output(cfg)
    checkpoint = None
    if resume:
        checkpoint = latest_checkpoint(out)
        if checkpoint is None:
            raise UserError(f"{out}: no complete checkpoint to resume from")
    elif ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")

    seed_everything(cfg.train.seed)
    model = build_model(cfg.model, data.cardinalities)  # identical on every rank
    rank_seeds = [cfg.train.seed + 1_000_003 * r for r in range(ctx.world_size)]
    if ctx.enabled:
        seed_everything(rank_seeds[ctx.rank])  # dropout differs per rank, repeatably
    n_params = sum(p.numel() for p in model.parameters())
    log(
        f"{cfg.model.name}: {n_params:,} parameters; data: {data.meta.get('source', {}).get('name', cfg.data.path)} "
        f"(train {len(data.splits['train']):,} / valid {len(data.splits['valid']):,} / test {len(data.splits['test']):,} rows, "
        f"{data.num_fields} fields); run folder: {out}"
    )
    if checkpoint is not None:
        log(f"resuming from {checkpoint}")
    with open(out / "log.jsonl", "w") if ctx.is_main else open(os.devnull, "w") as log_file:
        if checkpoint is not None:  # the log is rewritten from the checkpoint's own history
            history = json.loads((checkpoint / "state.json").read_text())["history"]
            log_file.writelines(json.dumps(r) + "\n" for r in history)

        def on_epoch(record: dict) -> None:
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()
            log(
                f"epoch {record['epoch']} step {record['step']}: train logloss {record['train_logloss']:.4f}  "
                f"valid AUC {record['valid_auc']:.4f}  logloss {record['valid_logloss']:.4f}  "
                f"({record['samples_per_second']:,.0f} samples/s)"
            )

        result = fit(model, data, cfg.train, on_epoch, run_dir=out, resume_from=checkpoint, ctx=ctx)

    test = evaluate(model, data.splits["test"], cfg.train.eval_batch_size, ctx)
    metrics: dict[str, Any] = {
        "model": cfg.model.name,
        "valid": result.best_valid,
        "test": test,
        "best_epoch": result.best_epoch,
        "best_step": result.best_step,
        "batch_size": result.batch_size,
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
    if ctx.enabled:
        metrics["distributed"] = {
            "world_size": ctx.world_size, "backend": ctx.backend, "rank_seeds": rank_seeds,
            "sparse_embedding_gradients": ctx.sparse_allreduce and cfg.train.sparse_embeddings,
        }
    metrics["device"] = ctx.device
    if not ctx.is_main:  # only rank 0 writes the run folder and the bundle
        return RunResult(out, metrics, model)
    save_model(out, model, cfg.model, data, data_path=cfg.data.path)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    from ..serving.bundle import write_manifest  # lazy: serving imports this module

    write_manifest(out)
    oracle = f"  (oracle {metrics['oracle_auc']:.4f})" if "oracle_auc" in metrics else ""
    rel = f"  RelaImp {metrics['relaimp']:+.2%}" if "relaimp" in metrics else ""
    log(f"best epoch {result.best_epoch}: test AUC {test['auc']:.4f}  logloss {test['logloss']:.4f}{oracle}{rel}")
    return RunResult(out, metrics, model)


def _quiet(*_: Any) -> None:
    pass


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
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"))


def resume_run(run: str | Path, log: Any = print) -> RunResult:
    """Continue an interrupted run from its latest checkpoint, with its own saved config."""
    from ..config import load_config

    run = Path(run)
    if not (run / "config.yaml").is_file():
        raise UserError(f"{run}: not a run folder (no config.yaml)")
    cfg = load_config(run / "config.yaml")
    cfg.output = str(run)
    return train_run(cfg, log=log, resume=True)


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
