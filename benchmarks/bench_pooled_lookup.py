"""The pooled lookup of a multi-valued field alone: forward, backward and SparseAdam step.

Four ways to look up one batch of the 39 Criteo-like single-valued fields plus T1 (one
multi-valued field, max_len 20, mean length 10, 200 Zipf-distributed tags: the built-in data's),
each step timed in CPU time and interleaved with the others (load drift hits all alike):

    none      the 39 single-valued fields only (the reference the ratios divide)
    gather    FieldEmbedding.lookup = "gather": one F.embedding over [B, 39 + 20] with
              padding_idx, masked pooling (the path ONNX export uses)
    bag       F.embedding_bag on the same table over the same padded ids (bags of 1 for the
              single fields, one bag of 20 per row for T1; padding_idx keeps padding out of the
              mean), sparse gradients
    compact   FieldEmbedding.lookup = "compact" (what training uses): only the valid positions, each
              distinct value once, pooled by segment_reduce

Tables as in the models: `--dims 1` is LR's (k = 1), `--dims 1,10` FM's (its first-order table
and its factors), `--dims 10` SerMaskNet's (its step is dominated by the mask blocks, see
bench_multivalued.py).

    python benchmarks/bench_pooled_lookup.py --dims 1 --batch-size 1024
    python benchmarks/bench_pooled_lookup.py --dims 1,10 --batch-size 1024 --reps 200
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dims", default="1,10", help="embedding sizes of the tables, one table each")
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--rows", type=int, default=50_000)
    ap.add_argument("--reps", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json")
    args = ap.parse_args()

    import torch
    import torch.nn.functional as F

    from masknet.data.batch import Batch
    from masknet.data.dataset import iterate_batches
    from masknet.data.synthetic import write_synthetic
    from masknet.models.layers import FieldEmbedding

    torch.set_num_threads(args.threads)
    dims = [int(d) for d in args.dims.split(",")]

    def bag_lookup(emb: FieldEmbedding, batch: Batch) -> torch.Tensor:
        ids = batch.x + emb.offsets
        valid = (batch.seq != 0) | emb.seq_first
        rows = torch.where(valid, batch.seq + emb.seq_offsets, emb.pad_row)
        b, fs, width = ids.shape[0], ids.shape[1], rows.shape[1]
        per_row = torch.cat([torch.arange(fs), torch.tensor([fs])])  # bag starts within a row: fs singles, then T1
        starts = (torch.arange(b)[:, None] * (fs + width) + per_row).reshape(-1)
        flat = torch.cat([ids, rows], dim=1).reshape(-1)
        out = F.embedding_bag(flat, emb.weight, starts, mode="mean", sparse=True, padding_idx=emb.pad_row)
        return out.view(b, fs + 1, -1)

    with tempfile.TemporaryDirectory(prefix="masknet-bench-lookup-") as tmp:
        ds = write_synthetic(Path(tmp) / "list", args.rows, multi_valued="list")
        batches = [x for x, _ in iterate_batches(ds.splits["train"], args.batch_size, (2021, 1))]
    variants = {}
    for name in ("none", "gather", "bag", "compact"):
        torch.manual_seed(2021)
        tables = [FieldEmbedding(ds.cardinalities, d, multi_valued=() if name == "none" else ds.multi_valued) for d in dims]
        for t in tables:
            t.sparse = True
            t.lookup = name if name in ("gather", "compact") else t.lookup
        variants[name] = {"tables": tables, "opt": torch.optim.SparseAdam([t.weight for t in tables], lr=1e-3), "fwd": [], "bwd": [], "step": []}

    def lookup(name: str, table: FieldEmbedding, batch: Batch) -> torch.Tensor:
        if name == "none":
            return table(batch.x)
        return bag_lookup(table, batch) if name == "bag" else table(batch)

    # the same outputs and gradients, first (bag and compact against gather)
    check = batches[0]
    ref = lookup("gather", variants["gather"]["tables"][0], check)
    for name in ("bag", "compact"):
        diff = (lookup(name, variants[name]["tables"][0], check) - ref).abs().max().item()
        print(f"{name}: max |output - gather's| = {diff:.2e}")

    for i in range(5 + args.reps):
        for name, v in variants.items():
            stored = batches[i % len(batches)]
            batch = Batch(stored.x, stored.seq, stored.seq_weights)  # a new Batch per step, as training has (no memo())
            c0 = time.process_time()
            outs = [lookup(name, t, batch) for t in v["tables"]]
            c1 = time.process_time()
            sum(o.sum(dim=1).pow(2).sum() for o in outs).backward()  # a loss that needs every field's gradient
            c2 = time.process_time()
            v["opt"].step()
            v["opt"].zero_grad(set_to_none=True)
            c3 = time.process_time()
            if i >= 5:
                v["fwd"].append(c1 - c0)
                v["bwd"].append(c2 - c1)
                v["step"].append(c3 - c2)
    out = {"dims": dims, "batch_size": args.batch_size, "threads": args.threads, "load_avg": os.getloadavg()[0], "variants": {}}
    ref_total = None
    for name, v in variants.items():
        med = {k: 1000 * statistics.median(v[k]) for k in ("fwd", "bwd", "step")}
        total = 1000 * statistics.median([a + b + c for a, b, c in zip(v["fwd"], v["bwd"], v["step"])])
        ref_total = ref_total or total
        out["variants"][name] = {**med, "total_ms": total, "ratio_none_over_this": ref_total / total}
        print(f"{name:8s} forward {med['fwd']:6.2f} ms  backward {med['bwd']:6.2f} ms  SparseAdam {med['step']:6.2f} ms  "
              f"total {total:6.2f} ms  speed vs none {ref_total / total:.3f}")
    print(f"(CPU-time medians of {args.reps} interleaved steps, dims {dims}, batch {args.batch_size}, load {os.getloadavg()[0]:.1f})")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
