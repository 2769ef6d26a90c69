"""Turn cell results into tables (mean ± std over seeds, the paper's numbers beside) and claims."""

from __future__ import annotations

from typing import Any, Optional

from ..training.metrics import relaimp
from . import paper
from .plan import ABLATION_LABELS, ABLATIONS, MASKNETS, SWEEPS, TABLE2_MODELS, Plan
from .stats import compare, mean_std

MODEL_LABELS = {
    "fm": "FM", "dnn": "DNN", "deepfm": "DeepFM", "dcn": "DCN", "xdeepfm": "xDeepFM", "autoint": "AutoInt",
    "sermasknet": "SerMaskNet", "paramasknet": "ParaMaskNet",
}


def _vals(plan: Plan, results: dict, model: str, variant: str, metric: str = "auc") -> list[float]:
    return [results[c]["test"][metric] for c in plan.cell_ids(model, variant) if c in results]


def _by_seed(plan: Plan, results: dict, model: str, variant: str) -> dict[int, float]:
    out = {}
    for s, c in zip(plan.seeds, plan.cell_ids(model, variant)):
        if c in results:
            out[s] = results[c]["test"]["auc"]
    return out


def _aggregate(name: str, claim: str, parts: list[dict[str, Any]], paper_text: str) -> dict[str, Any]:
    verdicts = [p["verdict"] for p in parts]
    if any(v.startswith("does not hold") for v in verdicts):
        verdict = "does not hold"
    elif verdicts and all(v.startswith("holds") for v in verdicts):
        verdict = "holds"
    else:
        verdict = "not resolved"
    return {"id": name, "claim": claim, "paper": paper_text, "verdict": verdict, "parts": parts}


def table2(plan: Plan, results: dict) -> tuple[dict, list]:
    variant = {m: plan.layout["2"][m]["base"] for m in TABLE2_MODELS}
    fm_seed = _by_seed(plan, results, "fm", variant["fm"])
    rows = []
    for m in TABLE2_MODELS:
        aucs = _by_seed(plan, results, m, variant[m])
        rel = [relaimp(aucs[s], fm_seed[s]) for s in aucs if s in fm_seed and fm_seed[s] > 0.5]
        p_diff = paper.table2_auc(m) - paper.table2_auc("fm")
        rows.append(
            {
                "model": m,
                "label": MODEL_LABELS[m],
                "auc": mean_std(aucs.values()),
                "logloss": mean_std(_vals(plan, results, m, variant[m], "logloss")),
                "relaimp": mean_std(rel),
                "paper_auc": {d: paper.table2_auc(m, d) for d in paper.published()["table2"]["datasets"]},
                "paper_relaimp": paper.table2_relaimp(m),
                "vs_fm": None if m == "fm" else compare(list(aucs.values()), list(fm_seed.values()), p_diff),
                "paper_vs_fm": p_diff,
            }
        )
    claims = []
    fm = list(fm_seed.values())
    parts = []
    for m in TABLE2_MODELS[1:]:
        c = compare(_vals(plan, results, m, variant[m]), fm)
        parts.append({"what": f"{MODEL_LABELS[m]} > FM", **c})
    claims.append(_aggregate("t2_deep_beats_fm", "every deep model beats FM", parts, "all RelaImp > 0 (+5.35% to +7.91% on Criteo)"))
    baselines = [m for m in TABLE2_MODELS if m not in MASKNETS]
    for mn in MASKNETS:
        parts = []
        for b in baselines:
            c = compare(_vals(plan, results, mn, variant[mn]), _vals(plan, results, b, variant[b]))
            parts.append({"what": f"{MODEL_LABELS[mn]} > {MODEL_LABELS[b]}", **c})
        best_paper = max(paper.table2_auc(b) for b in baselines)
        claims.append(
            _aggregate(
                f"t2_{mn}_beats_baselines",
                f"{MODEL_LABELS[mn]} beats every baseline",
                parts,
                f"{paper.table2_auc(mn):.4f} vs best baseline {best_paper:.4f} on Criteo (+{paper.table2_auc(mn) - best_paper:.4f})",
            )
        )
    c = compare(_vals(plan, results, "sermasknet", variant["sermasknet"]), _vals(plan, results, "paramasknet", variant["paramasknet"]), 0.0)
    claims.append(
        _aggregate("t2_ser_equals_para", "SerMaskNet and ParaMaskNet perform about the same", [{"what": "SerMaskNet − ParaMaskNet", **c}],
                   "0.8119 vs 0.8124 on Criteo, 0.7413 vs 0.7410 Malware, 0.7877 vs 0.7872 Avazu")
    )
    return {"rows": rows}, claims


def table3(plan: Plan, results: dict) -> tuple[dict, list]:
    rows = []
    per = {}
    for m in MASKNETS:
        lay = plan.layout["3"][m]
        full = _vals(plan, results, m, lay["full"])
        for ab in ABLATIONS:
            vals = _vals(plan, results, m, lay[ab])
            p = paper.table3_auc(m, ab)
            p_drop = paper.table3_auc(m, "full") - p
            cmp_ = None if ab == "full" else compare(full, vals, p_drop)
            per[(m, ab)] = cmp_
            rows.append(
                {
                    "model": m, "ablation": ab, "label": ABLATION_LABELS[ab], "variant": lay[ab],
                    "auc": mean_std(vals), "logloss": mean_std(_vals(plan, results, m, lay[ab], "logloss")),
                    "paper_auc": p, "paper_drop": p_drop, "full_minus_this": cmp_,
                }
            )
    claims = []
    for ab, text in (("no_mask", "the instance-guided mask helps"), ("no_layernorm", "layer normalization helps")):
        parts = [{"what": f"{MODEL_LABELS[m]}: full > {ABLATION_LABELS[ab]}", **per[(m, ab)]} for m in MASKNETS]
        pd = ", ".join(f"{MODEL_LABELS[m]} −{paper.table3_auc(m, 'full') - paper.table3_auc(m, ab):.4f}" for m in MASKNETS)
        claims.append(_aggregate(f"t3_{ab}", text, parts, f"removing it costs {pd}"))
    claims.append(
        _aggregate("t3_ffn_ser", "the block FFN helps SerMaskNet", [{"what": "SerMaskNet: full > w/o block FFN", **per[("sermasknet", "no_ffn")]}],
                   "removing it costs −0.0034")
    )
    claims.append(
        _aggregate("t3_ffn_para", "the block FFN matters little in ParaMaskNet", [{"what": "ParaMaskNet: full ≈ w/o block FFN", **per[("paramasknet", "no_ffn")]}],
                   "removing it costs −0.0002")
    )
    # FFN matters more in Ser than in Para: per-seed difference of the two drops
    ser_f, ser_n = _by_seed(plan, results, "sermasknet", plan.layout["3"]["sermasknet"]["full"]), _by_seed(plan, results, "sermasknet", plan.layout["3"]["sermasknet"]["no_ffn"])
    par_f, par_n = _by_seed(plan, results, "paramasknet", plan.layout["3"]["paramasknet"]["full"]), _by_seed(plan, results, "paramasknet", plan.layout["3"]["paramasknet"]["no_ffn"])
    dd = [(ser_f[s] - ser_n[s]) - (par_f[s] - par_n[s]) for s in plan.seeds if all(s in d for d in (ser_f, ser_n, par_f, par_n))]
    # one-sample test of the per-seed differences: against a constant 0 (zero variance)
    c = compare(dd, [0.0, 0.0]) if dd else {"diff": None, "se": None, "verdict": "missing"}
    claims.append(
        _aggregate("t3_ffn_ser_vs_para", "the block FFN matters more in SerMaskNet than in ParaMaskNet",
                   [{"what": "(Ser drop) − (Para drop) w/o block FFN", **c}], "0.0034 vs 0.0002")
    )
    return {"rows": rows}, claims


def sweep(plan: Plan, results: dict, table: str) -> tuple[dict, list]:
    sw = SWEEPS[table]
    pub = paper.published()[f"table{table}"]
    rows, claims = [], []
    for m in MASKNETS:
        lay = plan.layout[table][m]
        default = pub["default"]
        d_vals = _vals(plan, results, m, lay[default]) if default in lay else []
        means = {}
        for v in sw["values"]:
            vals = _vals(plan, results, m, lay[v])
            p = paper.sweep_auc(f"table{table}", m, v)
            pdef = paper.sweep_auc(f"table{table}", m, default)
            c = None if v == default else compare(vals, d_vals, p - pdef)
            st = mean_std(vals)
            means[v] = st["mean"]
            rows.append(
                {"model": m, "value": v, "variant": lay[v], "auc": st, "logloss": mean_std(_vals(plan, results, m, lay[v], "logloss")),
                 "paper_auc": p, "paper_vs_default": None if v == default else p - pdef, "vs_default": c}
            )
        valid = {v: a for v, a in means.items() if a is not None}
        if valid:
            best = max(valid, key=valid.get)
            pvals = pub["auc"][m]
            pbest = sw["values"][pvals.index(max(pvals))]
            parts = [
                {"what": f"{MODEL_LABELS[m]}: {sw['label']} = {v} vs {default}", **r["vs_default"]}
                for r in rows if r["model"] == m and r["vs_default"] is not None for v in [r["value"]]
            ]
            claims.append(
                {
                    "id": f"t{table}_{m}",
                    "claim": f"{MODEL_LABELS[m]}: each {sw['label']} compares with the default ({default}) as in the paper",
                    "paper": f"best {pbest} (AUC range {max(pvals) - min(pvals):.4f})",
                    "here": f"best {best} (AUC range of the means {max(valid.values()) - min(valid.values()):.4f})",
                    "verdict": _aggregate("", "", parts, "")["verdict"],
                    "parts": parts,
                }
            )
    return {"key": sw["key"], "label": sw["label"], "values": sw["values"], "rows": rows}, claims


def rq4_claims(rq: dict) -> list:
    blocks = rq["blocks"]
    claims = []
    w1 = [b["share_within_1std"] for b in blocks]
    claims.append(
        {
            "id": "rq4_normal", "claim": "each block's mask values look normally distributed",
            "paper": "bell-shaped histograms (Figure 5)",
            "here": ", ".join(f"block {b['block']}: {b['share_within_1std']:.0%} within 1 std, excess kurtosis {b['excess_kurtosis']:.1f}" for b in blocks),
            "verdict": "holds" if all(0.6 <= x <= 0.8 for x in w1) else "does not hold",
            "rule": "holds if 60-80% of the values lie within one std of the mean in every block (68% for a normal)",
        }
    )
    nz = [b["share_near_zero"] for b in blocks]
    claims.append(
        {
            "id": "rq4_near_zero", "claim": "more than half of the mask values are near zero",
            "paper": "more than half near zero, a few large",
            "here": ", ".join(f"block {b['block']}: {b['share_near_zero']:.0%} with |v| < {rq['near_zero_threshold']}" for b in blocks),
            "verdict": "holds" if all(x > 0.5 for x in nz) else "does not hold",
            "rule": f"|value| < {rq['near_zero_threshold']} (the paper gives no threshold), > 50% in every block",
        }
    )
    dif = [d["rel_mean_abs_diff"] for d in rq["example_differences"]]
    claims.append(
        {
            "id": "rq4_instances_differ", "claim": "different instances get different masks",
            "paper": "two instances emphasize different fields and bits (Figure 6)",
            "here": ", ".join(f"block {d['block']}: mean |Δ| = {d['rel_mean_abs_diff']:.0%} of mean |v|, corr {d['corr']:.2f}" for d in rq["example_differences"]),
            "verdict": "holds" if all(x > 0.2 for x in dif) else "does not hold",
            "rule": "the two instances' masks differ by more than 20% of the mean |mask value| in every block",
        }
    )
    return claims


def analyse(plan: Plan, results: dict, rq4: Optional[dict]) -> dict[str, Any]:
    tables: dict[str, Any] = {}
    claims: list = []
    if "2" in plan.tables:
        tables["2"], c = table2(plan, results)
        claims += c
    if "3" in plan.tables:
        tables["3"], c = table3(plan, results)
        claims += c
    for t in ("4", "5", "6"):
        if t in plan.tables:
            tables[t], c = sweep(plan, results, t)
            claims += c
    if rq4 is not None:
        claims += rq4_claims(rq4)
    return {"tables": tables, "claims": claims}
