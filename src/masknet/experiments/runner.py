"""Run a plan's cells through training.run.train_run, saving each cell's result as it finishes.

OUT/cells/<id>/        the cell's run folder (config.yaml, metrics.json, log.jsonl, model.safetensors)
OUT/cells/<id>/result.json   written last, atomically: the cell is finished. Resume skips such cells
                       (unless the cell's resolved config changed, then it is re-run).
OUT/train.log          every cell's training log (epochs, AUCs)
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

from ..config import TRAIN_BOOKKEEPING, RunConfig
from ..data.dataset import CTRDataset, load_prepared
from ..data.synthetic import generate
from ..data.synthetic import source as synthetic_source
from ..errors import UserError
from ..training.run import train_run
from .plan import Cell, Plan

RESULT_FILE = "result.json"


def load_dataset(cfg: RunConfig, fields: Optional[list[str]] = None) -> CTRDataset:
    """Load the data once for every cell; `fields` keeps only those fields (the quick preset's synthetic data)."""
    data = load_prepared(cfg.data.path) if cfg.data.path else generate(cfg.data.synthetic.rows, cfg.data.synthetic.seed, cfg.data.synthetic.multi_valued)
    if fields:
        return select_fields(data, fields)
    return data


def select_fields(data: CTRDataset, fields: list[str]) -> CTRDataset:
    import numpy as np

    from ..data.dataset import Split

    missing = [f for f in fields if f not in data.field_names]
    if missing:
        raise UserError(f"field {missing[0]!r} is not in the dataset (fields: {', '.join(data.field_names)})")
    idx = [data.field_names.index(f) for f in fields]
    splits = {  # multi-valued fields are kept as they are
        name: Split(np.ascontiguousarray(np.asarray(s.x)[:, idx]), np.asarray(s.y), None if s.p is None else np.asarray(s.p), s.seq, s.seq_weights)
        for name, s in data.splits.items()
    }
    meta = dict(data.meta)
    if isinstance(meta.get("fields"), list) and len(meta["fields"]) == len(data.field_names):
        meta["fields"] = [meta["fields"][i] for i in idx]
    meta["selected_fields"] = list(fields)
    return CTRDataset([data.field_names[i] for i in idx], [data.cardinalities[i] for i in idx], splits, meta, data.multi_valued)


def _comparable(cfg_dict: dict[str, Any]) -> dict[str, Any]:
    d = json.loads(json.dumps(cfg_dict))
    d.pop("output", None)
    for key in TRAIN_BOOKKEEPING:  # threads do not change results enough to force a re-run
        d["train"].pop(key, None)
    return d


def _same_settings(saved: Any, planned: Any) -> bool:
    """Equal on every key both configs have: a key added to RunConfig after the cell ran (with its
    default) does not force a re-run, a changed value does."""
    if isinstance(saved, dict) and isinstance(planned, dict):
        return all(_same_settings(saved[k], planned[k]) for k in saved.keys() & planned.keys())
    return saved == planned


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def data_identity(cfg: RunConfig) -> dict[str, Any]:
    """What data a cell trains on, beyond its config: the generator version of the built-in data,
    or a prepared folder's source (its input files and sizes). A finished cell is reused only if
    this is unchanged, so a new generator or re-prepared data re-runs the cells."""
    if cfg.data.path:
        try:
            return json.loads((Path(cfg.data.path) / "meta.json").read_text()).get("source", {})
        except (OSError, json.JSONDecodeError):
            return {"path": str(cfg.data.path)}
    return synthetic_source(cfg.data.synthetic.rows, cfg.data.synthetic.seed, cfg.data.synthetic.multi_valued)


def read_result(out: Path, cell: Cell, cfg: RunConfig, fields: Optional[list[str]] = None) -> Optional[dict[str, Any]]:
    """The finished result of `cell`, or None if it has to (re-)run."""
    path = out / "cells" / cell.id / RESULT_FILE
    if not path.is_file():
        return None
    try:
        result = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    if not _same_settings(_comparable(result.get("config", {})), _comparable(cfg.to_dict())):
        return None
    if result.get("data_fields") != (list(fields) if fields else None):
        return None
    if result.get("data_source") != json.loads(json.dumps(data_identity(cfg))):
        return None
    return result


def fmt_seconds(s: float) -> str:
    s = int(round(s))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


class Progress:
    """'cell i/N: <id>, ETA ...' lines. The ETA averages this session's finished cells per model."""

    def __init__(self, total: int, quiet: bool, stream=sys.stderr):
        self.total, self.quiet, self.stream = total, quiet, stream
        self.t0 = time.perf_counter()
        self.times: dict[str, list[float]] = {}

    def eta(self, remaining: list[Cell]) -> Optional[float]:
        all_times = [t for ts in self.times.values() for t in ts]
        if not all_times:
            return None
        mean_all = sum(all_times) / len(all_times)
        total = 0.0
        for c in remaining:
            ts = self.times.get(c.model)
            total += sum(ts) / len(ts) if ts else mean_all
        return total

    def say(self, msg: str) -> None:
        if not self.quiet:
            print(msg, file=self.stream, flush=True)


def run_plan(
    plan: Plan,
    out: Path,
    data: Optional[CTRDataset] = None,
    quiet: bool = False,
    on_cell: Optional[Callable[[Cell, dict], None]] = None,
) -> dict[str, dict[str, Any]]:
    """Run every cell not yet finished; return {cell id: result} for all cells."""
    out = Path(out)
    (out / "cells").mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, Any]] = {}
    todo: list[Cell] = []
    for cell in plan.cells.values():
        r = read_result(out, cell, plan.cell_config(cell), plan.fields)
        if r is not None:
            results[cell.id] = r
        else:
            todo.append(cell)
    progress = Progress(len(plan.cells), quiet)
    if results:
        progress.say(f"reproduce: {len(results)} of {len(plan.cells)} cells already finished in {out}/cells; skipping them")
    if todo and data is None:
        data = load_dataset(plan.base, plan.fields)
    log_path = out / "train.log"
    with open(log_path, "a") as log_file:

        def log(msg: str) -> None:
            log_file.write(msg + "\n")
            log_file.flush()

        for i, cell in enumerate(todo):
            done_n = len(results) + 1
            eta = progress.eta(todo[i:])
            eta_s = f"ETA {fmt_seconds(eta)}" if eta is not None else "ETA after the first cell"
            progress.say(
                f"cell {done_n}/{len(plan.cells)}: {cell.id} (table {', '.join(cell.tables)}); "
                f"{len(todo) - i - 1} left after it, {eta_s}"
            )
            cfg = plan.cell_config(cell)
            cfg.output = str(out / "cells" / cell.id)
            cfg.train.progress = False
            if hasattr(cfg.train, "checkpoints"):
                cfg.train.checkpoints = False  # a cell re-runs whole; its per-epoch checkpoints would only cost time
            log(f"=== {cell.id}")
            t0 = time.perf_counter()
            # an unfinished or outdated cell re-runs whole: its folder holds only this runner's files
            (Path(cfg.output) / RESULT_FILE).unlink(missing_ok=True)
            run = train_run(cfg, data=data, log=log, overwrite=True)
            seconds = time.perf_counter() - t0
            m = run.metrics
            result = {
                "id": cell.id,
                "model": cell.model,
                "variant": cell.variant,
                "seed": cell.seed,
                "tables": cell.tables,
                "overrides": cell.overrides,
                "test": m["test"],
                "valid": m["valid"],
                "best_epoch": m["best_epoch"],
                "parameters": m["parameters"],
                "train_seconds": m["train_seconds"],
                "seconds": seconds,
                "oracle_auc": m.get("oracle_auc"),
                "config": cfg.to_dict(),
                "data_fields": list(plan.fields) if plan.fields else None,
                "data_source": data_identity(cfg),
            }
            _write_json_atomic(Path(cfg.output) / RESULT_FILE, result)
            results[cell.id] = result
            progress.times.setdefault(cell.model, []).append(seconds)
            progress.say(
                f"  {cell.id}: test AUC {m['test']['auc']:.4f}  logloss {m['test']['logloss']:.4f}  "
                f"(best epoch {m['best_epoch']}, {fmt_seconds(seconds)})"
            )
            if on_cell is not None:
                on_cell(cell, result)
    # keep the plan's order
    return {cid: results[cid] for cid in plan.cells}
