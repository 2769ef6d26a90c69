"""RQ4 (Figures 5 and 6): the instance-guided masks of a trained 3-block SerMaskNet.

Over up to 100,000 test instances: each block's mask values (histogram, mean, std, the share
near zero, the share within one std of the mean as a normality check), and the masks of two
instances (the embedding mask as fields x embedding bits, the hidden-layer masks as grids).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

NEAR_ZERO = 0.1  # |mask value| below this counts as "near zero" (the paper gives no threshold)
HIST_BINS = 80


def mask_values(run_dir: Path, data, max_instances: int, batch_size: int = 4096) -> tuple[list[np.ndarray], np.ndarray]:
    """Each block's mask values [n, z_i] on the first `max_instances` test rows, and those rows' labels."""
    import torch

    from ..runs import load_model

    model = load_model(run_dir)
    split = data.splits["test"]
    n = min(len(split), max_instances)
    per_block: list[list[np.ndarray]] = []
    with torch.no_grad():
        for start in range(0, n, batch_size):
            x = split.rows(start, min(n, start + batch_size)).to_batch()  # with multi-valued ids, if any
            _, masks = model(x, return_masks=True)
            if not per_block:
                per_block = [[] for _ in masks]
            for i, m in enumerate(masks):
                per_block[i].append(m.numpy().astype(np.float32))
    return [np.concatenate(b) for b in per_block], np.asarray(split.y[:n])


def analyse(run_dir: Path, data, max_instances: int) -> dict[str, Any]:
    masks, labels = mask_values(run_dir, data, max_instances)
    n = len(labels)
    blocks = []
    for i, m in enumerate(masks):
        v = m.ravel().astype(np.float64)
        mean, std = float(v.mean()), float(v.std())
        lo, hi = np.percentile(v, [0.5, 99.5])
        counts, edges = np.histogram(v, bins=HIST_BINS, range=(float(lo), float(hi)))
        blocks.append(
            {
                "block": i + 1,
                "width": int(m.shape[1]),
                "mean": mean,
                "std": std,
                "min": float(v.min()),
                "max": float(v.max()),
                "share_near_zero": float(np.mean(np.abs(v) < NEAR_ZERO)),
                "share_abs_below_half_std": float(np.mean(np.abs(v) < 0.5 * std)),
                "share_within_1std": float(np.mean(np.abs(v - mean) < std)),  # 0.683 for a normal
                "excess_kurtosis": float(np.mean(((v - mean) / std) ** 4) - 3) if std > 0 else float("nan"),
                "hist_counts": counts.tolist(),
                "hist_edges": edges.tolist(),
            }
        )
    # two instances: the first positive and the first negative test row
    pos = int(np.flatnonzero(labels == 1)[0]) if (labels == 1).any() else 0
    neg = int(np.flatnonzero(labels == 0)[0]) if (labels == 0).any() else min(1, n - 1)
    instances = []
    for row in (pos, neg):
        instances.append({"row": row, "label": int(labels[row]), "masks": [m[row].tolist() for m in masks]})
    # how different are the two instances' masks (relative mean absolute difference per block)
    differences = []
    for i, m in enumerate(masks):
        a, b = m[pos], m[neg]
        scale = float(np.mean(np.abs(m))) or 1.0
        differences.append(
            {
                "block": i + 1,
                "rel_mean_abs_diff": float(np.mean(np.abs(a - b)) / scale),
                "corr": float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 and b.std() > 0 else float("nan"),
            }
        )
    # across all instances: the share of each mask unit's variance that is between instances
    between = []
    for i, m in enumerate(masks):
        total = float(m.var())
        unit_means = m.mean(axis=0)
        between.append(float(1 - np.var(unit_means) / total) if total > 0 else float("nan"))
    return {
        "instances_analysed": n,
        "near_zero_threshold": NEAR_ZERO,
        "blocks": blocks,
        "examples": instances,
        "example_differences": differences,
        "share_of_variance_across_instances": between,
        "field_names": data.field_names,
        "embedding_dim": int(masks[0].shape[1] // data.num_fields) if masks else None,
    }
