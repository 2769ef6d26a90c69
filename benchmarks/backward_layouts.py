"""Which layout runs a linear layer's weight gradient fastest on oneDNN? (issue 21, item 1)

For each Linear shape of SerMaskNet and ParaMaskNet (paper config, batch 1024) it times, in
interleaved rounds (medians), the weight gradient dW = dY^T X [out, in] computed as

- dYtX: `_linear_pointwise(dY^T, X^T)`: dY^T X on transposed views (oneDNN copies dY^T);
- XtdY: `_linear_pointwise(contiguous X^T, dY^T)^T` made contiguous: (X^T dY)^T, both copies
  included;
- mkl:  torch.mm(dY^T, X) (PyTorch's default fp32 kernel),

and the input gradient dX = dY W as `_linear_pointwise(dY, W^T)` (W read as is) against
torch.mm. The ratio XtdY / dYtX (< 1: XtdY faster) checks layers.weight_grad_as_xt_dy's rule (the last column).

    python benchmarks/backward_layouts.py [--threads 1] [--rounds 15]

With one thread it reports process CPU time (what co-tenant load disturbs least), with more
wall time. Prints the load average at start and end.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

from masknet.models.layers import weight_grad_as_xt_dy

_LP = torch.ops.mkldnn._linear_pointwise
# (in, out) of every Linear in SerMaskNet / ParaMaskNet (k = 10, 39 fields, blocks of 400, ratio 2)
SHAPES = [(390, 780), (780, 390), (390, 400), (390, 800), (800, 400), (400, 400), (1200, 400)]


def onednn(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return _LP(x, w, None, "none", [], "")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--batch", type=int, default=1024)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.threads == 1 else time.perf_counter
    load_start = os.getloadavg()[0]
    print(f"ms per product, median of {args.rounds} interleaved rounds, batch {args.batch}, "
          f"{args.threads} thread(s), {'process CPU' if args.threads == 1 else 'wall'} time")
    print(f"{'in':>5}{'out':>5} | {'dX onednn':>10}{'dX mkl':>8} | {'dYtX':>7}{'XtdY':>7}{'mkl':>7}{'XtdY/dYtX':>10}  rule")
    for fin, fout in SHAPES:
        x, gy, w = torch.randn(args.batch, fin), torch.randn(args.batch, fout), torch.randn(fout, fin)
        cases = {
            "dX onednn": lambda: onednn(gy, w.t()),
            "dX mkl": lambda: torch.mm(gy, w),
            "dYtX": lambda: onednn(gy.t(), x.t()),
            "XtdY": lambda: onednn(x.t().contiguous(), gy.t()).t().contiguous(),
            "mkl": lambda: torch.mm(gy.t(), x),
        }
        torch.testing.assert_close(cases["XtdY"](), cases["mkl"](), rtol=1e-4, atol=1e-3)
        times: dict[str, list[float]] = {k: [] for k in cases}
        for fn in cases.values():
            fn(), fn()  # warm-up: oneDNN primitives
        for _ in range(args.rounds):
            for name, fn in cases.items():
                t0 = clock()
                fn(), fn(), fn()
                times[name].append((clock() - t0) / 3)
        ms = {k: 1000 * statistics.median(v) for k, v in times.items()}
        rule = "XtdY" if weight_grad_as_xt_dy(fin, fout) else "dYtX"
        print(f"{fin:>5}{fout:>5} | {ms['dX onednn']:>10.2f}{ms['dX mkl']:>8.2f} | {ms['dYtX']:>7.2f}{ms['XtdY']:>7.2f}"
              f"{ms['mkl']:>7.2f}{ms['XtdY'] / ms['dYtX']:>10.2f}  {rule}")
    print(f"load average {load_start:.1f} -> {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
