"""PNG figures for the report (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .analysis import MODEL_LABELS  # noqa: E402
from .plan import ABLATION_LABELS, MASKNETS  # noqa: E402

COLORS = {"sermasknet": "tab:blue", "paramasknet": "tab:orange"}
DPI = 110


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path.name


def table2_plot(t2: dict, out: Path, data_name: str) -> str:
    rows = [r for r in t2["rows"] if r["auc"]["mean"] is not None]
    fig, ax = plt.subplots(figsize=(8, 4.8))
    x = np.arange(len(rows))
    means = [r["auc"]["mean"] for r in rows]
    stds = [r["auc"]["std"] for r in rows]
    colors = [COLORS.get(r["model"], "tab:gray") for r in rows]
    ax.bar(x, means, yerr=stds, capsize=4, color=colors, label=f"here ({data_name}), mean ± std over seeds")
    paper = [r["paper_auc"]["Criteo"] for r in rows]
    ax2 = ax.twinx()
    ax2.plot(x, paper, "k^--", label="paper (Criteo), right axis")
    ax.set_xticks(x, [r["label"] for r in rows], rotation=20)
    ax.set_ylabel("test AUC here")
    ax2.set_ylabel("published test AUC (Criteo)")
    lo = min(m - s for m, s in zip(means, stds))
    hi = max(m + s for m, s in zip(means, stds))
    pad = max(0.002, 0.15 * (hi - lo))
    ax.set_ylim(lo - pad, hi + pad)
    ax.set_title("Table 2: test AUC by model")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, out / "table2_auc.png")


def table3_plot(t3: dict, out: Path, data_name: str) -> str:
    fig, ax = plt.subplots(figsize=(8, 4.6))
    abls = list(ABLATION_LABELS)
    width = 0.38
    x = np.arange(len(abls))
    allv = []
    for j, m in enumerate(MASKNETS):
        rows = {r["ablation"]: r for r in t3["rows"] if r["model"] == m}
        means = [rows[a]["auc"]["mean"] for a in abls]
        stds = [rows[a]["auc"]["std"] for a in abls]
        allv += [mm - s for mm, s in zip(means, stds)] + [mm + s for mm, s in zip(means, stds)]
        ax.bar(x + (j - 0.5) * width, means, width, yerr=stds, capsize=4, color=COLORS[m],
               label=f"{MODEL_LABELS[m]} here (mean ± std)")
    ax.set_xticks(x, [ABLATION_LABELS[a] for a in abls])
    ax.set_ylabel(f"test AUC ({data_name})")
    pad = max(0.002, 0.15 * (max(allv) - min(allv)))
    ax.set_ylim(min(allv) - pad, max(allv) + pad)
    ax.set_title("Table 3: ablation (paper on Criteo: every removal costs AUC, except FFN in ParaMaskNet)", fontsize=9)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, out / "table3_ablation.png")


def sweep_plot(table: str, t: dict, out: Path, data_name: str) -> str:
    fig, ax = plt.subplots(figsize=(7, 5.0))
    ax2 = ax.twinx()
    for m in MASKNETS:
        rows = [r for r in t["rows"] if r["model"] == m and r["auc"]["mean"] is not None]
        xs = [r["value"] for r in rows]
        ax.errorbar(xs, [r["auc"]["mean"] for r in rows], yerr=[r["auc"]["std"] for r in rows], marker="o",
                    capsize=4, color=COLORS[m], label=f"{MODEL_LABELS[m]} here ({data_name}), mean ± std")
        ax2.plot(xs, [r["paper_auc"] for r in rows], linestyle=":", marker="x", color=COLORS[m],
                 label=f"{MODEL_LABELS[m]} paper (Criteo), right axis")
    ax.set_xlabel(t["label"])
    ax.set_ylabel("test AUC here")
    ax2.set_ylabel("published test AUC (Criteo)")
    ax.set_xticks(t["values"])
    ax.set_title(f"Table {table}: test AUC against {t['label']}")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)
    ax.grid(alpha=0.3)
    return _save(fig, out / f"table{table}_{t['key'].split('.')[-1]}.png")


def mask_histograms(rq: dict, out: Path) -> str:
    blocks = rq["blocks"]
    fig, axes = plt.subplots(1, len(blocks), figsize=(4.2 * len(blocks), 3.8), squeeze=False)
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
    fig.suptitle(f"RQ4: mask values over {rq['instances_analysed']:,} test instances (3-block SerMaskNet)", fontsize=10)
    return _save(fig, out / "rq4_mask_histograms.png")


def _grid(v: np.ndarray, cols: int) -> np.ndarray:
    rows = int(np.ceil(len(v) / cols))
    g = np.full(rows * cols, np.nan)
    g[: len(v)] = v
    return g.reshape(rows, cols)


def mask_heatmaps(rq: dict, out: Path) -> str:
    ex = rq["examples"]
    nb = len(ex[0]["masks"])
    k = rq["embedding_dim"]
    fields = rq["field_names"]
    f = len(fields)
    fig, axes = plt.subplots(len(ex), nb, figsize=(4.0 * nb + 1, 0.22 * max(f, 12) * len(ex) + 1.5), squeeze=False)
    lims = [max(float(np.max(np.abs(np.asarray(inst["masks"][j])))) for inst in ex) or 1.0 for j in range(nb)]
    for i, inst in enumerate(ex):
        for j, m in enumerate(inst["masks"]):
            ax = axes[i][j]
            v = np.asarray(m)
            if j == 0 and len(v) == f * k:
                img = v.reshape(f, k)
                ax.set_yticks(range(f), fields, fontsize=6 if f > 15 else 8)
                ax.set_xticks(range(k) if k <= 20 else range(0, k, max(1, k // 10)))
                ax.set_xlabel("embedding bit (0 .. k-1)")
                ax.set_ylabel("field")
            else:
                cols = 16 if len(v) >= 64 else 8
                img = _grid(v, cols)
                rows_n = img.shape[0]
                step = max(1, rows_n // 8)
                ax.set_yticks(range(0, rows_n, step), [str(r * cols) for r in range(0, rows_n, step)])
                ax.set_xticks(range(0, cols, 2 if cols > 8 else 1))
                ax.set_xlabel(f"hidden unit: offset in row (+0 .. +{cols - 1})")
                ax.set_ylabel("hidden unit: row start index")
            im = ax.imshow(img, aspect="auto", cmap="RdBu_r", vmin=-lims[j], vmax=lims[j], interpolation="nearest")
            cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
            cb.set_label("mask value", fontsize=8)
            kind = "embedding mask" if j == 0 else "hidden-layer mask"
            ax.set_title(f"instance {chr(65 + i)} (test row {inst['row']}, label {inst['label']})\nblock {j + 1}: {kind}", fontsize=8)
    fig.suptitle("RQ4: instance-guided masks of two instances (colour scale shared per block; red > 0, blue < 0 flips the sign, white ≈ 0 suppresses)", fontsize=10)
    return _save(fig, out / "rq4_mask_heatmaps.png")


def make_all(analysis: dict[str, Any], rq4: dict | None, out: Path, data_name: str) -> dict[str, str]:
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    t = analysis["tables"]
    if "2" in t:
        files["2"] = table2_plot(t["2"], out, data_name)
    if "3" in t:
        files["3"] = table3_plot(t["3"], out, data_name)
    for k in ("4", "5", "6"):
        if k in t:
            files[k] = sweep_plot(k, t[k], out, data_name)
    if rq4 is not None:
        files["rq4_hist"] = mask_histograms(rq4, out)
        files["rq4_heatmaps"] = mask_heatmaps(rq4, out)
    return files
