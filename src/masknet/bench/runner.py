"""`masknet bench`: every measurement of one model x precision runs in its own process.

A job (one model, one precision) builds the model with the paper's config, then measures:

- training: `warmup` steps, then `steps` timed steps of exactly the trainer's step
  (`trainer.train_step`: loss, backward, finite check, Optimizer.step = LazyAdam on the table and
  fused Adam on the rest, bf16 autocast for precision bf16) on the prepared data through
  `iterate_batches`, in `rounds` rounds. After each round the step's matrix products are
  replayed (matmul.Roofline: in the step's own layouts, the best layouts, the best MKL layouts),
  so that every roofline fraction compares a step and a GEMM rate measured under the same load;
  the report keeps the medians over rounds, by wall time and by process CPU time. The time spent
  in the batch iterator is timed apart from the step: train samples/s excludes it and
  `data_wait_fraction` reports it (wait / (wait + step)). Because the iterator loads and shuffles
  a block of rows every `shuffle_block_rows` rows, `data_cost_fraction` also reports the amortised
  cost: one full pass of the iterator over the train split, per batch, over the step time.
- prediction: eval mode, inference_mode, batches of 1024 and 8192 rows already in memory, in
  rounds each followed by a replay of the forward's products at that batch (the prediction
  roofline). fp32 jobs also measure int8 dynamic quantization (every nn.Linear, torch.ao
  quantize_dynamic) and bf16 jobs the bf16-autocast forward; both report the test AUC difference
  against the fp32 forward of the same weights (those of the training measurement).
- latency: one request = score 1,000 candidates (one forward of 1,000 rows), p50 / p99.
- peak RSS: the job process's ru_maxrss (the data is memory-mapped, so it counts the pages read).
- roofline: FLOPs per sample (flops.py) and the GEMM rate at the model's shapes (matmul.py).
"""

from __future__ import annotations

import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..errors import UserError

QUICK_MODEL = dict(
    embedding_dim=4, block_dim=16, top_mlp=[16], dnn_hidden=[16, 16], cin_layers=[8, 8],
    attention_layers=1, attention_dim=4,
)


@dataclass
class Job:
    model: str
    precision: str  # "fp32" | "bf16"
    data: str  # prepared dataset folder
    steps: int = 30
    warmup: int = 5
    threads: int = 2
    batch_size: int = 1024
    predict_rows: int = 32768
    latency_reps: int = 100
    auc_rows: int = 50000
    quick: bool = False
    vocab_rows: int = 0  # > 0: vocabulary test, random indices over this many embedding rows
    seed: int = 2021
    rounds: int = 5  # timed steps (and predictions) in this many rounds, each followed by a GEMM replay


def _model_config(name: str, quick: bool):
    from ..config import ModelConfig

    cfg = ModelConfig(name=name)
    if quick:
        for k, v in QUICK_MODEL.items():
            setattr(cfg, k, v)
    return cfg


def _scaled_cardinalities(base: list[int], total: int) -> list[int]:
    """Field sizes with the same proportions as `base`, summing to about `total` rows."""
    scale = total / sum(base)
    return [max(2, int(round(c * scale))) for c in base]


def _time_reps(fn, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def _percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, int(math.ceil(q / 100 * len(xs))) - 1))]


def _median(xs: list[float]) -> Optional[float]:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def _train_batches(job: Job, data, cards: list[int], multi: list, shuffle_block_rows: int):
    """Endless training batches: the train split as `fit` reads it, or for the vocabulary test
    uniformly random indices over the scaled vocabulary (the worst case for a sparse update)."""
    import torch

    from ..data.dataset import iterate_batches
    from .flops import random_batch

    if job.vocab_rows:
        g = torch.Generator().manual_seed(job.seed)
        while True:
            x = random_batch(cards, multi, job.batch_size, g)
            yield x, (torch.rand(job.batch_size, generator=g) < 0.25).float()
    epoch = 1
    while True:
        yield from iterate_batches(data.splits["train"], job.batch_size, (job.seed, epoch), shuffle_block_rows)
        epoch += 1


def _roofline_fields(prefix: str, rates: list[dict], measured: list[tuple[float, float]], flops_per_sample: float) -> dict[str, Any]:
    """Per round: roofline samples/s for each replay (best, the step's layout, best on MKL) and
    the measured rate's fraction of it, by wall time and by process CPU time (measured: per
    round (samples per wall second, samples per CPU second)); the report keeps the medians."""
    out: dict[str, Any] = {}
    for kind, suffix in (("best", ""), ("step", "_step_layout"), ("best_mkl", "_best_aten")):
        for clock, i, tag in (("", 0, ""), ("_cpu", 1, "_cpu")):
            roofs = [r[kind + clock] * 1e9 / flops_per_sample for r in rates]
            out[f"roofline_{prefix}_samples_per_s{suffix}{tag}"] = _median(roofs)
            out[f"{prefix}_roofline_fraction{suffix}{tag}"] = _median([m[i] / f if f else None for m, f in zip(measured, roofs)])
            out[f"gemm_gflops_{prefix}{suffix}{tag}"] = _median([r[kind + clock] for r in rates])
    return out


@dataclass
class _Bench:
    """One job's model, data and settings, built once by `_setup` and read by each measurement."""

    job: Job
    model: Any
    data: Any
    cards: list[int]
    multi: list
    tcfg: Any  # TrainConfig
    dtype: Any  # torch.float32 or torch.bfloat16
    flops: Any  # flops.Flops
    has_matmuls: bool
    timing: dict[str, Any]
    rounds: int


def run_job(job: Job) -> dict[str, Any]:
    """Every measurement of one job (model x precision), in this process: training with the
    trainer's own step, then (except the vocabulary test) prediction, latency and int8/bf16."""
    b, res = _setup(job)
    _measure_training(b, res)
    if not job.vocab_rows:
        _measure_prediction(b, res)
    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return res


def _setup(job: Job) -> tuple[_Bench, dict[str, Any]]:
    import torch

    from ..config import TrainConfig
    from ..data.dataset import load_prepared
    from ..models import build_model
    from ..models.layers import gemm_backend
    from ..training.memory import keep_freed_memory
    from ..training.trainer import seed_everything
    from .flops import counted_flops_per_sample

    torch.set_num_threads(job.threads)
    keep_freed_memory()  # as fit does
    seed_everything(job.seed)
    data = load_prepared(job.data)
    cards = data.cardinalities
    if job.vocab_rows:
        cards = _scaled_cardinalities(cards, job.vocab_rows)
    mcfg = _model_config(job.model, job.quick)
    multi = data.multi_valued  # multi-valued fields (bench --multi-valued), pooled by the embedding
    model = build_model(mcfg, cards, multi)
    tcfg = TrainConfig(batch_size=job.batch_size, precision=job.precision, seed=job.seed, threads=job.threads)
    dtype = torch.bfloat16 if job.precision == "bf16" else torch.float32
    res: dict[str, Any] = {"model": job.model, "precision": job.precision, "threads": torch.get_num_threads()}
    res["embedding_rows"] = sum(cards) + sum(m.cardinality for m in multi)
    res["multi_valued_fields"] = len(multi)
    res["parameters"] = sum(p.numel() for p in model.parameters())
    res["gemm_backend"] = gemm_backend()
    flops = counted_flops_per_sample(model, cards, multi_valued=multi)
    res.update(flops_forward_per_sample=flops.forward, flops_train_per_sample=flops.train)
    has_matmuls = flops.train > 0 and not job.vocab_rows  # the vocabulary test measures the step only
    timing = dict(rounds=1, min_seconds=0.001) if job.quick else dict(rounds=3, min_seconds=0.005)
    rounds = max(1, min(job.rounds, job.steps))
    return _Bench(job, model, data, cards, multi, tcfg, dtype, flops, has_matmuls, timing, rounds), res


def _measure_training(b: _Bench, res: dict[str, Any]) -> None:
    """The trainer's own step (train_step), in rounds; after each round the step's matrix products
    are replayed (own layouts, best layouts), so that each fraction compares a step and a roofline
    measured under the same load. Steps and rows are counted in a TrainState, as fit counts them."""
    from ..training.trainer import Optimizer, TrainState, train_step
    from .matmul import Roofline, record_products

    job, model, tcfg = b.job, b.model, b.tcfg
    optimizer = Optimizer(model, tcfg)
    res["embedding_update"] = optimizer.embedding_update
    model.train()
    it = _train_batches(job, b.data, b.cards, b.multi, tcfg.shuffle_block_rows)
    # the first steps allocate the optimizer state (the moments: 2x the table, page faults on
    # first touch): the vocabulary test warms up longer so that it measures steady state
    warmup = max(job.warmup, 3 if job.quick else 20) if job.vocab_rows else job.warmup
    for _ in range(warmup):
        x, y = next(it)
        train_step(model, optimizer, x, y, tcfg)
    roof = None
    if b.has_matmuls:
        x, y = next(it)
        roof = Roofline(record_products(lambda: train_step(model, optimizer, x, y, tcfg)), b.dtype)
        roof.choose(rounds=b.timing["rounds"] + 2, min_seconds=b.timing["min_seconds"])
        res["train_products_flops_per_sample"] = roof.step_flops / job.batch_size  # = flops_train_per_sample (tested)
        res["train_products"] = roof.layouts()
    state = TrainState()
    wait = step_time = step_cpu = 0.0
    round_rates, rates = [], []  # per round: (samples per second, samples per CPU second)
    for r in range(b.rounds):
        r_time, r_cpu, r_rows = 0.0, 0.0, 0
        for _ in range(job.steps // b.rounds + (1 if r < job.steps % b.rounds else 0)):
            t0 = time.perf_counter()
            x, y = next(it)
            t1 = time.perf_counter()
            c1 = time.process_time()
            step = train_step(model, optimizer, x, y, tcfg)
            t2 = time.perf_counter()
            wait += t1 - t0
            r_time += t2 - t1
            r_cpu += time.process_time() - c1
            r_rows += len(y)
            state.global_step += 1
        step_time += r_time
        step_cpu += r_cpu
        state.samples_seen += r_rows
        round_rates.append((r_rows / r_time, r_rows / r_cpu))
        if roof is not None:
            rates.append(roof.replay(**b.timing))
    n_rows, n_steps = state.samples_seen, state.global_step
    res["train_samples_per_s"] = n_rows / step_time
    res["train_samples_per_s_rounds"] = [r[0] for r in round_rates]
    res["train_samples_per_cpu_s"] = n_rows / step_cpu
    res["train_step_ms"] = 1000 * step_time / n_steps
    res["train_step_cpu_ms"] = 1000 * step_cpu / n_steps  # process CPU time (all threads): less sensitive to load
    # None: no matmuls (LR, FM) or the vocabulary test
    res.update(train_roofline_fraction=None, roofline_train_samples_per_s=None, gemm_gflops=None)
    if roof is not None:
        res.update(_roofline_fields("train", rates, round_rates, b.flops.train))
        res["gemm_gflops"] = res["gemm_gflops_train"]
        res["gemm_gflops_rounds"] = rates
    res["data_wait_fraction"] = wait / (wait + step_time)
    if not job.vocab_rows:
        per_batch = _data_seconds_per_batch(b)
        res["data_ms_per_batch"] = 1000 * per_batch
        res["data_cost_fraction"] = per_batch / (per_batch + step_time / n_steps)
    res["final_train_loss"] = float(step.loss.item())


def _data_seconds_per_batch(b: _Bench) -> float:
    """One full pass of the batch iterator over the train split, per batch (the amortised data cost)."""
    from ..data.dataset import iterate_batches

    t0, nb = time.perf_counter(), 0
    for _ in iterate_batches(b.data.splits["train"], b.job.batch_size, (b.job.seed, 99), b.tcfg.shuffle_block_rows):
        nb += 1
    return (time.perf_counter() - t0) / max(nb, 1)


def _split(x: Any, size: int) -> list:
    """A Batch (or tensor) in chunks of `size` rows."""
    return [x[i : i + size] for i in range(0, len(x), size)]


def _forward_fn(m: Any, autocast: bool):
    import torch

    def f(x):
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return m(x).float()
    return f


def _measure_prediction(b: _Bench, res: dict[str, Any]) -> None:
    """Prediction and latency with the weights after the training measurement, then the test AUC
    of bf16 (bf16 jobs) or int8 dynamic quantization (fp32 jobs) against the fp32 forward."""
    import numpy as np
    import torch

    from ..training.metrics import auc

    job, model = b.job, b.model
    model.eval()
    test = b.data.splits["test"]
    n_pred = min(job.predict_rows, len(test))
    x_test = test.rows(0, n_pred).to_batch()  # a Batch: single- and multi-valued ids
    y_test = np.asarray(test.y[:n_pred])

    def probabilities(f) -> np.ndarray:
        return torch.sigmoid(torch.cat([f(c) for c in _split(x_test[: job.auc_rows], 8192)])).double().numpy()

    ref = probabilities(_forward_fn(model, False))
    ref_auc = auc(y_test[: len(ref)], ref) if 0 < y_test[: len(ref)].sum() < len(ref) else float("nan")
    main = _forward_fn(model, job.precision == "bf16")
    res["predict_samples_per_s"], roof_8k = _predict_with_roofline(b, main, x_test, 8192)
    res["predict_1024_samples_per_s"], roof_1k = _predict_with_roofline(b, main, x_test, 1024)
    res.update(roof_8k)
    res.update(roof_1k)
    res["latency_1000_p50_ms"], res["latency_1000_p99_ms"] = latency(main, x_test, job)
    res["test_auc_fp32_forward"] = ref_auc
    if job.precision == "bf16":
        p = probabilities(main)
        res["test_auc_delta_vs_fp32_forward"] = auc(y_test[: len(p)], p) - ref_auc
        return
    # int8 dynamic quantization of every nn.Linear (weights int8, activations quantized per batch)
    import warnings

    from torch.ao.quantization import quantize_dynamic

    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch.ao")
    fq = _forward_fn(quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8), False)
    res["int8_predict_samples_per_s"] = _predict_rates(b, fq, x_test, 8192)[0]
    res["int8_predict_1024_samples_per_s"] = _predict_rates(b, fq, x_test, 1024)[0]
    res["int8_latency_1000_p50_ms"], res["int8_latency_1000_p99_ms"] = latency(fq, x_test, job)
    p = probabilities(fq)
    res["int8_test_auc_delta_vs_fp32"] = auc(y_test[: len(p)], p) - ref_auc


def _predict_rates(b: _Bench, f, x_test: Any, batch: int) -> tuple[float, float]:
    """(samples per second, samples per process-CPU second) over the test rows at `batch`."""
    n_pred = len(x_test)
    chunks = _split(x_test, batch)
    f(chunks[0])  # warm-up
    reps = 1 if b.job.quick else max(1, (32768 + n_pred - 1) // n_pred)
    c0, t0 = time.process_time(), time.perf_counter()
    for _ in range(reps):
        for c in chunks:
            f(c)
    return reps * n_pred / (time.perf_counter() - t0), reps * n_pred / max(time.process_time() - c0, 1e-9)


def _predict_with_roofline(b: _Bench, f, x_test: Any, batch: int) -> tuple[float, dict[str, Any]]:
    """samples/s at `batch` (median of rounds) and, with matmuls, its roofline at the forward's
    own products (replayed after each round)."""
    import torch

    from .matmul import Roofline, record_products

    if not b.has_matmuls:
        return _median([_predict_rates(b, f, x_test, batch)[0] for _ in range(b.rounds)]), {}
    with torch.inference_mode():
        pred_roof = Roofline(record_products(lambda: f(x_test[:batch])), b.dtype)
    pred_roof.choose(rounds=b.timing["rounds"] + 2, min_seconds=b.timing["min_seconds"])
    measured, pred_rates = [], []
    for _ in range(b.rounds):
        measured.append(_predict_rates(b, f, x_test, batch))
        pred_rates.append(pred_roof.replay(**b.timing))
    fields = _roofline_fields(f"predict_{batch}", pred_rates, measured, b.flops.forward)
    fields[f"predict_{batch}_samples_per_cpu_s"] = _median([m[1] for m in measured])
    return _median([m[0] for m in measured]), fields


def latency(f, x_test, job: Job) -> tuple[float, float]:
    """p50 and p99 ms of one request: a forward of 1,000 candidate rows."""
    cand = x_test[:1000]
    for _ in range(5):
        f(cand)
    ts = _time_reps(lambda: f(cand), job.latency_reps)
    return 1000 * _percentile(ts, 50), 1000 * _percentile(ts, 99)


# ---------------------------------------------------------------------------
# Orchestration (parent process)


def _run_child(job: Job, log) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="masknet-bench-") as tmp:
        spec, out = Path(tmp) / "job.json", Path(tmp) / "result.json"
        spec.write_text(json.dumps(asdict(job)))
        proc = subprocess.run([sys.executable, "-m", "masknet.bench.runner", str(spec), str(out)], capture_output=True, text=True)
        if proc.returncode != 0 or not out.exists():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            log(f"  {job.model}/{job.precision}: FAILED ({tail[0]})")
            return {"model": job.model, "precision": job.precision, "error": tail[0]}
        return json.loads(out.read_text())


def auc_check(data_dir: str, rows: int, epochs: int, threads: int, seed: int, quick: bool, model: str = "sermasknet") -> dict[str, Any]:
    """Train `model` in fp32 and in bf16 with the same data and seed (trainer.fit); test AUC of each."""
    import numpy as np
    import torch

    from ..config import TrainConfig
    from ..data.dataset import CTRDataset, Split, load_prepared
    from ..models import build_model
    from ..training.trainer import evaluate, fit, seed_everything

    torch.set_num_threads(threads)
    data = load_prepared(data_dir)

    def head(s: Split, n: int) -> Split:
        n = min(n, len(s))
        r = s.rows(0, n)
        return Split(r.x, np.asarray(s.y[:n]), None, r.seq, r.seq_weights)

    sub = CTRDataset(data.field_names, data.cardinalities, {
        "train": head(data.splits["train"], rows),
        "valid": head(data.splits["valid"], max(rows // 8, 1)),
        "test": head(data.splits["test"], max(rows // 8, 1)),
    }, data.meta, data.multi_valued)
    out: dict[str, Any] = {"data": str(data_dir), "train_rows": len(sub.splits["train"]), "epochs": epochs, "model": model}
    for precision in ("fp32", "bf16"):
        seed_everything(seed)
        m = build_model(_model_config(model, quick), sub.cardinalities, sub.multi_valued)
        # exactly `epochs` epochs, validated at each end, as this check has always run (the paper's protocol)
        cfg = TrainConfig(epochs=epochs, precision=precision, seed=seed, threads=threads, progress=False, checkpoints=False,
                          patience=epochs, evals_per_epoch=1, eval_min_steps=1, min_steps=0, lr_warmup_steps=0, lr=1e-3)
        r = fit(m, sub, cfg)
        out[precision] = {"test_auc": evaluate(m, sub.splits["test"])["auc"], "train_samples_per_s": r.samples_per_second}
    out["test_auc_delta"] = out["bf16"]["test_auc"] - out["fp32"]["test_auc"]
    return out


def _load() -> Optional[float]:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


SMOKE_NOTE = (
    "SMOKE TEST (--quick: tiny models, 20,000 rows, 3 timed steps, 5 latency requests): these figures only show "
    "that the benchmark runs; they are noise, not measurements. Run `masknet bench` without --quick for numbers."
)


def format_table(results: list[dict[str, Any]], quick: bool = False) -> str:
    """One line per model x precision. frac: training samples/s over the best-layout roofline
    (wall time), cpu: the same by process CPU time, mkl: over the best MKL-only roofline;
    f@1k: prediction at batch 1024 over its roofline."""
    head = (
        f"{'model':<12}{'prec':<6}{'train/s':>9}{'roofline/s':>11}{'frac':>6}{'cpu':>6}{'mkl':>6}{'GFLOP/s':>9}"
        f"{'pred@1k/s':>11}{'f@1k':>6}{'pred@8k/s':>11}{'int8@8k/s':>11}{'p50 ms':>8}{'p99 ms':>8}{'RSS MB':>8}{'wait%':>7}"
    )
    lines = [head, "-" * len(head)]
    for r in results:
        if "error" in r:
            lines.append(f"{r['model']:<12}{r['precision']:<6}  error: {r['error']}")
            continue
        i8 = r.get("int8_predict_samples_per_s")
        num = lambda v, fmt: format(v, fmt) if v is not None else "-"  # noqa: E731
        lines.append(
            f"{r['model']:<12}{r['precision']:<6}{r['train_samples_per_s']:>9,.0f}{num(r['roofline_train_samples_per_s'], ',.0f'):>11}"
            f"{num(r['train_roofline_fraction'], '.2f'):>6}{num(r.get('train_roofline_fraction_cpu'), '.2f'):>6}"
            f"{num(r.get('train_roofline_fraction_best_aten'), '.2f'):>6}{num(r['gemm_gflops'], '.1f'):>9}"
            f"{r['predict_1024_samples_per_s']:>11,.0f}{num(r.get('predict_1024_roofline_fraction'), '.2f'):>6}"
            f"{r['predict_samples_per_s']:>11,.0f}{(f'{i8:,.0f}' if i8 else '-'):>11}{r['latency_1000_p50_ms']:>8.2f}"
            f"{r['latency_1000_p99_ms']:>8.2f}{r['peak_rss_mb']:>8.0f}{100 * r['data_wait_fraction']:>7.2f}"
        )
    if quick:  # above and below the table: a screenshot of either part still says so
        lines = [SMOKE_NOTE, *lines, SMOKE_NOTE]
    return "\n".join(lines)


def run_bench(
    models: list[str], precisions: list[str], rows: int, steps: int, output: Path, quick: bool = False,
    threads: int = 2, data: Optional[str] = None, vocab: tuple[int, int] = (100_000, 10_000_000),
    auc_rows: int = 0, auc_data: Optional[list[str]] = None, log=print, job_options: Optional[dict] = None,
    multi_valued: bool = False,
) -> dict[str, Any]:
    """With `multi_valued`, the generated data has the planted multi-valued field T1 (mean length 10,
    max 20) dropped, and every model x precision also trains on the same rows with T1 as a
    multi-valued field right after (alternating, so both see the same load): report["multi_valued"]
    holds those results and the training samples/s ratio with / without per model and precision."""
    from ..data.synthetic import write_synthetic

    if multi_valued and data is not None:
        raise UserError("--multi-valued generates its own data (the built-in data with and without the field); drop --data")

    t_start = time.time()
    report: dict[str, Any] = {
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "load_avg_1m_start": _load(),
        "threads": threads, "quick": quick, "cpu_capability": None, "torch": None,
    }
    if quick:
        report["smoke_test"] = SMOKE_NOTE
    import torch

    report["torch"] = torch.__version__
    report["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    with tempfile.TemporaryDirectory(prefix="masknet-bench-data-") as tmp:
        if data is None:
            data = str(Path(tmp) / "synthetic")
            t0 = time.perf_counter()
            write_synthetic(data, rows, multi_valued="drop" if multi_valued else "none")
            log(f"generated {rows:,} synthetic Criteo-like rows in {time.perf_counter() - t0:.1f} s -> {data}")
        mv_data = None
        if multi_valued:
            mv_data = str(Path(tmp) / "synthetic-mv")
            write_synthetic(mv_data, rows, multi_valued="list")
            log(f"generated the same rows with the multi-valued field T1 -> {mv_data}")
        report["data"] = {"path": data, "rows": rows}
        base = dict(data=data, steps=steps, threads=threads, quick=quick, **(job_options or {}))
        if quick:
            base.update(warmup=1, batch_size=256, predict_rows=2048, latency_reps=5, auc_rows=2048)
        results, mv_results, ratios = [], [], {}
        for name in models:
            for precision in precisions:
                log(f"{name} {precision} ... (load {_load():.1f})")
                results.append(_run_child(Job(model=name, precision=precision, **base), log))
                if mv_data is not None:
                    log(f"{name} {precision} with the multi-valued field ... (load {_load():.1f})")
                    mv_results.append(_run_child(Job(model=name, precision=precision, **dict(base, data=mv_data)), log))
                    a, b = results[-1].get("train_samples_per_s"), mv_results[-1].get("train_samples_per_s")
                    ratios[f"{name}/{precision}"] = b / a if a and b else None
                partial = {**report, "results": results, "partial": True}
                if mv_data is not None:
                    partial["multi_valued"] = {"results": mv_results, "ratios": ratios}
                output.write_text(json.dumps(partial, indent=2, default=float))
        report["results"] = results
        if mv_data is not None:
            report["multi_valued"] = {"field": "T1", "mean_length": 10, "max_len": 20, "results": mv_results, "ratios": ratios}
        report["models"] = {m: {r["precision"]: r for r in results if r["model"] == m} for m in models}
        if vocab:
            report["vocab_scaling"] = _vocab_scaling(models, vocab, base, log)
        if auc_rows:
            checks = []
            for d in [data, *(auc_data or [])]:
                log(f"AUC check fp32 vs bf16 on {d} ...")
                checks.append(auc_check(d, auc_rows, 1, threads, 2021, quick))
            report["auc_check"] = checks
    report["load_avg_1m_end"] = _load()
    report["seconds"] = time.time() - t_start
    output.write_text(json.dumps(report, indent=2, default=float))
    return report


def _vocab_scaling(models: list[str], vocab: tuple[int, int], base: dict[str, Any], log) -> dict[str, Any]:
    """SerMaskNet fp32 (else the first model), random indices, total vocabulary small vs large."""
    vocab_model = "sermasknet" if "sermasknet" in models or not models else models[0]
    vs = {}
    for total in vocab:
        log(f"vocabulary {total:,} rows ({vocab_model} fp32) ...")
        vs[str(total)] = _run_child(Job(model=vocab_model, precision="fp32", vocab_rows=total, **base), log)
    small, large = (vs[str(v)].get("train_samples_per_s") for v in vocab)
    cpu_small, cpu_large = (vs[str(v)].get("train_step_cpu_ms") for v in vocab)
    return {
        "model": vocab_model, "results": vs, "ratio_large_over_small": large / small if small and large else None,
        "cpu_time_ratio_large_over_small": cpu_small / cpu_large if cpu_small and cpu_large else None,
    }


def _child_main(argv: list[str]) -> int:
    spec, out = Path(argv[0]), Path(argv[1])
    job = Job(**json.loads(spec.read_text()))
    out.write_text(json.dumps(run_job(job), default=float))
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
