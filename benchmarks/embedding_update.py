"""The embedding tables' update by table size: which one the trainer should run (issue 21, item 1).

For tables of 10k to 3M rows (k = 10) and one batch's lookups (1024 rows x 39 fields = 39,936
indices: a batch of the built-in synthetic data, its rows scaled proportionally to the table
size, as the bench's vocabulary test does), it times one optimizer step, in interleaved
rounds (medians), of

- lazy:       embedding_update.LazyAdam on the sparse row gradient (what the trainer runs);
- sparseadam: torch.optim.SparseAdam on the same gradient (the same update);
- dense:      torch.optim.Adam(fused=True) on the dense gradient (every row decays: another
              update, the one `train.sparse_embeddings=false` runs; its gradient's densification
              is not timed).

    python benchmarks/embedding_update.py [--threads 1] [--rounds 7]

With one thread: process CPU time, else wall time. Prints the load average.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

from masknet.data.synthetic import cardinalities, generate
from masknet.training.embedding_update import LazyAdam

LOOKUPS = 1024 * 39
K = 10


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--rows", default="10000,100000,683161,3000000", help="table sizes, comma-separated")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.threads == 1 else time.perf_counter
    load_start = os.getloadavg()[0]
    g = torch.Generator().manual_seed(0)
    cards = cardinalities()
    total = sum(cards)
    batch = torch.from_numpy(generate(2000, seed=0).splits["train"].x[:1024].astype("int64"))
    lookups = (batch + torch.tensor([0] + cards[:-1]).cumsum(0)).flatten()  # rows of the 683,161-row table
    print(f"ms per step, median of {args.rounds} rounds, {LOOKUPS:,} lookups, k = {K}, {args.threads} thread(s)")
    print(f"{'rows':>10}{'unique':>8}{'lazy':>8}{'sparseadam':>11}{'dense':>8}{'lazy/sparse':>12}{'lazy/dense':>11}")
    for rows in (int(r) for r in args.rows.split(",")):
        idx = lookups * rows // total  # the batch's rows, scaled to this table size
        grad = torch.sparse_coo_tensor(idx[None], torch.randn(LOOKUPS, K, generator=g), (rows, K))
        dense_grad = grad.to_dense()
        cases = {}
        for name in ("lazy", "sparseadam", "dense"):
            p = torch.nn.Parameter(torch.randn(rows, K, generator=g))
            opt = {"lazy": LazyAdam, "sparseadam": torch.optim.SparseAdam}.get(name)
            opt = opt([p]) if opt else torch.optim.Adam([p], fused=True)
            cases[name] = (p, opt, dense_grad if name == "dense" else grad)
        times: dict[str, list[float]] = {n: [] for n in cases}
        for r in range(args.rounds + 1):
            for name, (p, opt, gr) in cases.items():
                p.grad = gr
                t0 = clock()
                opt.step()
                if r:  # the first round creates the optimizer state
                    times[name].append(clock() - t0)
        ms = {n: 1000 * statistics.median(t) for n, t in times.items()}
        print(f"{rows:>10,}{idx.unique().numel():>8,}{ms['lazy']:>8.2f}{ms['sparseadam']:>11.2f}{ms['dense']:>8.2f}"
              f"{ms['lazy'] / ms['sparseadam']:>12.2f}{ms['lazy'] / ms['dense']:>11.2f}")
    print(f"load average {load_start:.1f} -> {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
