"""What a study leaves in OUTPUT: the trials table, best.yaml, the two figures, summary.json."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ..config import RunConfig, save_config  # noqa: E402
from ..models.search import SearchSpace  # noqa: E402
from .space import space_to_yaml  # noqa: E402

DPI = 110


def trial_rows(study) -> list[dict[str, Any]]:
    """One row per trial, in order: number, state, role (default / search / recheck), value (best
    validation AUC; for a pruned trial the best it had reached), every parameter, evaluations, steps,
    seconds, and for a re-check the trial it re-checks and its seed."""
    names = sorted({p for t in study.trials for p in t.params})
    rows = []
    for t in study.trials:
        reached = max(t.intermediate_values.values()) if t.intermediate_values else None
        role = "recheck" if "recheck_of" in t.user_attrs else "default" if t.user_attrs.get("default") else "search"
        row: dict[str, Any] = {
            "number": t.number, "state": t.state.name, "role": role, "valid_auc": t.value if t.value is not None else reached,
        }
        row.update({name: t.params.get(name) for name in names})
        for attr in ("evaluations", "steps", "best_step", "seconds", "retry_of", "diverged", "recheck_of", "seed"):
            row[attr] = t.user_attrs.get(attr)
        rows.append(row)
    return rows


def write_tables(study, output: Path) -> None:
    """trials.csv and trials.parquet (rewritten after every trial: a killed study keeps its table)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = trial_rows(study)
    if not rows:
        return
    columns = list(rows[0])
    tmp = output / "trials.csv.tmp"
    with open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(output / "trials.csv")
    pq.write_table(pa.Table.from_pylist(rows), output / "trials.parquet")


def save_best(cfg: RunConfig, path: Path, header: str) -> None:
    save_config(cfg, path)
    path.write_text(header + path.read_text())


def _plot_history(study, path: Path) -> None:
    from optuna.visualization.matplotlib import plot_optimization_history

    ax = plot_optimization_history(study, target_name="validation AUC")
    ax.set_title(f"optimisation history ({len(study.trials)} trials)", loc="left")
    ax.figure.set_size_inches(7, 4.5)
    ax.figure.tight_layout()
    ax.figure.savefig(path, dpi=DPI)
    plt.close(ax.figure)


def _plot_importances(study, path: Path) -> str:
    """Parameter importances (PED-ANOVA: no extra dependency). Needs two or more complete trials
    whose parameters vary; returns a note when it cannot be computed."""
    from optuna.importance import PedAnovaImportanceEvaluator
    from optuna.visualization.matplotlib import plot_param_importances

    # every parameter the search drew (the default trial lacks those its ranges cannot express;
    # without `params`, Optuna would keep only the ones every trial has)
    params = sorted({p for t in study.trials if "recheck_of" not in t.user_attrs and not t.user_attrs.get("default") for p in t.params})
    try:
        ax = plot_param_importances(study, evaluator=PedAnovaImportanceEvaluator(), params=params or None,
                                    target_name="validation AUC")
    except (ValueError, RuntimeError, ZeroDivisionError) as exc:
        return f"no importances: {exc}"
    ax.set_title("parameter importances (PED-ANOVA over the complete trials)", loc="left")
    ax.figure.set_size_inches(7, 4.5)
    ax.figure.tight_layout()
    ax.figure.savefig(path, dpi=DPI)
    plt.close(ax.figure)
    return ""


def write_outputs(
    study, output: Path, best_cfg: RunConfig, space: SearchSpace, seed: int, trials: int, best_number: int,
    rechecked: list[dict[str, Any]],
) -> dict[str, Any]:
    """Everything but study.db. `best_number`: the chosen trial; `rechecked`: the re-check's
    candidates (Candidate.to_dict; empty without a re-check)."""
    write_tables(study, output)
    best = study.trials[best_number]
    chosen = next((c for c in rechecked if c["trial"] == best_number), None)
    how = f", mean over seeds {', '.join(map(str, chosen['valid_auc_by_seed']))} {chosen['mean_valid_auc']:.4f}" if chosen else ""
    header = (
        f"# masknet tune: best of {len(study.trials)} trials ({best_cfg.model.name}, seed {seed}): trial {best.number}"
        f"{' (the default)' if best.user_attrs.get('default') else ''}, validation AUC {best.value:.4f}{how}\n"
        f"# Train it: masknet train --config {output / 'best.yaml'}\n"
    )
    save_best(best_cfg, output / "best.yaml", header)
    _plot_history(study, output / "history.png")
    note = _plot_importances(study, output / "importances.png")
    states: dict[str, int] = {}
    for t in study.trials:
        states[t.state.name] = states.get(t.state.name, 0) + 1
    summary = {
        "model": best_cfg.model.name,
        "data": best_cfg.data.path or f"built-in synthetic ({best_cfg.data.synthetic.rows} rows, seed {best_cfg.data.synthetic.seed})",
        "trials_requested": trials,
        "trials_by_state": states,
        "best_trial": best.number,
        "best_valid_auc": best.value,
        "best_is_default": bool(best.user_attrs.get("default")),
        "best_params": best.params,
        "best_mean_valid_auc": chosen["mean_valid_auc"] if chosen else None,
        "recheck": rechecked,
        "seed": seed,
        "max_steps_per_trial": best_cfg.train.max_steps or None,
        "space": space_to_yaml(space),
        "importances": note or "importances.png",
        "written": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }
    (output / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary
