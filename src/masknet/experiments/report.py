"""report.md (each table beside the paper's numbers, verdicts, a generated summary) and results.json."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from . import paper
from .analysis import MODEL_LABELS
from .stats import fmt_cmp, fmt_ms

SECTIONS = {
    "2": "## Table 2: overall performance",
    "3": "## Table 3: ablation",
    "4": "## Table 4: embedding size",
    "5": "## Table 5: number of MaskBlocks",
    "6": "## Table 6: reduction ratio",
    "rq4": "## RQ4: the instance-guided masks (Figures 5 and 6)",
}


# Presets too small to decide the paper's claims: their report opens with a smoke-run banner.
SMOKE_PRESETS = {"quick": "10k synthetic rows, 2 epochs, small models"}


def md_cell(value: Any) -> str:
    """One table cell: `|` escaped (else it splits the cell), line breaks flattened."""
    return str(value).replace("\\", "\\\\").replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def md_table(header: list[Any], rows: list[list[Any]]) -> list[str]:
    """A GitHub-flavoured Markdown table; every row must have the header's number of cells."""
    out = ["| " + " | ".join(md_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        if len(row) != len(header):
            raise ValueError(f"table row has {len(row)} cells, the header {len(header)}: {row}")
        out.append("| " + " | ".join(md_cell(c) for c in row) + " |")
    return out


def _f(x: Any, d: int = 4) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{d}f}"


def _claim_table(claims: list[dict], rule: bool = False) -> list[str]:
    rows = []
    for c in claims:
        here = c.get("here")
        if here is None:
            here = "; ".join(f"{p['what']}: {fmt_cmp(p)}" for p in c.get("parts", []))
        rows.append([c["claim"], c["paper"], here, f"**{c['verdict']}**"] + ([c["rule"]] if rule else []))
    return md_table(["claim (paper)", "published", "here", "verdict"] + (["rule"] if rule else []), rows)


def _tuning_section(tuned: dict, analysis: dict) -> list[str]:
    """Under `--tune N`: the budget, each model's study, Table 2 after tuning, and every claim's
    verdict under the default protocol beside its verdict under equal tuning."""
    b = tuned["budget"]
    t_analysis = tuned["analysis"]
    L = ["## Under equal tuning (BARS protocol)", ""]
    L.append(f"Every model got its own Optuna study (`masknet tune`) of **{b['trials']} trials**, each trial capped at "
             f"**{b['max_steps']:,} training steps**, scored on the validation split only (sampler seed {b['seed']}); "
             f"then its best setting was trained on every seed. Ablations and sweeps (Tables 3-6) change one key of their "
             f"model's tuned setting. Studies: `tuning/<model>/`; cells: `tuned/cells/`.")
    L.append("")
    L.append("| model | best validation AUC in its study | tuned setting |")
    L.append("|---|---|---|")
    for model, s in tuned["models"].items():
        setting = ", ".join(f"`{k}={v:.3g}`" if isinstance(v, float) else f"`{k}={v}`" for k, v in s["settings"].items())
        if s.get("is_default"):  # the default won its study (or its re-check margin)
            setting = f"the default ({setting})" if setting else "the default"
        L.append(f"| {MODEL_LABELS.get(model, model)} | {s['best_valid_auc']:.4f} | {setting} |")
    L.append("")
    if "2" in t_analysis["tables"]:
        default_rows = {r["model"]: r for r in analysis["tables"].get("2", {}).get("rows", [])}
        L.append("| model | test AUC, default protocol | test AUC, equal tuning |")
        L.append("|---|---|---|")
        for r in t_analysis["tables"]["2"]["rows"]:
            d = default_rows.get(r["model"])
            L.append(f"| {r['label']} | {fmt_ms(d['auc']) if d else 'n/a'} | {fmt_ms(r['auc'])} |")
        L.append("")
    default_verdicts = {c["id"]: c["verdict"] for c in analysis["claims"]}
    L.append("| claim (paper) | default protocol | equal tuning | here, equal tuning |")
    L.append("|---|---|---|---|")
    for c in t_analysis["claims"]:
        here = c.get("here") or "; ".join(f"{p['what']}: {fmt_cmp(p)}" for p in c.get("parts", []))
        L.append(f"| {c['claim']} | {default_verdicts.get(c['id'], 'n/a')} | **{c['verdict']}** | {here} |")
    L.append("")
    return L


def write(out: Path, meta: dict, plan, results: dict, analysis: dict, rq4: dict | None, plots: dict, tuned: dict | None = None) -> None:
    """report.md (sections in the paper's order, each skipped when its tables were not run) and results.json."""
    out = Path(out)
    tables = analysis["tables"]
    claims = analysis["claims"]
    L = _opening(meta) + _setup(meta, plan) + _summary(tables, claims)
    if tuned is not None:
        L.extend(_tuning_section(tuned, analysis))
    if "2" in tables:
        L.extend(_table2(tables, claims, plots))
    if "3" in tables:
        L.extend(_table3(tables, claims, plots))
    for t in ("4", "5", "6"):
        if t in tables:
            L.extend(_sweep_table(t, tables[t], claims, plots))
    if rq4 is not None:
        L.extend(_rq4(meta, rq4, claims, plots))
    L.extend(_files(plots))
    (out / "report.md").write_text("\n".join(L))

    doc = {"meta": meta, "cells": results, "tables": tables, "claims": claims, "rq4": rq4, "plots": plots}
    if tuned is not None:
        doc["tuning"] = {"budget": tuned["budget"], "models": tuned["models"], "cells": tuned["results"],
                         "tables": tuned["analysis"]["tables"], "claims": tuned["analysis"]["claims"]}
    (out / "results.json").write_text(json.dumps(doc, indent=2, default=str))


def _opening(meta: dict) -> list[str]:
    L = [f"# Reproducing MaskNet's Tables 2-6 and RQ4 on {meta['data']['name']}", ""]
    if meta["preset"] in SMOKE_PRESETS:
        L.append(f"> **Smoke run.** The `{meta['preset']}` preset ({SMOKE_PRESETS[meta['preset']]}) checks that every "
                 f"table, plot and verdict is produced; it is too small to decide any of the paper's claims, so read its "
                 f"\"holds\" and \"does not hold\" as the pipeline's output, not as evidence. For evidence: "
                 f"`masknet reproduce --preset paper` on real data (docs/reproduce.md).")
        L.append("")
    L.append(f"Generated by `{meta['command']}` on {meta['finished']} ({meta['wall']} wall time for this invocation).")
    L.append("")
    return L


def _setup(meta: dict, plan) -> list[str]:
    L: list[str] = []
    L.append("## Set-up")
    L.append("")
    d = meta["data"]
    L.append(f"- **Data**: {d['description']}; train {d['rows']['train']:,} / valid {d['rows']['valid']:,} / test {d['rows']['test']:,} rows, "
             f"{d['fields']} fields; test set {d['test_pos']:,} positives / {d['test_neg']:,} negatives.")
    if d.get("oracle_auc") is not None:
        L.append(f"- **Oracle AUC** on the test split (the true click probabilities of the synthetic data): {d['oracle_auc']:.4f}.")
    b = meta["budget"]
    L.append(f"- **Budget, the same for every model and cell**: at most {b['epochs']} epochs, early stopping on validation AUC "
             f"(patience {b['patience']}, best epoch restored), Adam lr {b['lr']:g}, batch {b['batch_size']}, "
             f"L2 embedding {b['l2_embedding']:g} / dense {b['l2_dense']:g}, no tuning per model.")
    L.append(f"- **Models**: embedding size {b['embedding_dim']}, DNN parts {b['dnn_hidden']}, MaskNet {b['num_blocks']} blocks of width "
             f"{b['block_dim']}, reduction ratio {b['reduction_ratio']:g}, ParaMaskNet top MLP {b['top_mlp']}, "
             f"CIN {b['cin_layers']}, AutoInt {b['attention_layers']} layers × {b['attention_heads']} heads × {b['attention_dim']}.")
    L.append(f"- **Preset** `{meta['preset']}`; **seeds** {meta['seeds']} ({len(meta['seeds'])}: initialisation and shuffling vary, the split does not)"
             + (f". {meta['seeds_note']}" if meta.get("seeds_note") else "."))
    L.append(f"- **Overrides** (`--config` / `--set`, applied to every cell): {', '.join(meta['overrides']) or 'none'}.")
    L.append(f"- **Cells**: {len(plan.cells)} training runs ({meta['cells_run']} run by this invocation, {meta['cells_resumed']} resumed from earlier), "
             f"{meta['train_seconds_total'] / 60:.1f} min of training in total; each cell's run folder is under `cells/`, every number is in `results.json`.")
    L.append(f"- **Noise**: verdicts compare mean test AUCs over seeds: a difference beyond 2 standard errors (Welch, from the seed-to-seed std) "
             f"in the paper's direction **holds**, reversed beyond 2 SE **does not hold**, otherwise **not resolved**. A published |Δ| < 0.0005 "
             f"is read as \"no real difference\", which holds here when the difference ± 2 SE stays within ±0.002 AUC. The seed spread leaves out the test set's own sampling noise: one AUC near "
             f"{d['ref_auc']:.3f} on this test set has a standard error of about {d['test_auc_se']:.4f} (Hanley & McNeil), so differences "
             f"smaller than that may not carry over to another sample of the same data.")
    L.append(f"- **The paper's numbers** are on Criteo (45M rows, Table 2 also Malware and Avazu): compare directions and gaps, not levels.")
    L.append("")
    return L


def _summary(tables: dict, claims: list[dict]) -> list[str]:
    L: list[str] = []
    L.append("## Summary")
    L.append("")
    counts = {"holds": 0, "not resolved": 0, "does not hold": 0}
    for c in claims:
        for k in counts:
            if c["verdict"].startswith(k):
                counts[k] += 1
    L.append(f"Of {len(claims)} claims checked: {_n(counts['holds'], 'holds', 'hold')}, "
             f"{_n(counts['not resolved'], 'is not resolved', 'are not resolved')} within the noise, "
             f"{_n(counts['does not hold'], 'does not hold', 'do not hold')} here.")
    L.append("")
    if "2" in tables:
        rows = sorted((r for r in tables["2"]["rows"] if r["auc"]["mean"] is not None), key=lambda r: -r["auc"]["mean"])
        if rows:
            L.append(f"- Best model here: **{rows[0]['label']}** ({fmt_ms(rows[0]['auc'])}); ranking: "
                     + " > ".join(r["label"] for r in rows) + ". Paper (Criteo): ParaMaskNet > SerMaskNet > xDeepFM > DCN > DeepFM > DNN > AutoInt > FM.")
    for c in claims:
        L.append(f"- {c['claim']}: **{c['verdict']}**" + (f" ({c['here']})" if c.get("here") and c["id"].startswith("rq4") else ""))
    L.append("")
    return L


def _n(k: int, one: str, many: str) -> str:
    return f"{k} {one if k == 1 else many}"


def _table2(tables: dict, claims: list[dict], plots: dict) -> list[str]:
    L: list[str] = []
    L.append(SECTIONS["2"])
    L.append("")
    ds = paper.published()["table2"]["datasets"]
    rows = [
        [r["label"], fmt_ms(r["auc"]), fmt_ms(r["logloss"]), fmt_ms(r["relaimp"], pct=True),
         " / ".join(_f(r["paper_auc"][x]) for x in ds), f"{r['paper_relaimp']:+.2%}",
         "(base)" if r["vs_fm"] is None else fmt_cmp(r["vs_fm"])]
        for r in tables["2"]["rows"]
    ]
    L.extend(md_table(["model", "test AUC here", "logloss here", "RelaImp vs FM here", "paper AUC " + " / ".join(ds),
                       "paper RelaImp (Criteo)", "here: Δ AUC vs FM ± SE, paper's ordering (> FM)"], rows))
    L.append("")
    L.extend(_table_tail(claims, "2", plots))
    return L


def _table3(tables: dict, claims: list[dict], plots: dict) -> list[str]:
    L: list[str] = []
    L.append(SECTIONS["3"])
    L.append("")
    rows = [
        [MODEL_LABELS[r["model"]], r["label"], fmt_ms(r["auc"]), fmt_ms(r["logloss"]), _f(r["paper_auc"]),
         "" if r["full_minus_this"] is None else f"{r['paper_drop']:+.4f}",
         "" if r["full_minus_this"] is None else fmt_cmp(r["full_minus_this"])]
        for r in tables["3"]["rows"]
    ]
    L.extend(md_table(["model", "variant", "test AUC here", "logloss here", "paper AUC (Criteo)", "paper: full − variant",
                       "here: full − variant ± SE, verdict"], rows))
    L.append("")
    L.extend(_table_tail(claims, "3", plots))
    return L


def _table_tail(claims: list[dict], t: str, plots: dict) -> list[str]:
    """What ends each of Tables 2-6's sections: the table's claims, then its plot."""
    return [*_claim_table([c for c in claims if c["id"].startswith(f"t{t}_")]), "", f"![Table {t}]({plots[t]})", ""]


def _sweep_table(t: str, tt: dict, claims: list[dict], plots: dict) -> list[str]:
    """Tables 4-6: one key swept over the paper's values."""
    L: list[str] = []
    L.append(SECTIONS[t])
    L.append("")
    default = paper.published()[f"table{t}"]["default"]
    L.append(f"`{tt['key']}` swept over the paper's values; Δ against the paper's default ({default}).")
    L.append("")
    rows = [
        [r["value"], MODEL_LABELS[r["model"]], fmt_ms(r["auc"]), _f(r["paper_auc"]),
         "(default)" if r["vs_default"] is None else f"{r['paper_vs_default']:+.4f}",
         "" if r["vs_default"] is None else fmt_cmp(r["vs_default"])]
        for r in tt["rows"]
    ]
    L.extend(md_table([tt["label"], "model", "test AUC here", "paper AUC (Criteo)", f"paper Δ vs {default}",
                       f"here: Δ vs {default} ± SE, verdict"], rows))
    L.append("")
    L.extend(_table_tail(claims, t, plots))
    return L


def _rq4(meta: dict, rq4: dict, claims: list[dict], plots: dict) -> list[str]:
    L: list[str] = []
    L.append(SECTIONS["rq4"])
    L.append("")
    L.append(f"A 3-block SerMaskNet (cell `{meta['rq4_cell']}`) over the first {rq4['instances_analysed']:,} test instances "
             f"(paper: 100,000 Criteo instances).")
    L.append("")
    rows = [
        [b["block"], "embedding" if b["block"] == 1 else f"block {b['block'] - 1} output", b["width"], f"{b['mean']:.3f}",
         f"{b['std']:.3f}", f"{b['min']:.2f}", f"{b['max']:.2f}", f"{b['share_near_zero']:.1%}",
         f"{b['share_abs_below_half_std']:.1%}", f"{b['share_within_1std']:.1%}", f"{b['excess_kurtosis']:.2f}"]
        for b in rq4["blocks"]
    ]
    L.extend(md_table(["block", "mask of", "width", "mean", "std", "min", "max", f"share |v| < {rq4['near_zero_threshold']}",
                       "share |v| < std/2", "share within 1 std (normal: 68%)", "excess kurtosis"], rows))
    L.append("")
    L.append("Share of each block's mask variance that is between instances (not explained by a per-unit constant): "
             + ", ".join(f"block {i + 1} {v:.0%}" for i, v in enumerate(rq4["share_of_variance_across_instances"])) + ".")
    L.append("")
    L.extend(_claim_table([c for c in claims if c["id"].startswith("rq4")], rule=True))
    L.append("")
    L.append(f"![mask histograms]({plots['rq4_hist']})")
    L.append("")
    L.append(f"![mask heat maps]({plots['rq4_heatmaps']})")
    L.append("")
    return L


def _files(plots: dict) -> list[str]:
    L: list[str] = []
    L.append("## Files")
    L.append("")
    L.append("- `results.json`: every cell (per seed: test/valid AUC and logloss, best epoch, time, resolved config), the tables, the claims, RQ4 statistics.")
    L.append("- `cells/<model>-<variant>-s<seed>/`: each cell's run folder (`masknet train` layout; `result.json` marks it finished, so a rerun resumes).")
    L.append("- `train.log`: every epoch of every cell. " + ", ".join(f"`{p}`" for p in plots.values()) + ": the figures.")
    L.append("")
    return L
