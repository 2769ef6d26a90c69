"""A training run: config in, run folder out.

A run folder holds:
    config.yaml      the resolved RunConfig (re-run with `masknet train --config RUN/config.yaml`; a resume
                     that changes settings appends them as comments)
    model.json       model name, model config, field names and cardinalities (rebuilds the model),
                     and the multi-valued fields when the data has them
    model.safetensors the best epoch's weights (no pickle anywhere)
    dataset.json     the dataset's meta (fields, split sizes, source; the encoder for prepared data)
    metrics.json     {"valid": {auc, logloss}, "test": {auc, logloss}, "oracle_auc", "train_seconds",
                      "samples_per_second", "best_epoch", "model", ["relaimp", "base_run"],
                      "tasks": {<label>: {"valid": {...}, "test": {...}}}, "calibration": {...}}
                     (the top-level valid/test/oracle_auc describe the first label; "tasks" every
                     label with calibration measures, training/evaluation.py)
    log.jsonl        one line per evaluation (and an {"event": "resume"} line where a resume changed settings;
                     multi-task: each task's validation AUC and log loss too)
    reliability.png  reliability diagram of every task on the test split
    calibration.json (with train.calibration or negative down-sampling) how logits become the served
                     scores: models.scoring
    encoder.json     (prepared data only) the fitted encoder: turns raw rows into the model's inputs
    manifest.json    versions and the SHA-256 of every file above (masknet.serving.bundle), written last
    checkpoints/     what --resume continues from (training/checkpoint.py)

When a folder may be used, overwritten or resumed: training/runfolder.py.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from ..config import ModelConfig, RunConfig, apply_override, from_dict, load_config
from ..data.batch import MultiValuedField, check_multi_valued
from ..data.dataset import MAX_CARDINALITY, CTRDataset, load_prepared
from ..data.synthetic import generate
from ..errors import ConfigError, UserError
from ..integrity import write_atomic
from ..models import REGISTRY, CTRModel, build_model
from ..registry import model_names
from ..models.scoring import CALIBRATION_FILE
from . import runfolder
from .checkpoint import check_loadable, find_resumable, latest_checkpoint, remove_stale_temp
from .distributed import DistContext, barrier, init_from_env
from .evaluation import TaskReport, reliability_png, report
from .metrics import auc, relaimp
from .tasks import check_tasks, select_tasks
from .tracking import check_available as check_trackers, open_trackers
from .trainer import TrainingDiverged, evaluate, fit, seed_everything, with_model_defaults


@dataclass
class RunResult:
    path: Path
    metrics: dict[str, Any]
    model: CTRModel


def load_data(cfg: RunConfig) -> CTRDataset:
    if cfg.data.path:
        return load_prepared(cfg.data.path, verify=True)  # SHA-256 of every array once per run: docs/data.md
    syn = cfg.data.synthetic
    return generate(syn.rows, syn.seed, syn.multi_valued, multitask=syn.multitask)


def default_output(cfg: RunConfig, saved_run: Optional[Path] = None) -> Path:
    """runs/<model>-<timestamp>, a new folder. Re-running `saved_run`'s config from inside that
    folder would put runs/ into it: the new run goes beside it instead."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path("runs")
    if saved_run is not None:
        saved = Path(os.path.realpath(saved_run))
        if saved == Path(os.path.realpath(base)) or saved in Path(os.path.realpath(base)).parents:
            base = saved.parent
    path = base / f"{cfg.model.name}-{stamp}"
    n = 1
    while path.exists():
        n += 1
        path = base / f"{cfg.model.name}-{stamp}-{n}"
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


def train_run(
    cfg: RunConfig, data: Optional[CTRDataset] = None, log: Any = print, resume: bool = False, overwrite: bool = False
) -> RunResult:
    """Train `cfg.model` on `cfg.data` and write the run folder. Returns a RunResult(path, metrics, model).

    A new run refuses an output folder that holds an earlier run unless `overwrite` (then that run's
    files are deleted first); `resume` continues the run in `cfg.output` from its newest intact
    checkpoint; either holds the folder's lock until it returns (see training/runfolder.py for the
    rules). A relative `cfg.data.path` is resolved here (the run folder records the absolute one)."""
    cfg.validate()
    cfg.train = with_model_defaults(cfg.train, REGISTRY[cfg.model.name])  # config.yaml records the values used
    check_trackers(cfg)  # a tracker that is not installed: one line, before the run folder exists
    base_auc = read_base_auc(cfg.base_run) if cfg.base_run else None  # fail before training, not after
    data = data if data is not None else load_data(cfg)  # a bad data path fails before the run folder is touched
    given = cfg.data.path
    if cfg.data.path:
        cfg.data.path = os.path.realpath(cfg.data.path)  # a resume from another directory finds the same data
    identity = runfolder.data_identity(cfg, data, given)
    data = select_tasks(data, cfg.train.tasks)
    check_tasks(data, cfg.train, multitask_model=cfg.model.multitask != "none")  # refusals leave no run folder
    ctx = init_from_env(cfg.train.device)  # rank 0 of 1 unless launched by torchrun
    if not ctx.is_main:
        log = _quiet
    if ctx.enabled and not cfg.output:
        raise UserError("a multi-process run needs --output (every rank must agree on the run folder)")
    out = Path(cfg.output) if cfg.output else default_output(cfg)
    lock = _claim(out, ctx, resume)
    try:
        return _train_locked(cfg, data, identity, ctx, out, log, resume, overwrite, base_auc)
    finally:
        if lock is not None:
            lock.release()


def _claim(out: Path, ctx: DistContext, resume: bool) -> Optional[runfolder.RunLock]:
    """Rank 0 takes the run folder's lock (creating the folder for a new run); every rank learns
    whether it could, so that all stop alike."""
    lock, error = None, None
    if ctx.is_main:
        try:
            if not resume:
                runfolder.check_new_run_folder(out, overwrite=True)  # a file, or inside a run: refused before mkdir
                with runfolder.folder_errors(out):
                    out.mkdir(parents=True, exist_ok=True)
            lock = runfolder.lock_run_folder(out)
        except UserError as exc:
            error = exc
    if ctx.enabled:
        failed = torch.tensor([error is not None], dtype=torch.int32, device=ctx.device if ctx.backend == "nccl" else "cpu")
        torch.distributed.broadcast(failed, 0)
        if failed.item() and error is None:
            raise UserError(f"{out}: rank 0 could not take the run folder (its message says why)")
    if error is not None:
        raise error
    return lock


def _train_locked(
    cfg: RunConfig, data: CTRDataset, identity: dict[str, Any], ctx: DistContext, out: Path, log: Any,
    resume: bool, overwrite: bool, base_auc: Optional[float],
) -> RunResult:
    # every rank checks (and refuses) alike, then rank 0 alone changes the folder
    found, resumes, earlier = None, [], []
    if resume:
        found = find_resumable(out, warn=log)  # every rank reads the same checkpoint
        if found is None:
            raise UserError(f"{out}: no complete checkpoint to resume from")
        resumes = runfolder.check_resume(cfg, found, out, identity, log)
    else:
        earlier = runfolder.check_new_run_folder(out, overwrite)
    barrier(ctx)
    seed_everything(cfg.train.seed)
    model = _build(cfg, data)  # identical on every rank
    if found is not None:  # before the record changes: a checkpoint that cannot load leaves it as it was
        check_loadable(found.path, model)
    with runfolder.folder_errors(out):
        if ctx.is_main and resume:
            for p in remove_stale_temp(out) + runfolder.remove_stale_bundle_temp(out):
                log(f"removed {p}, left by a write that was killed")
            if resumes != found.meta.get("resumes", []):
                runfolder.write_config(cfg, out / runfolder.CONFIG_FILE, resumes)
        elif ctx.is_main:
            runfolder.clear_earlier_run(out, earlier, log)
            runfolder.write_config(cfg, out / runfolder.CONFIG_FILE, [])
        log_file = open(out / "log.jsonl", "w") if ctx.is_main else open(os.devnull, "w")
    rank_seeds = [cfg.train.seed + 1_000_003 * r for r in range(ctx.world_size)]
    if ctx.enabled:
        seed_everything(rank_seeds[ctx.rank])  # dropout differs per rank, repeatably
    n_params = sum(p.numel() for p in model.parameters())
    log(
        f"{cfg.model.name}: {n_params:,} parameters; data: {data.meta.get('source', {}).get('name', cfg.data.path)} "
        f"(train {len(data.splits['train']):,} / valid {len(data.splits['valid']):,} / test {len(data.splits['test']):,} rows, "
        f"{data.num_fields} fields); run folder: {out}"
    )
    if found is not None:
        changed = resumes[-1]["changed"] if resumes != found.meta.get("resumes", []) else {}
        changes = "".join(f"; {k}: {c['from']!r} -> {c['to']!r}" for k, c in changed.items())
        log(f"resuming from {found.path}{changes}")
    with log_file, open_trackers(cfg, out, ctx.is_main) as trackers:
        if found is not None:  # the log is rewritten from the checkpoint's own history
            with runfolder.folder_errors(out):
                log_file.writelines(json.dumps(r) + "\n" for r in runfolder.log_records(found.state["history"], resumes))
                log_file.flush()

        def on_epoch(record: dict) -> None:
            with runfolder.folder_errors(out):
                log_file.write(json.dumps(record) + "\n")
                log_file.flush()
            log(
                f"epoch {record['epoch']} step {record['step']}: train logloss {record['train_logloss']:.4f}  "
                f"valid AUC {record['valid_auc']:.4f}  logloss {record['valid_logloss']:.4f}  "
                f"({record['samples_per_second']:,.0f} samples/s)"
                + "".join(f"; {t} AUC {m['valid_auc']:.4f}" for t, m in record.get("tasks", {}).items())
            )
            trackers.log(record)  # TensorBoard / MLflow, when the config asks (training/tracking.py)

        try:
            result = fit(
                model, data, cfg.train, on_epoch, run_dir=out, resume_from=found.path if found else None, ctx=ctx,
                checkpoint_meta=runfolder.checkpoint_meta(cfg, resumes, identity),
            )
        except TrainingDiverged as exc:  # advice that works for this run folder
            raise TrainingDiverged(exc.where, runfolder.nan_advice(out, cfg, ctx.world_size)) from None

    tasks_report = report(model, data, cfg.train, ctx)
    test = _first_task(evaluate(model, data.splits["test"], cfg.train.eval_batch_size, ctx, tasks_report.head.without_calibrators(), data.task_names))
    metrics: dict[str, Any] = {
        "model": cfg.model.name,
        "valid": _first_task(result.best_valid),
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
    metrics["tasks"] = tasks_report.tasks
    metrics["calibration"] = dict(tasks_report.summary, reliability_png="reliability.png")
    if not ctx.is_main:  # only rank 0 writes the run folder and the bundle
        return RunResult(out, metrics, model)
    write_bundle(out, model, cfg, data, metrics, tasks_report)
    oracle = f"  (oracle {metrics['oracle_auc']:.4f})" if "oracle_auc" in metrics else ""
    rel = f"  RelaImp {metrics['relaimp']:+.2%}" if "relaimp" in metrics else ""
    log(f"best epoch {result.best_epoch}: test AUC {test['auc']:.4f}  logloss {test['logloss']:.4f}{oracle}{rel}")
    for line in _task_lines(metrics):
        log(line)
    return RunResult(out, metrics, model)


def _build(cfg: RunConfig, data: CTRDataset) -> CTRModel:
    try:
        return build_model(cfg.model, data.cardinalities, data.multi_valued, tasks=data.task_names)
    except RuntimeError as exc:  # the allocator: tables larger than this machine's memory
        if "alloc" not in str(exc).lower():
            raise
        rows = sum(data.cardinalities) + sum(m.cardinality for m in data.multi_valued)
        raise UserError(
            f"the model does not fit in memory: {rows:,} embedding rows (the sum of the fields' cardinalities) x "
            f"model.embedding_dim={cfg.model.embedding_dim} ({str(exc).strip().splitlines()[0]})"
        ) from None


def write_bundle(
    out: Path, model: CTRModel, cfg: RunConfig, data: CTRDataset, metrics: dict[str, Any], tasks_report: TaskReport
) -> None:
    """The run folder's bundle files, each written atomically, and the manifest last. A full disk
    leaves an unsealed folder and the last checkpoint, from which --resume writes the bundle again."""
    from ..serving.bundle import MANIFEST, write_manifest  # the one upward import (issue #15 item 1)

    try:
        (out / MANIFEST).unlink(missing_ok=True)  # unsealed until every file is rewritten
        save_model(out, model, cfg.model, data, data_path=cfg.data.path)
        if tasks_report.spec is not None:
            write_atomic(out / CALIBRATION_FILE, json.dumps(tasks_report.spec, indent=2).encode())
        title = f"{cfg.model.name} on {_data_name(cfg, data)}: test split"
        write_atomic(out / "reliability.png", reliability_png(tasks_report.curves, title))
        write_atomic(out / "metrics.json", json.dumps(metrics, indent=2).encode())
        write_manifest(out)
    except OSError as exc:
        last = latest_checkpoint(out)
        how = f"; the last checkpoint {last} is intact: make room, then `masknet train --resume {out}` writes it" if last else ""
        raise UserError(f"{out}: could not write the model bundle ({exc.strerror or exc}){how}") from None


def _first_task(m: dict[str, Any]) -> dict[str, Any]:
    """Validation/test metrics without the per-task breakdown (metrics.json has it under "tasks")."""
    return {k: v for k, v in m.items() if k != "tasks"}


def _data_name(cfg: RunConfig, data: CTRDataset) -> str:
    return str(data.meta.get("source", {}).get("name", cfg.data.path))


def _task_lines(metrics: dict[str, Any]) -> list[str]:
    lines = []
    for name, m in metrics["tasks"].items():
        t = m["test"]
        line = f"  {name}: test AUC {t['auc']:.4f}  ECE {t['ece']:.4f}  predicted/observed {t['ratio']:.3f}"
        if "oracle_auc" in t:
            line += f"  (oracle AUC {t['oracle_auc']:.4f}, ECE vs true p {t['ece_true']:.4f})"
        if "calibrated" in t:
            c = t["calibrated"]
            line += f"; {metrics['calibration']['method']}: ECE {c['ece']:.4f}  predicted/observed {c['ratio']:.3f}"
        lines.append(line)
    return lines


def _quiet(*_: Any) -> None:
    pass


def save_model(
    out: Path, model: CTRModel, model_cfg: ModelConfig, data: CTRDataset, data_path: Optional[str | Path] = None
) -> None:
    """Write model.safetensors, model.json, dataset.json and, when the data is a prepared folder
    with an encoder, a copy of its encoder.json (so the run folder alone can encode raw rows).
    Each file atomically (a full disk leaves the old file or none, never a part). Raises OSError."""
    encoder = Path(data_path) / "encoder.json" if data_path else None
    spec = {
        "model": model_cfg.name,
        "model_config": asdict(model_cfg),
        "field_names": data.field_names,
        "cardinalities": data.cardinalities,
        "encoder": "encoder.json" if encoder is not None and encoder.is_file() else None,
        "tasks": data.task_names if data.splits["valid"].labels is not None else data.task_names[:1],
    }
    if data.multi_valued:  # pooled fields after the single-valued ones (data.batch.MultiValuedField)
        spec["multi_valued"] = [m.to_dict() for m in data.multi_valued]
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    write_atomic(out / "model.safetensors", save(state))
    if spec["encoder"]:
        write_atomic(out / "encoder.json", encoder.read_bytes())
    write_atomic(out / "model.json", json.dumps(spec, indent=2).encode())
    write_atomic(out / "dataset.json", json.dumps(data.meta, indent=2, default=str).encode())


def multi_valued_fields(spec: dict[str, Any]) -> list[MultiValuedField]:
    """model.json's multi-valued fields (none for a model without them)."""
    return [MultiValuedField.from_dict(m) for m in spec.get("multi_valued", [])]


def resume_run(run: str | Path, log: Any = print, overrides: Sequence[str] = ()) -> RunResult:
    """Continue an interrupted run from its latest intact checkpoint, with its own saved config.
    `overrides` ("train.lr=1e-4", ...) may set the keys in runfolder.RESUMABLE, and only those."""
    run = Path(run)
    if not (run / runfolder.CONFIG_FILE).is_file():
        raise UserError(f"{run}: not a run folder (no config.yaml)")
    cfg = load_config(run / runfolder.CONFIG_FILE)
    for assignment in overrides:
        key = assignment.split("=", 1)[0].strip()
        if "=" in assignment and key not in runfolder.RESUMABLE:
            raise ConfigError(
                f"--set {key}: cannot change when resuming (the checkpoint belongs to the run's config); a resume "
                f"may set {', '.join(runfolder.RESUMABLE)}; to change anything else start a new run"
            )
        apply_override(cfg, assignment)
    if any(a.split("=", 1)[0].strip() == "train.epochs" for a in overrides) and not any(
        a.split("=", 1)[0].strip() == "train.min_steps" for a in overrides
    ):
        cfg.train.min_steps = 0  # a given epochs is an exact cap, as `masknet train --epochs N`
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
    spec = read_model_spec(spec_path)
    model = build_model(model_config_of(spec_path, spec), spec["cardinalities"], multi_valued_fields(spec), tasks=spec.get("tasks"))
    try:
        model.load_state_dict(load_file(str(weights)))
    except (SafetensorError, RuntimeError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{weights}: weights do not fit model.json ({first})") from None
    model.eval()
    return model


def read_model_spec(path: Path) -> dict[str, Any]:
    """model.json, checked key by key (a UserError naming the file and key): sealing, loading and
    serving all read it through here, so a garbled one is refused before it builds anything."""
    try:
        spec = json.loads(Path(path).read_bytes())
    except IsADirectoryError:
        raise UserError(f"{path}: is a folder, not model.json") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read it: {exc.strerror or exc}") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise UserError(f"{path}: not valid JSON ({exc})") from None

    def bad(key: str, want: str) -> UserError:
        got = f"got {json.dumps(spec.get(key))[:60]}" if key in spec else "missing"
        return UserError(f"{path}: {key}: expected {want}, {got}")

    if not isinstance(spec, dict):
        raise UserError(f"{path}: not a JSON object")
    if spec.get("model") not in model_names():
        raise bad("model", f"one of {', '.join(model_names())}")
    if not isinstance(spec.get("model_config"), dict):
        raise bad("model_config", "an object")
    names, cards = spec.get("field_names"), spec.get("cardinalities")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise bad("field_names", "a non-empty list of names")
    if not isinstance(cards, list) or len(cards) != len(names) or not all(
        isinstance(c, int) and not isinstance(c, bool) and 1 <= c <= MAX_CARDINALITY for c in cards
    ):
        raise bad("cardinalities", f"{len(names)} integers in 1..{MAX_CARDINALITY:,} (one per field name)")
    encoder = spec.get("encoder")
    if encoder is not None and not (isinstance(encoder, str) and encoder and "/" not in encoder and "\\" not in encoder
                                    and encoder not in (".", "..")):
        raise bad("encoder", "null or a file name in the bundle")
    if "multi_valued" in spec:
        try:
            check_multi_valued(spec["multi_valued"])
        except ValueError as exc:
            raise UserError(f"{path}: multi_valued{exc}") from None
    tasks = spec.get("tasks")
    if tasks is not None and not (isinstance(tasks, list) and tasks and all(isinstance(t, str) and t for t in tasks)
                                  and len(set(tasks)) == len(tasks)):
        raise bad("tasks", "a non-empty list of distinct task names")
    if tasks is None and spec["model_config"].get("multitask", "none") != "none":
        raise bad("tasks", "the task names of a multi-task model")
    model_config_of(path, spec)
    return spec


def model_config_of(path: Path, spec: dict[str, Any]) -> ModelConfig:
    try:
        model_cfg = from_dict(ModelConfig, spec["model_config"], prefix="model_config.")
        model_cfg.validate()
    except ConfigError as exc:
        raise UserError(f"{path}: {str(exc).replace('model.', 'model_config.', 1)}") from None
    return model_cfg
