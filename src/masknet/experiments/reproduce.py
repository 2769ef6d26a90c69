"""`masknet reproduce`: build the plan, run the cells (resumable), analyse, plot, write the report."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from ..config import RunConfig, apply_override, dotted_keys, load_config
from ..errors import UserError
from . import plots as plots_mod
from . import report
from .analysis import analyse
from .plan import PRESETS, RQ4_MAX_INSTANCES, Plan, format_value, make_plan, plan_models
from .rq4 import analyse as rq4_analyse
from .runner import fmt_seconds, load_dataset, run_plan
from .stats import auc_standard_error


def base_config(preset: str, config_file: Optional[str], data: Optional[str], sets: Sequence[str]) -> tuple[RunConfig, list[str]]:
    """Preset, then the keys of --config FILE, then --data, then each --set."""
    if preset not in PRESETS:
        raise UserError(f"--preset: unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    cfg = RunConfig()
    for key, value in PRESETS[preset]["overrides"].items():
        apply_override(cfg, f"{key}={format_value(value)}")
    applied: list[str] = []
    if config_file:
        load_config(config_file)  # validates the file (unknown keys, types) with a message naming it
        import yaml

        raw = yaml.safe_load(Path(config_file).read_text()) or {}
        for key, value in dotted_keys(raw).items():
            if key in ("output", "base_run", "model.name", "train.seed"):
                continue  # every cell sets its own model, seed and folder
            if value is None and key != "data.path":
                continue
            apply_override(cfg, f"{key}={format_value(value) if value is not None else 'none'}")
            applied.append(f"{key}={format_value(value)}")
    if data:
        cfg.data.path = data
    for assignment in sets:
        apply_override(cfg, assignment)
        applied.append(assignment)
    cfg.model.name = "sermasknet"
    cfg.validate()
    return cfg, applied


def _data_info(cfg: RunConfig, data) -> dict[str, Any]:
    test = data.splits["test"]
    y = np.asarray(test.y)
    pos, neg = int(y.sum()), int(len(y) - y.sum())
    src = data.meta.get("source", {}) if isinstance(data.meta, dict) else {}
    if cfg.data.path:
        name = Path(cfg.data.path).name
        desc = f"prepared dataset `{cfg.data.path}` (source: {src.get('name') or src.get('format') or 'unknown'})"
    else:
        name = f"synthetic-{cfg.data.synthetic.rows // 1000}k"
        desc = (f"built-in synthetic Criteo-like data, {cfg.data.synthetic.rows:,} rows (generator seed "
                f"{cfg.data.synthetic.seed}), split 8:1:1")
        if data.meta.get("selected_fields"):
            desc += (f", restricted to {data.num_fields} of its 39 fields ({', '.join(data.field_names)}: both fields of the planted "
                     f"gate and 8 fields of the planted interactions; the oracle still sees all 39)")
    info = {
        "name": name,
        "description": desc,
        "rows": {s: len(v) for s, v in data.splits.items()},
        "fields": data.num_fields,
        "test_pos": pos,
        "test_neg": neg,
    }
    if data.has_oracle():
        from ..training.metrics import auc

        info["oracle_auc"] = auc(y, np.asarray(test.p))
    return info


@dataclass
class EqualTuning:
    """`--tune N`: every model of the plan gets a study of `trials` trials, each trial capped at
    `max_steps` steps (None: the untuned cells' own step budget), before its seeds run (BARS)."""

    trials: int
    max_steps: Optional[int] = None
    seed: int = 0


def tune_models(plan: Plan, data, spec: EqualTuning, out: Path, log=print) -> dict[str, Any]:
    """One study per model, the same trials and step cap for each; returns the tuned settings by
    model (for make_plan) and what the report says about the budget."""
    from ..models import REGISTRY
    from ..training.trainer import Schedule, with_model_defaults
    from ..tuning import tune

    rows = len(data.splits["train"])
    budgets = [Schedule.for_run(with_model_defaults(plan.base.train, REGISTRY[m]), rows).last_step for m in plan_models(plan)]
    cap = spec.max_steps or max(budgets, default=1)
    settings: dict[str, dict[str, Any]] = {}
    studies: dict[str, Any] = {}
    for model in plan_models(plan):
        cfg = copy.deepcopy(plan.base)
        cfg.model.name = model
        log(f"reproduce: tuning {model} ({spec.trials} trials, at most {cap:,} steps each)")
        r = tune(cfg, spec.trials, out / "tuning" / model, seed=spec.seed, max_steps=cap, data=data, progress=False, log=log)
        settings[model] = {**r.best_settings, "train.max_steps": cap}
        studies[model] = {"best_valid_auc": r.best_value, "settings": r.best_settings, "study": str(r.output), "trials": r.finished,
                          "is_default": r.is_default}
    return {"settings": settings, "budget": {"trials": spec.trials, "max_steps": cap, "seed": spec.seed}, "models": studies}


def reproduce(
    cfg: RunConfig,
    tables: list[str],
    seeds: int,
    out: Path,
    preset: str,
    applied: list[str],
    command: str,
    quiet: bool = False,
    log=print,
    tuning: Optional[EqualTuning] = None,
) -> Path:
    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fields = None if cfg.data.path else PRESETS[preset].get("synthetic_fields")
    plan = make_plan(cfg, tables, seeds, fields)
    log(f"reproduce: tables {','.join(tables)}; {len(plan.cells)} cells ({seeds} seed{'s' if seeds > 1 else ''}); output {out}")
    data = load_dataset(cfg, fields)
    trained: list[str] = []  # cells this invocation trains; run_plan reuses the others (same settings and data)
    results = run_plan(plan, out, data=data, quiet=quiet, on_cell=lambda cell, _: trained.append(cell.id))
    rq4 = None
    rq4_cell = None
    if "rq4" in tables:
        rq4_cell = next(c.id for c in plan.cells.values() if "rq4" in c.tables)
        if not quiet:
            log(f"reproduce: RQ4 mask analysis on {rq4_cell}")
        rq4 = rq4_analyse(out / "cells" / rq4_cell, data, RQ4_MAX_INSTANCES)
    analysis = analyse(plan, results, rq4)
    tuned = None
    if tuning is not None:
        tuned = tune_models(plan, data, tuning, out, log)
        tuned_plan = make_plan(cfg, [t for t in tables if t != "rq4"], seeds, fields, tuned=tuned["settings"])
        tuned_results = run_plan(tuned_plan, out / "tuned", data=data, quiet=quiet)
        tuned.update(plan=tuned_plan, results=tuned_results, analysis=analyse(tuned_plan, tuned_results, None))
    info = _data_info(cfg, data)
    ref = [r["test"]["auc"] for r in results.values()]
    info["ref_auc"] = float(np.median(ref)) if ref else 0.75
    info["test_auc_se"] = auc_standard_error(info["ref_auc"], info["test_pos"], info["test_neg"])
    m, tr = cfg.model, cfg.train
    meta = {
        "command": command,
        "preset": preset,
        "tables": tables,
        "seeds": plan.seeds,
        "seeds_note": (f"The `{preset}` preset defaults to {PRESETS[preset]['seeds']} seeds (the `paper` preset: 3)"
                       if PRESETS[preset]["seeds"] != 3 and seeds == PRESETS[preset]["seeds"] else ""),
        "overrides": applied,
        "data": info,
        "budget": {
            "epochs": tr.epochs, "patience": tr.patience, "lr": tr.lr, "batch_size": tr.batch_size,
            "l2_embedding": tr.l2_embedding, "l2_dense": tr.l2_dense,
            "embedding_dim": m.embedding_dim, "dnn_hidden": m.dnn_hidden, "num_blocks": m.num_blocks, "block_dim": m.block_dim,
            "reduction_ratio": m.reduction_ratio, "top_mlp": m.top_mlp, "cin_layers": m.cin_layers,
            "attention_layers": m.attention_layers, "attention_heads": m.attention_heads, "attention_dim": m.attention_dim,
        },
        "base_config": cfg.to_dict(),
        "cells_run": len(trained),
        "cells_resumed": len(plan.cells) - len(trained),
        "train_seconds_total": sum(r.get("seconds", 0.0) for r in results.values()),
        "rq4_cell": rq4_cell,
        "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }
    plot_files = plots_mod.make_all(analysis, rq4, out, info["name"], plan.seeds, preset, rq4_cell)
    meta["wall"] = fmt_seconds(time.perf_counter() - t0)
    report.write(out, meta, plan, results, analysis, rq4, plot_files, tuned)
    log(f"reproduce: wrote {out / 'report.md'}, {out / 'results.json'} and {len(plot_files)} plots in {meta['wall']}")
    return out
