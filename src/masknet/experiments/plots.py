"""PNG figures for the report (matplotlib, Agg backend: no display needed).

Rules every figure follows: one y-axis, never a second one for another dataset's
numbers. AUC is plotted as a difference from a stated baseline (FM for Table 2, the full model for
Table 3, the paper's default value for Tables 4-6), so the paper's Criteo differences sit on the
same axis, in the same unit, beside ours; bars start at 0 = the baseline. Error bars are ±2
standard errors of that difference over the seeds (Welch, the report's verdict threshold), none
with one seed. Every title names the data, the seeds and the preset. RQ4's heat maps end with an
A − B row, so "the two instances' masks differ" can be seen and not only read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from .analysis import MODEL_LABELS  # noqa: E402
from .plan import ABLATION_LABELS, MASKNETS  # noqa: E402

COLORS = {"sermasknet": "tab:blue", "paramasknet": "tab:orange"}
BASELINE_COLOR = "tab:gray"
PAPER_STYLE = dict(marker="D", color="black", linestyle="none", markersize=6)
DPI = 110


def context_line(ctx: dict[str, Any]) -> str:
    """'synthetic-10k · seeds 2021, 2022 · preset quick': the data, seeds and preset of a figure."""
    seeds = ctx.get("seeds") or []
    return f"{ctx['data']} · {len(seeds)} seed{'s' if len(seeds) != 1 else ''} ({', '.join(map(str, seeds))}) · preset {ctx['preset']}"


def _title(ax_or_fig, what: str, ctx: dict[str, Any], fontsize: int = 10) -> None:
    text = f"{what}\n{context_line(ctx)}"
    if hasattr(ax_or_fig, "suptitle"):
        ax_or_fig.suptitle(text, fontsize=fontsize)
    else:
        ax_or_fig.set_title(text, fontsize=fontsize)


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path.name


def _err(cmp_: Optional[dict]) -> float:
    """±2 SE of a comparison (0 when there is no spread: one seed, or the baseline itself)."""
    if not cmp_ or cmp_.get("se") is None:
        return 0.0
    return 2.0 * cmp_["se"]


def _diff(cmp_: Optional[dict]) -> float:
    return float("nan") if not cmp_ or cmp_.get("diff") is None else cmp_["diff"]


def _error_note(ctx: dict[str, Any]) -> str:
    n = len(ctx.get("seeds") or [])
    return "error bars: ±2 SE over seeds (Welch)" if n > 1 else "1 seed: no error bars"


def table2_plot(t2: dict, out: Path, ctx: dict[str, Any]) -> str:
    rows = [r for r in t2["rows"] if r["auc"]["mean"] is not None]
    fig, ax = plt.subplots(figsize=(8.5, 5.0))
    x = np.arange(len(rows))
    diffs = [0.0 if r["vs_fm"] is None else _diff(r["vs_fm"]) for r in rows]
    errs = [_err(r["vs_fm"]) for r in rows]
    colors = [COLORS.get(r["model"], BASELINE_COLOR) for r in rows]
    ax.bar(x, diffs, yerr=errs, capsize=4, color=colors, edgecolor="black", linewidth=0.5)
    ax.plot(x, [r["paper_vs_fm"] for r in rows], **PAPER_STYLE)
    ax.axhline(0, color="black", linewidth=0.8)
    fm = next((r for r in rows if r["model"] == "fm"), None)
    base = f"FM ({fm['auc']['mean']:.4f} here)" if fm else "FM"
    ax.set_xticks(x, [r["label"] for r in rows], rotation=20)
    ax.set_ylabel(f"test AUC − {base}")
    handles = [
        Patch(color=BASELINE_COLOR, label="baselines, here (mean over seeds)"),
        *(Patch(color=COLORS[m], label=f"{MODEL_LABELS[m]}, here") for m in MASKNETS),
        Line2D([], [], **PAPER_STYLE, label="paper (Criteo): AUC − FM's, same axis"),
        Line2D([], [], color="black", marker="|", markersize=10, linestyle="none", label=_error_note(ctx)),
    ]
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2, fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    _title(ax, "Table 2: test AUC of each model minus FM's (0 = FM)", ctx)
    return _save(fig, out / "table2_auc.png")


def table3_plot(t3: dict, out: Path, ctx: dict[str, Any]) -> str:
    fig, ax = plt.subplots(figsize=(8.5, 4.8))
    abls = [a for a in ABLATION_LABELS if a != "full"]
    width = 0.38
    x = np.arange(len(abls))
    for j, m in enumerate(MASKNETS):
        rows = {r["ablation"]: r for r in t3["rows"] if r["model"] == m}
        # variant − full (the analysis holds full − variant): below 0 means the removal costs AUC
        diffs = [-_diff(rows[a]["full_minus_this"]) for a in abls]
        errs = [_err(rows[a]["full_minus_this"]) for a in abls]
        xs = x + (j - 0.5) * width
        ax.bar(xs, diffs, width, yerr=errs, capsize=4, color=COLORS[m], edgecolor="black", linewidth=0.5,
               label=f"{MODEL_LABELS[m]}, here (mean over seeds)")
        ax.plot(xs, [-rows[a]["paper_drop"] for a in abls], **PAPER_STYLE,
                label="paper (Criteo), same axis" if j == 0 else None)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(x, [ABLATION_LABELS[a] for a in abls])
    ax.set_ylabel("test AUC − the full model's")
    h, _ = ax.get_legend_handles_labels()
    h.append(Line2D([], [], color="black", marker="|", markersize=10, linestyle="none", label=_error_note(ctx)))
    ax.legend(handles=h, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2)
    ax.grid(axis="y", alpha=0.3)
    _title(ax, "Table 3: ablations, test AUC minus the full model's (0 = full; below 0: the part helps)", ctx)
    return _save(fig, out / "table3_ablation.png")


def sweep_plot(table: str, t: dict, out: Path, ctx: dict[str, Any], default: Any) -> str:
    fig, ax = plt.subplots(figsize=(7.5, 5.0))
    offsets = {m: (i - 0.5) * 0.08 * (max(t["values"]) - min(t["values"])) / max(1, len(t["values"]) - 1)
               for i, m in enumerate(MASKNETS)}
    for m in MASKNETS:
        rows = [r for r in t["rows"] if r["model"] == m and r["auc"]["mean"] is not None]
        xs = np.asarray([r["value"] for r in rows], dtype=float) + offsets[m]  # side by side, not on top
        diffs = [0.0 if r["vs_default"] is None else _diff(r["vs_default"]) for r in rows]
        ax.errorbar(xs, diffs, yerr=[_err(r["vs_default"]) for r in rows], marker="o", capsize=4, color=COLORS[m],
                    label=f"{MODEL_LABELS[m]}, here (mean over seeds)")
        ax.plot(xs, [0.0 if r["paper_vs_default"] is None else r["paper_vs_default"] for r in rows], linestyle=":",
                marker="D", color=COLORS[m], markeredgecolor="black", label=f"{MODEL_LABELS[m]}, paper (Criteo), same axis")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xlabel(t["label"])
    ax.set_ylabel(f"test AUC − at the paper's default ({default})")
    ax.set_xticks(t["values"])
    h, _ = ax.get_legend_handles_labels()
    h.append(Line2D([], [], color="black", marker="|", markersize=10, linestyle="none", label=_error_note(ctx)))
    ax.legend(handles=h, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
    ax.grid(alpha=0.3)
    _title(ax, f"Table {table}: test AUC against {t['label']}, minus the default's (0 = {default})", ctx)
    return _save(fig, out / f"table{table}_{t['key'].split('.')[-1]}.png")


def mask_histograms(rq: dict, out: Path, ctx: dict[str, Any]) -> str:
    blocks = rq["blocks"]
    fig, axes = plt.subplots(1, len(blocks), figsize=(4.2 * len(blocks), 4.0), squeeze=False)
    thr = rq["near_zero_threshold"]
    for ax, b in zip(axes[0], blocks):
        edges = np.asarray(b["hist_edges"])
        counts = np.asarray(b["hist_counts"], dtype=float)
        widths = np.diff(edges)
        density = counts / max(1.0, counts.sum()) / widths
        ax.bar(edges[:-1], density, width=widths, align="edge", color="tab:blue", alpha=0.7, label="mask values")
        xs = np.linspace(edges[0], edges[-1], 300)
        if b["std"] > 0:
            pdf = np.exp(-0.5 * ((xs - b["mean"]) / b["std"]) ** 2) / (b["std"] * np.sqrt(2 * np.pi))
            ax.plot(xs, pdf, "k--", lw=1, label="normal, same mean/std")
        ax.axvspan(-thr, thr, color="tab:red", alpha=0.15, label=f"near zero: |v| < {thr}")
        ax.set_xlabel("mask value (unitless multiplier)")
        ax.set_ylabel("density")
        kind = "embedding mask" if b["block"] == 1 else "hidden-layer mask"
        ax.set_title(f"block {b['block']} ({kind}, width {b['width']})\n{b['share_near_zero']:.0%} near zero", fontsize=9)
        ax.legend(fontsize=7)
    cell = f", cell {ctx['rq4_cell']}" if ctx.get("rq4_cell") else ""
    _title(fig, f"RQ4: mask values over {rq['instances_analysed']:,} test instances (3-block SerMaskNet{cell})", ctx)
    return _save(fig, out / "rq4_mask_histograms.png")


def _grid(v: np.ndarray, cols: int) -> np.ndarray:
    rows = int(np.ceil(len(v) / cols))
    g = np.full(rows * cols, np.nan)
    g[: len(v)] = v
    return g.reshape(rows, cols)


def _mask_image(ax, v: np.ndarray, first_block: bool, fields: list[str], k: int) -> np.ndarray:
    f = len(fields)
    if first_block and len(v) == f * k:
        ax.set_yticks(range(f), fields, fontsize=6 if f > 15 else 8)
        ax.set_xticks(range(k) if k <= 20 else range(0, k, max(1, k // 10)))
        ax.set_xlabel("embedding bit (0 .. k-1)")
        ax.set_ylabel("field")
        return v.reshape(f, k)
    cols = 16 if len(v) >= 64 else 8
    img = _grid(v, cols)
    step = max(1, img.shape[0] // 8)
    ax.set_yticks(range(0, img.shape[0], step), [str(r * cols) for r in range(0, img.shape[0], step)])
    ax.set_xticks(range(0, cols, 2 if cols > 8 else 1))
    ax.set_xlabel(f"hidden unit: offset in row (+0 .. +{cols - 1})")
    ax.set_ylabel("hidden unit: row start index")
    return img


def mask_heatmaps(rq: dict, out: Path, ctx: dict[str, Any]) -> str:
    """Rows: instance A, instance B, A − B (its own colour scale, so a small difference shows)."""
    ex = rq["examples"][:2]
    nb = len(ex[0]["masks"])
    fields, k = rq["field_names"], rq["embedding_dim"]
    masks = [[np.asarray(m, dtype=float) for m in inst["masks"]] for inst in ex]
    rows = [(f"instance {chr(65 + i)} (test row {inst['row']}, label {inst['label']})", masks[i]) for i, inst in enumerate(ex)]
    if len(ex) == 2:
        rows.append(("A − B", [a - b for a, b in zip(masks[0], masks[1])]))
    fig, axes = plt.subplots(len(rows), nb, figsize=(4.0 * nb + 1, 0.22 * max(len(fields), 12) * len(rows) + 2.0), squeeze=False)
    lims = [max(float(np.max(np.abs(m[j]))) for m in masks) or 1.0 for j in range(nb)]
    diff_lims = [float(np.max(np.abs(rows[-1][1][j]))) or 1.0 for j in range(nb)] if len(ex) == 2 else lims
    for i, (label, vs) in enumerate(rows):
        is_diff = label == "A − B"
        for j, v in enumerate(vs):
            ax = axes[i][j]
            img = _mask_image(ax, v, j == 0, fields, k)
            lim = diff_lims[j] if is_diff else lims[j]
            im = ax.imshow(img, aspect="auto", cmap="PiYG" if is_diff else "RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
            cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
            cb.set_label("A − B" if is_diff else "mask value", fontsize=8)
            kind = "embedding mask" if j == 0 else "hidden-layer mask"
            extra = ""
            if is_diff:
                d = rq["example_differences"][j] if j < len(rq.get("example_differences", [])) else None
                extra = f": mean |Δ| {d['rel_mean_abs_diff']:.0%} of mean |v|, corr {d['corr']:.3f}" if d else ""
            ax.set_title(f"{label}\nblock {j + 1}: {kind}{extra}", fontsize=8)
    cell = f" (cell {ctx['rq4_cell']})" if ctx.get("rq4_cell") else ""
    _title(fig, f"RQ4: instance-guided masks of two test instances and their difference{cell}\n"
           "masks: red > 0, blue < 0 flips the sign, white ≈ 0 suppresses; A − B: green > 0, pink < 0, on its own scale", ctx)
    return _save(fig, out / "rq4_mask_heatmaps.png")


def make_all(analysis: dict[str, Any], rq4: dict | None, out: Path, data_name: str, seeds: list[int], preset: str,
             rq4_cell: Optional[str] = None) -> dict[str, str]:
    """Every figure, titled with the data, seeds and preset (and RQ4's with the cell it analyses)."""
    from . import paper

    out.mkdir(parents=True, exist_ok=True)
    ctx = {"data": data_name, "seeds": list(seeds), "preset": preset, "rq4_cell": rq4_cell}
    files = {}
    t = analysis["tables"]
    if "2" in t:
        files["2"] = table2_plot(t["2"], out, ctx)
    if "3" in t:
        files["3"] = table3_plot(t["3"], out, ctx)
    for key in ("4", "5", "6"):
        if key in t:
            files[key] = sweep_plot(key, t[key], out, ctx, paper.published()[f"table{key}"]["default"])
    if rq4 is not None:
        files["rq4_hist"] = mask_histograms(rq4, out, ctx)
        files["rq4_heatmaps"] = mask_heatmaps(rq4, out, ctx)
    return files
