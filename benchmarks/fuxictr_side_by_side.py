"""masknet against FuxiCTR's MaskNet, side by side in one process (issue 21).

Both libraries build the paper's SerMaskNet and ParaMaskNet (k = 10, 3 blocks of 400, reduction
ratio 2, ParaMaskNet's top MLP 3 x 400) on the same field cardinalities, then, in alternating
rounds (masknet, FuxiCTR, masknet, ...; medians of the rounds):

- train: each library's own step on the same batches: masknet's `train_step` (lazy Adam on the
  tables, fused Adam on the rest), FuxiCTR's `BaseModel.train_step` (its Adam on every parameter,
  gradient clipping at 10, as its `fit` sets);
- predict: eval mode, gradients off (masknet: inference_mode; FuxiCTR: its `predict`'s no_grad),
  batches of 1024 and 8192 rows already in memory.

First it checks that the two compute the same function: FuxiCTR's weights are copied into
masknet's model (FuxiCTR's single LN_EMB into each of masknet's per-block LN_EMBs) and the
logits compared (FuxiCTR returns sigmoid probabilities; their logit is compared).

FuxiCTR is never a dependency of masknet. Install it in a venv of its own (tested: torch==2.13.0,
then `pip install fuxictr==2.3.10 --no-deps` plus what its imports need: pandas scikit-learn tqdm
h5py pyyaml polars pydantic ray, and `pip install -e` of this checkout), and give the path of its
MaskNet model file, which the pip package does not ship (`model_zoo/MaskNet/src/MaskNet.py` from a
FuxiCTR checkout), with --fuxictr-masknet.

    python benchmarks/fuxictr_side_by_side.py --fuxictr-masknet PATH [--threads 2] [--rounds 5]
        [--data PREPARED_DIR] [--json out.json]

Without --data the built-in synthetic data's cardinalities (683,161 rows) and batches of its
generator are used. Prints samples/s of each and the ratio masknet / FuxiCTR, with the load average.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from masknet.config import ModelConfig, TrainConfig
from masknet.models import build_model
from masknet.training.memory import keep_freed_memory
from masknet.training.trainer import Optimizer, train_step


def load_fuxictr_masknet(path: str):
    spec = importlib.util.spec_from_file_location("fuxictr_model_zoo_masknet", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.MaskNet


def fuxictr_model(masknet_cls, cards: list[int], name: str, model_root: str):
    from fuxictr.features import FeatureMap

    fmap = FeatureMap("side_by_side", model_root)
    fmap.features = OrderedDict((f"f{i}", {"type": "categorical", "vocab_size": c, "source": ""}) for i, c in enumerate(cards))
    fmap.labels = ["label"]
    fmap.num_fields = len(cards)
    model = masknet_cls(
        fmap, model_id=name, gpu=-1, learning_rate=1e-3, embedding_dim=10, dnn_hidden_units=[400, 400, 400],
        model_type="SerialMaskNet" if name == "sermasknet" else "ParallelMaskNet", parallel_num_blocks=3,
        parallel_block_dim=400, reduction_ratio=2, net_dropout=0, emb_layernorm=True, net_layernorm=True,
        optimizer="adam", loss="binary_crossentropy", task="binary_classification", model_root=model_root,
        verbose=0, metrics=["AUC"],
    )
    model._max_gradient_norm = 10.0  # what its fit() sets before training
    return model


def copy_weights(fx, ours) -> None:
    """FuxiCTR's parameters into masknet's model (same function: the logits must agree)."""
    with torch.no_grad():
        tables = [fx.embedding_layer.embedding_layer.embedding_layers[f"f{i}"].weight for i in range(ours.num_fields)]
        ours.embedding.weight.copy_(torch.cat(tables))
        gain = torch.stack([ln.weight for ln in fx.emb_norm])
        bias = torch.stack([ln.bias for ln in fx.emb_norm])
        for block, fblock in zip(ours.blocks, fx.mask_net.mask_blocks):
            if block.emb_norm is not None:  # FuxiCTR normalizes once for all blocks: the same gains in each
                block.emb_norm.weight.copy_(gain)
                block.emb_norm.bias.copy_(bias)
            for mine, theirs in ((block.mask.aggregation, fblock.mask_layer[0]), (block.mask.projection, fblock.mask_layer[2]),
                                 (block.hidden, fblock.hidden_layer[0]), (block.hidden_norm, fblock.hidden_layer[1])):
                mine.weight.copy_(theirs.weight)
                if mine.bias is not None:
                    mine.bias.copy_(theirs.bias)
        if ours.cfg.name == "sermasknet":
            out = fx.mask_net.fc[0]
        else:
            linears = [m for m in fx.mask_net.dnn.mlp if isinstance(m, torch.nn.Linear)]
            for mine, theirs in zip([m for m in ours.top if isinstance(m, torch.nn.Linear)], linears[:-1]):
                mine.weight.copy_(theirs.weight)
                mine.bias.copy_(theirs.bias)
            out = linears[-1]
        ours.prediction.weight.copy_(out.weight)
        ours.prediction.bias.copy_(out.bias)


def batches(cards: list[int], data: str | None, n: int, rows: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """n batches of `rows` rows: the prepared data's train split, or the synthetic generator's rows."""
    if data:
        from masknet.data.dataset import load_prepared

        split = load_prepared(data).splits["train"]
        x, y = np.asarray(split.x[: n * rows]).astype(np.int64), np.asarray(split.y[: n * rows]).astype(np.float32)
    else:
        from masknet.data.synthetic import generate

        ds = generate(int(n * rows / 0.8) + 10, seed=seed)  # the train split is 80% of the rows
        x, y = np.asarray(ds.splits["train"].x).astype(np.int64), np.asarray(ds.splits["train"].y).astype(np.float32)
    x, y = torch.from_numpy(x), torch.from_numpy(y)
    return [(x[i * rows:(i + 1) * rows], y[i * rows:(i + 1) * rows]) for i in range(len(x) // rows)]


def as_fuxictr(x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    d = {f"f{i}": x[:, i] for i in range(x.shape[1])}
    d["label"] = y
    return d


def timed(fn, reps: int) -> float:
    t0 = time.perf_counter()
    for i in range(reps):
        fn(i)
    return time.perf_counter() - t0


def side_by_side(name: str, masknet_cls, cards: list[int], train_batches, pred_rows: torch.Tensor, rounds: int, steps: int, tmp: str) -> dict:
    torch.manual_seed(0)
    fx = fuxictr_model(masknet_cls, cards, name, tmp)
    ours = build_model(ModelConfig(name=name), cards)
    copy_weights(fx, ours)
    fx.eval()
    ours.eval()
    x = pred_rows[:2048]
    with torch.no_grad():
        p = fx(as_fuxictr(x, torch.zeros(len(x))))["y_pred"].squeeze(-1).double()
        agree = (torch.logit(p) - ours(x).double()).abs().max().item()
    tcfg = TrainConfig()
    opt = Optimizer(ours, tcfg)
    fx_batches = [as_fuxictr(*b) for b in train_batches]

    def ours_train(i):
        xb, yb = train_batches[i % len(train_batches)]
        train_step(ours, opt, xb, yb, tcfg)

    def fx_train(i):
        fx.train_step(fx_batches[i % len(fx_batches)])

    def ours_predict(batch):
        chunks = list(pred_rows.split(batch))
        def run(i):
            with torch.inference_mode():
                ours(chunks[i % len(chunks)])
        return run

    def fx_predict(batch):
        chunks = [as_fuxictr(c, torch.zeros(len(c))) for c in pred_rows.split(batch)]
        def run(i):
            with torch.no_grad():
                fx(chunks[i % len(chunks)])
        return run

    out = {"max_abs_logit_difference": agree}
    ours.train(), fx.train()
    for fn in (ours_train, fx_train):
        timed(fn, 3)  # warm-up: optimizer state, oneDNN primitives
    cases = {"train": (ours_train, fx_train, steps, train_batches[0][0].shape[0])}
    for batch in (1024, 8192):
        reps = max(2, (len(pred_rows) // batch))
        cases[f"predict_{batch}"] = (ours_predict(batch), fx_predict(batch), reps, batch)
    for case, (mine, theirs, reps, rows) in cases.items():
        if case.startswith("predict"):
            ours.eval(), fx.eval()
            timed(mine, 1), timed(theirs, 1)
        ratios, mine_rates, their_rates = [], [], []
        for _ in range(rounds):
            a = reps * rows / timed(mine, reps)
            b = reps * rows / timed(theirs, reps)
            mine_rates.append(a)
            their_rates.append(b)
            ratios.append(a / b)
        out[case] = {"masknet_samples_per_s": statistics.median(mine_rates), "fuxictr_samples_per_s": statistics.median(their_rates),
                     "ratio_median": statistics.median(ratios), "ratios": ratios}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fuxictr-masknet", required=True, metavar="PATH", help="model_zoo/MaskNet/src/MaskNet.py of a FuxiCTR checkout")
    ap.add_argument("--data", help="a prepared dataset folder (default: the built-in synthetic data)")
    ap.add_argument("--models", default="sermasknet,paramasknet")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=10, help="training steps per round")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    try:
        import fuxictr
    except ImportError:
        print("FuxiCTR is not installed (pip install fuxictr; never a masknet dependency)", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # masknet's fit does this; it helps FuxiCTR's steps alike
    masknet_cls = load_fuxictr_masknet(args.fuxictr_masknet)
    if args.data:
        from masknet.data.dataset import load_prepared

        cards = load_prepared(args.data).cardinalities
    else:
        from masknet.data.synthetic import cardinalities

        cards = cardinalities()
    train_batches = batches(cards, args.data, 16, 1024)
    pred = torch.cat([b[0] for b in batches(cards, args.data, 4, 8192, seed=1)])
    report = {"fuxictr": fuxictr.__version__ if hasattr(fuxictr, "__version__") else "?", "torch": torch.__version__,
              "threads": args.threads, "rounds": args.rounds, "embedding_rows": sum(cards), "load_avg_1m_start": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            report[name] = side_by_side(name, masknet_cls, cards, train_batches, pred, args.rounds, args.steps, tmp)
            r = report[name]
            print(f"{name}: logits agree to {r['max_abs_logit_difference']:.1e}")
            for case in ("train", "predict_1024", "predict_8192"):
                c = r[case]
                print(f"  {case:<13} masknet {c['masknet_samples_per_s']:>9,.0f}  FuxiCTR {c['fuxictr_samples_per_s']:>9,.0f}  "
                      f"ratio {c['ratio_median']:.2f} (rounds {min(c['ratios']):.2f}-{max(c['ratios']):.2f})")
    report["load_avg_1m_end"] = os.getloadavg()[0]
    print(f"load average {report['load_avg_1m_start']:.1f} -> {report['load_avg_1m_end']:.1f}; {args.threads} threads")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
