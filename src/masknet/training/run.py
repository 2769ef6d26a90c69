"""A training run: config in, run folder out.

The run folder's files (config.yaml, model.json, model.safetensors, dataset.json, metrics.json,
log.jsonl, encoder.json, calibration.json, reliability.png, manifest.json, checkpoints/) are
described, written, sealed and loaded by masknet.runs (`RunFolder`); this module trains and writes
through it. metrics.json holds {"valid": {auc, logloss}, "test": {auc, logloss}, "oracle_auc",
"train_seconds", "samples_per_second", "best_epoch", "model", "kernels" (GEMM kernel and embedding
update, docs/performance.md), ["relaimp", "base_run"], "tasks": {<label>: {"valid": {...}, "test":
{...}}}, "calibration": {...}} (the top-level valid/test/oracle_auc describe the first label; "tasks"
every label with calibration measures, training/evaluation.py). log.jsonl has one line per
evaluation (and an {"event": "resume"} line where a resume changed settings; multi-task: each task's
validation AUC and log loss too).

When a folder may be used, overwritten or resumed: training/runfolder.py.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Optional, Sequence

import torch

from ..config import RunConfig, apply_override, load_config
from ..data.dataset import CTRDataset, load_prepared
from ..data.synthetic import generate
from ..errors import ConfigError, UserError
from ..models import REGISTRY, CTRModel, build_model, with_size_defaults
from ..models.layers import gemm_backend
from ..models.scoring import CALIBRATION_FILE
from ..runs import RELIABILITY, RunFolder
from ..runs import load_model, read_model_spec  # noqa: F401 (masknet.runs' loader, imported from here by older code)
from . import runfolder
from .checkpoint import Resumable, check_loadable, find_resumable, latest_checkpoint, remove_stale_temp
from .distributed import DistContext, barrier, init_from_env
from .evaluation import TaskReport, reliability_png, report
from .metrics import auc, relaimp
from .tasks import check_tasks, select_tasks
from .tracking import check_available as check_trackers, open_trackers
from .trainer import FitResult, TrainingDiverged, embedding_update, evaluate, fit, seed_everything, with_model_defaults


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
    path = RunFolder(base_run).metrics
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
    check_trackers(cfg)  # a tracker that is not installed: one line, before the run folder exists
    base_auc = read_base_auc(cfg.base_run) if cfg.base_run else None  # fail before training, not after
    data = data if data is not None else load_data(cfg)  # a bad data path fails before the run folder is touched
    given = cfg.data.path
    if cfg.data.path:
        cfg.data.path = os.path.realpath(cfg.data.path)  # a resume from another directory finds the same data
    identity = runfolder.data_identity(cfg, data, given)
    data = select_tasks(data, cfg.train.tasks)
    # settings left to the model that depend on the data's size (MaskNets' dropout below 20,000 train rows)
    cfg.model = with_size_defaults(cfg.model, len(data.splits["train"]))  # config.yaml records the values used
    cfg.train = with_model_defaults(cfg.train, REGISTRY[cfg.model.name], cfg.model)  # as the model's settings ask
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
    """The run, once its folder is locked: check the folder, build the model, write the record,
    fit, evaluate, write the bundle."""
    found, resumes, earlier = _check_folder(cfg, out, identity, resume, overwrite, log)  # every rank alike
    barrier(ctx)
    seed_everything(cfg.train.seed)
    model = _build(cfg, data)  # identical on every rank
    if found is not None:  # before the record changes: a checkpoint that cannot load leaves it as it was
        check_loadable(found.path, model)
    log_file = _write_record(cfg, out, ctx, found, resumes, earlier, log)  # rank 0 alone changes the folder
    rank_seeds = [cfg.train.seed + 1_000_003 * r for r in range(ctx.world_size)]
    if ctx.enabled:
        seed_everything(rank_seeds[ctx.rank])  # dropout differs per rank, repeatably
    _announce(cfg, data, model, out, found, resumes, log)
    with log_file:
        result = _fit_logged(cfg, data, model, out, ctx, found, resumes, identity, log_file, log)
    tasks_report = report(model, data, cfg.train, ctx)
    metrics = _run_metrics(cfg, data, model, result, tasks_report, ctx, base_auc, rank_seeds)
    if not ctx.is_main:  # only rank 0 writes the run folder and the bundle
        return RunResult(out, metrics, model)
    write_bundle(out, model, cfg, data, metrics, tasks_report)
    test = metrics["test"]
    oracle = f"  (oracle {metrics['oracle_auc']:.4f})" if "oracle_auc" in metrics else ""
    rel = f"  RelaImp {metrics['relaimp']:+.2%}" if "relaimp" in metrics else ""
    log(f"best epoch {result.best_epoch}: test AUC {test['auc']:.4f}  logloss {test['logloss']:.4f}{oracle}{rel}")
    for line in _task_lines(metrics):
        log(line)
    return RunResult(out, metrics, model)


def _check_folder(
    cfg: RunConfig, out: Path, identity: dict[str, Any], resume: bool, overwrite: bool, log: Any
) -> tuple[Optional[Resumable], list[dict[str, Any]], list[Path]]:
    """(the checkpoint to resume, the resume events, an earlier run's files to delete); refuses a
    folder the run may not use (training/runfolder.py's rules). Reads only."""
    if not resume:
        return None, [], runfolder.check_new_run_folder(out, overwrite)
    found = find_resumable(out, warn=log)  # every rank reads the same checkpoint
    if found is None:
        raise UserError(f"{out}: no complete checkpoint to resume from")
    return found, runfolder.check_resume(cfg, found, out, identity, log), []


def _write_record(
    cfg: RunConfig, out: Path, ctx: DistContext, found: Optional[Resumable], resumes: list[dict[str, Any]],
    earlier: list[Path], log: Any,
) -> IO[str]:
    """Rank 0: clear an earlier run or a killed write's leftovers, write config.yaml; the open
    log.jsonl (os.devnull on other ranks)."""
    folder = RunFolder(out)
    with runfolder.folder_errors(out):
        if ctx.is_main and found is not None:
            for p in remove_stale_temp(out) + runfolder.remove_stale_bundle_temp(out):
                log(f"removed {p}, left by a write that was killed")
            if resumes != found.meta.get("resumes", []):
                runfolder.write_config(cfg, folder.config, resumes)
        elif ctx.is_main:
            runfolder.clear_earlier_run(out, earlier, log)
            runfolder.write_config(cfg, folder.config, [])
        return open(folder.log, "w") if ctx.is_main else open(os.devnull, "w")


def _announce(
    cfg: RunConfig, data: CTRDataset, model: CTRModel, out: Path, found: Optional[Resumable], resumes: list[dict[str, Any]], log: Any
) -> None:
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


def _fit_logged(
    cfg: RunConfig, data: CTRDataset, model: CTRModel, out: Path, ctx: DistContext, found: Optional[Resumable],
    resumes: list[dict[str, Any]], identity: dict[str, Any], log_file: IO[str], log: Any,
) -> FitResult:
    """`fit`, each evaluation written to log.jsonl, the console and the trackers as it happens."""
    with open_trackers(cfg, out, ctx.is_main) as trackers:
        if found is not None:  # the log is rewritten from the checkpoint's own history
            with runfolder.folder_errors(out):
                log_file.writelines(json.dumps(r) + "\n" for r in runfolder.log_records(found.history, resumes))
                log_file.flush()

        def on_eval(record: dict) -> None:
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
            return fit(
                model, data, cfg.train, on_eval, run_dir=out, resume_from=found.path if found else None, ctx=ctx,
                checkpoint_meta=runfolder.checkpoint_meta(cfg, resumes, identity),
            )
        except TrainingDiverged as exc:  # advice that works for this run folder
            raise TrainingDiverged(exc.where, runfolder.nan_advice(out, cfg, ctx.world_size)) from None


def _run_metrics(
    cfg: RunConfig, data: CTRDataset, model: CTRModel, result: FitResult, tasks_report: TaskReport, ctx: DistContext,
    base_auc: Optional[float], rank_seeds: list[int],
) -> dict[str, Any]:
    """metrics.json: the best evaluation's validation metrics, the test split's, and how the run ran."""
    head = tasks_report.head.without_calibrators()
    test = _first_task(evaluate(model, data.splits["test"], cfg.train.eval_batch_size, ctx, head, data.task_names))
    metrics: dict[str, Any] = {
        "model": cfg.model.name,
        "valid": _first_task(result.best_valid),
        "test": test,
        "best_epoch": result.best_epoch,
        "best_step": result.best_step,
        "batch_size": result.batch_size,
        "train_seconds": result.train_seconds,
        "samples_per_second": result.samples_per_second,
        "parameters": sum(p.numel() for p in model.parameters()),
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
    metrics["calibration"] = dict(tasks_report.summary, reliability_png=RELIABILITY)
    # what ran the step (docs/performance.md): the GEMM kernel and the embedding tables' update
    metrics["kernels"] = {
        "gemm": gemm_backend() if ctx.device == "cpu" else "torch",
        "embedding_update": embedding_update(cfg.train.sparse_embeddings and ctx.sparse_allreduce),
    }
    return metrics


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
    folder = RunFolder(out)
    try:
        folder.unseal()  # unsealed until every file is rewritten
        folder.write_model(model, cfg.model, data, data_path=cfg.data.path)
        if tasks_report.spec is not None:
            folder.write_json(CALIBRATION_FILE, tasks_report.spec)
        title = f"{cfg.model.name} on {_data_name(cfg, data)}: test split"
        folder.write_bytes(RELIABILITY, reliability_png(tasks_report.curves, title))
        folder.write_metrics(metrics)
        folder.seal()
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


def resume_run(run: str | Path, log: Any = print, overrides: Sequence[str] = ()) -> RunResult:
    """Continue an interrupted run from its latest intact checkpoint, with its own saved config.
    `overrides` ("train.lr=1e-4", ...) may set the keys in runfolder.RESUMABLE, and only those."""
    run = Path(run)
    if not RunFolder(run).config.is_file():
        raise UserError(f"{run}: not a run folder (no config.yaml)")
    cfg = load_config(RunFolder(run).config)
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
