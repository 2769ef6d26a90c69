"""The `masknet` command. Thin: parse arguments, call the library, turn UserError into exit 2."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from typing import Callable, Optional, Sequence

from .errors import UserError

SubcommandSetup = Callable[[argparse._SubParsersAction], None]

# What each optional part of masknet needs (pyproject.toml's extras): checked before the
# command starts, so a base install says in one line what to install.
EXTRAS = {
    "serve": ("onnx", "onnxruntime", "fastapi", "uvicorn", "msgspec"),
    "plots": ("matplotlib",),
    "tune": ("optuna", "matplotlib"),
}


def _require(extra: str, command: str) -> None:
    import importlib.util

    missing = [m for m in EXTRAS[extra] if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(f"{command} needs the [{extra}] extra ({', '.join(missing)} missing): pip install 'masknet[{extra}]'")


def _add_train(sub: argparse._SubParsersAction) -> None:
    from .registry import model_help, model_names

    p = sub.add_parser(
        "train",
        help="train and evaluate a model (default: SerMaskNet on the built-in synthetic data)",
        description=(
            "Train a model, validate on a step schedule (a few times per epoch), early-stop on validation AUC, "
            "evaluate the best evaluation's weights on the test split and write a run folder (config.yaml, "
            "metrics.json, log.jsonl, model.safetensors). Settings resolve in order: defaults (the paper's model "
            "sizes; training defaults chosen to hold from small to large data, docs/model.md), --preset, "
            "--config FILE, the options below, then each --set."
        ),
    )
    p.add_argument("--model", choices=model_names(), metavar="MODEL", help=f"model to train (default: sermasknet): {model_help()}")
    p.add_argument(
        "--data",
        metavar="DIR",
        help="a prepared dataset folder (from `masknet prepare`); default: the built-in synthetic data",
    )
    p.add_argument(
        "--epochs", type=int, metavar="N",
        help="at most N epochs, exactly (sets train.epochs=N and train.min_steps=0; by default the cap is 10 epochs, "
        "raised on small data to 2,000 steps)",
    )
    p.add_argument("--seed", type=int, metavar="N", help="seed for initialisation and shuffling (default 2021)")
    p.add_argument("--config", metavar="FILE", help="a YAML run config (e.g. a previous run's config.yaml)")
    p.add_argument(
        "--preset",
        choices=("paper",),
        help="paper: the paper's training protocol (validation once per epoch, patience 1, constant lr 1e-3, no L2 prior)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config key, e.g. --set model.block_dim=200 --set train.lr=1e-4 (repeatable)",
    )
    p.add_argument(
        "--output",
        metavar="DIR",
        help="run folder (default: runs/<model>-<timestamp>; a saved run's config.yaml given to --config never "
        "sends the re-run back into that run's folder)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier run in --output (its checkpoints, metrics and weights are deleted first); without it "
        "a folder holding a run is refused. A folder holding anything else is never touched",
    )
    p.add_argument("--base-run", metavar="DIR", help="a finished run: report RelaImp (Eq. 20) against its test AUC")
    p.add_argument(
        "--resume",
        metavar="RUN",
        help="continue an interrupted run from its latest intact checkpoint, with its saved config; only --epochs, "
        "--quiet, --nproc and --set of train.lr, train.epochs, train.min_steps, train.patience, train.on_nan, "
        "train.threads, train.progress, train.checkpoint_every_steps, train.keep_checkpoints, train.checkpoint_overhead "
        "may be given (recorded in log.jsonl and config.yaml; a given epochs is an exact cap: it sets min_steps to 0)",
    )
    p.add_argument(
        "--nproc",
        type=int,
        metavar="N",
        help="train with N processes (DistributedDataParallel; gloo on CPU, NCCL on CUDA): launches torchrun for you; "
        "needs --output. Equivalent to `torchrun --nproc_per_node=N -m masknet train ...`",
    )
    p.add_argument(
        "--log",
        action="append",
        default=[],
        choices=("tensorboard", "mlflow"),
        help="also log loss, AUC, learning rate and samples/s per evaluation to TensorBoard (RUN/tensorboard; "
        "pip install tensorboard) or MLflow (MLFLOW_TRACKING_URI; pip install mlflow); repeatable. "
        "Same as --set train.tensorboard=true / train.mlflow=true",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .config import RunConfig, apply_override, apply_preset, load_config
    from .training.run import default_output, train_run
    from .runs import CONFIG
    from .training.runfolder import is_run_folder

    if args.nproc is not None and "WORLD_SIZE" not in os.environ:
        return _launch_torchrun(args)
    if args.resume:
        return _run_resume(args)
    cfg = apply_preset(RunConfig(), args.preset) if args.preset else RunConfig()
    if args.config:
        cfg = load_config(args.config, base=cfg)
    # re-running a saved run must not write back into it: its config's `output` is not reused
    saved_run = args.config is not None and Path(args.config).name == CONFIG and is_run_folder(Path(args.config).parent)
    if saved_run:
        cfg.output = None
    if args.model:
        cfg.model.name = args.model
    if args.data:
        cfg.data.path = args.data
    if args.epochs is not None:
        cfg.train.epochs, cfg.train.min_steps = args.epochs, 0
    if args.seed is not None:
        cfg.train.seed = args.seed
    if args.output:
        cfg.output = args.output
    if args.base_run:
        cfg.base_run = args.base_run
    if args.quiet:
        cfg.train.progress = False
    for tracker in args.log:
        setattr(cfg.train, tracker, True)
    for assignment in args.set:
        apply_override(cfg, assignment)
    if saved_run and cfg.output is None and os.environ.get("WORLD_SIZE", "1") == "1":
        cfg.output = str(default_output(cfg, saved_run=Path(args.config).parent))
        print(
            f"masknet train: {args.config} is a saved run's config; its folder is left alone and this run goes to "
            f"{cfg.output} (--output chooses another)", file=sys.stderr,
        )
    train_run(cfg, overwrite=args.overwrite)
    return 0


def _run_resume(args: argparse.Namespace) -> int:
    """--resume continues a run as it was configured: options that would change what it trains are refused."""
    from .training.run import resume_run

    given = {"--model": args.model, "--data": args.data, "--seed": args.seed, "--config": args.config,
             "--output": args.output, "--base-run": args.base_run, "--overwrite": args.overwrite or None}
    refused = [opt for opt, value in given.items() if value is not None]
    if refused:
        raise UserError(
            f"{refused[0]} cannot be combined with --resume (a resume continues the run with its saved config; "
            "--set of the keys `masknet train --help` lists under --resume may change)"
        )
    overrides = [f"train.epochs={args.epochs}"] if args.epochs is not None else []
    overrides += ["train.progress=false"] if args.quiet else []
    resume_run(args.resume, overrides=overrides + list(args.set))
    return 0


def _launch_torchrun(args: argparse.Namespace) -> int:
    """Re-run this same command under torchrun with N local processes (without --nproc)."""
    if args.nproc < 1:
        raise UserError(f"--nproc: must be >= 1, got {args.nproc}")
    if not args.output and not args.resume:
        raise UserError("--nproc needs --output (every process must write to the same run folder)")
    if not args.resume:  # refuse here in one line rather than in every process torchrun starts
        from pathlib import Path

        from .training.runfolder import check_new_run_folder

        check_new_run_folder(Path(args.output), args.overwrite)
    argv, rest, skip = [], list(args.argv), False
    for i, a in enumerate(rest):
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            argv.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}", "-m", "masknet", *argv]
    return subprocess.call(cmd)


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="write the built-in synthetic data to a prepared dataset folder",
        description=(
            "Generate the built-in Criteo-like synthetic data (planted model with a known true click "
            "probability) straight to disk in chunks, so any size fits in bounded memory."
        ),
    )
    from .config import SyntheticConfig  # torch-free

    p.add_argument("--rows", type=int, default=SyntheticConfig.rows, help=f"total rows, split 8:1:1 (default {SyntheticConfig.rows})")
    p.add_argument("--seed", type=int, default=SyntheticConfig.seed, help=f"generator seed (default {SyntheticConfig.seed})")
    p.add_argument("--output", required=True, metavar="DIR", help="folder to write")
    p.add_argument(
        "--multitask", action="store_true",
        help="two labels, click and purchase (a purchase only after a click), each with its true probability",
    )
    p.set_defaults(func=_run_generate)


def _run_generate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .data.synthetic import write_synthetic

    if args.rows < 100:
        raise UserError(f"--rows: must be >= 100, got {args.rows}")
    with tqdm(total=args.rows, unit="row", unit_scale=True, file=sys.stderr) as bar:
        ds = write_synthetic(args.output, args.rows, args.seed, progress=bar.update, multitask=args.multitask)
    print(f"wrote {args.output}: " + ", ".join(f"{s} {len(v):,}" for s, v in ds.splits.items()) + " rows")
    return 0


def _add_prepare(sub: argparse._SubParsersAction) -> None:
    from .data.formats import FORMATS, format_help, min_count_help

    p = sub.add_parser(
        "prepare",
        help=f"turn raw click logs ({', '.join(FORMATS)}, any CSV/Parquet) into a prepared dataset",
        description=(
            "Read raw click logs (gzip read directly), fit the encoder (vocabulary with a minimum count, "
            "numeric discretization, optional hashing) on the training split only, and write compact "
            "memory-mapped integer arrays plus encoder.json and stats (meta.json). Streams: memory stays "
            "flat as the input grows. See docs/data.md."
        ),
    )
    p.add_argument(
        "--format",
        required=True,
        metavar="FORMAT",
        help=format_help(),
    )
    p.add_argument("--input", metavar="FILE", help="one input file, split into train/valid/test (see --split)")
    p.add_argument(
        "--split",
        choices=("random", "time"),
        default="random",
        help="with --input: random 8:1:1 (seeded; default) or time-ordered (earliest 80%% train, next 10%% valid, "
        "last 10%% test, by the format's time column or else file order)",
    )
    p.add_argument("--train", metavar="FILE", help="explicit train file (with --valid and --test)")
    p.add_argument("--valid", metavar="FILE", help="explicit validation file")
    p.add_argument("--test", metavar="FILE", help="explicit test file")
    p.add_argument(
        "--output",
        required=True,
        metavar="DIR",
        help="prepared dataset folder to write: new, empty, or (with --overwrite) a prepared dataset",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the prepared dataset already in --output (it is kept until the new one is complete; "
        "a folder holding anything else is never replaced)",
    )
    p.add_argument(
        "--min-count",
        type=int,
        metavar="N",
        help=f"categories seen fewer than N times in train become out-of-vocabulary (default per format: {min_count_help()})",
    )
    p.add_argument(
        "--hash",
        action="append",
        default=[],
        metavar="FIELD=N",
        help="hash categorical FIELD into N buckets instead of a vocabulary (repeatable)",
    )
    p.add_argument(
        "--bad-lines",
        choices=("error", "skip"),
        default="error",
        help="error (default): stop at the first bad line, naming file, line and field; skip: drop, count and report them",
    )
    p.add_argument("--seed", type=int, default=2021, help="seed of the random split (default 2021)")
    p.set_defaults(func=_run_prepare)


def _run_prepare(args: argparse.Namespace) -> int:
    from .data.prepare import prepare
    from .data.formats import spec_for_format

    spec = spec_for_format(args.format).with_min_count(args.min_count)
    buckets = {}
    for item in args.hash:
        name, sep, n = item.partition("=")
        try:
            buckets[name.strip()] = int(n)
        except ValueError:
            raise UserError(f"--hash {item!r}: expected FIELD=N, e.g. --hash device_ip=1000000") from None
        if not sep:
            raise UserError(f"--hash {item!r}: expected FIELD=N, e.g. --hash device_ip=1000000")
    spec = spec.with_hashing(buckets)
    log = lambda msg: print(f"masknet prepare: {msg}", file=sys.stderr)  # noqa: E731
    stats = prepare(
        spec,
        args.output,
        input=args.input,
        train=args.train,
        valid=args.valid,
        test=args.test,
        split=args.split,
        seed=args.seed,
        bad_lines=args.bad_lines,
        log=log,
        overwrite=args.overwrite,
    )
    rows = stats["rows"]
    rate = stats["positive_rate"]
    print(
        f"wrote {args.output}: "
        + ", ".join(f"{s} {rows[s]:,} rows ({rate[s]:.1%} positive)" if rows[s] else f"{s} 0 rows" for s in rows)
        + f"; {len(stats['fields'])} fields" + (f" + {len(stats['multi_valued'])} multi-valued" if stats.get("multi_valued") else "")
        + f" in {stats['seconds']['total']:.1f} s"
    )
    for mv in stats.get("multi_valued", []):
        train = mv["lengths"]["train"] or {}
        print(
            f"  {mv['name']}: {mv['cardinality']:,} ids, lengths in train p50 {train.get('length_percentiles', {}).get('p50')} "
            f"p99 {train.get('length_percentiles', {}).get('p99')} max {train.get('length_percentiles', {}).get('max')}; "
            f"{train.get('truncated_rows', 0):,} train rows longer than max_len {mv['max_len']} (truncated)"
        )
        if mv["rows_with_several_values"] == 0:
            print(f"  note: no row of {mv['name']!r} has more than one value: is its separator right?")
    bad = stats["bad_lines"]
    if bad["total"]:
        kinds = ", ".join(f"{k} {v:,}" for k, v in sorted(bad["by_kind"].items()))
        print(f"skipped {bad['total']:,} bad lines ({kinds}); the first ones:")
        for ex in bad["examples"][:5]:
            where = ex.get("line", ex.get("row"))
            field = f" field {ex['field']!r}:" if ex["field"] else ""
            print(f"  {ex['file']}:{where}:{field} {ex['message']}")
    return 0


def _add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict",
        help="score raw rows with a trained model (the saved encoder does all preprocessing)",
        description=(
            "Read raw rows in the format the model was trained on (or --format, with the same fields), encode them "
            "with the run folder's saved encoder (unseen categories: out-of-vocabulary), and write one click "
            "probability per input row, in order, with the row's id column when the format has one. Streams: "
            "memory stays flat as the input grows. The bundle is verified against its manifest first."
        ),
    )
    p.add_argument("--model", required=True, metavar="RUN", help="a trained run folder (model bundle)")
    p.add_argument("--input", required=True, metavar="FILE", help="raw rows (gzip read directly); a label column is ignored")
    p.add_argument(
        "--format",
        metavar="FORMAT",
        help="read the input as this format instead of the training one (e.g. criteo-csv for a Criteo model); "
        "its fields must be the model's",
    )
    p.add_argument("--output", required=True, metavar="FILE", help="scores.csv or scores.parquet")
    p.add_argument("--id-column", metavar="COLUMN", help="copy this input column to the output (default: the format's id, e.g. Avazu's id)")
    p.add_argument(
        "--bad-lines",
        choices=("error", "skip"),
        default="error",
        help="error (default): stop at the first bad line; skip: leave it out (a `line` column maps scores to input lines)",
    )
    p.add_argument("--batch-size", type=int, default=8192, metavar="N", help="rows per forward pass (default 8192)")
    p.add_argument("--threads", type=int, metavar="N", help="torch threads (default: all cores)")
    p.set_defaults(func=_run_predict)


def _run_predict(args: argparse.Namespace) -> int:
    from .serving.bundle import verify_and_load
    from .serving.predict import predict_file

    bundle = verify_and_load(args.model, threads=args.threads)
    r = predict_file(
        bundle, args.input, args.output, fmt=args.format, bad_lines=args.bad_lines, batch_size=args.batch_size,
        id_column=args.id_column,
    )
    skipped = f" ({r['skipped']:,} bad lines skipped)" if r["skipped"] else ""
    print(f"wrote {r['output']}: {r['rows']:,} scores{skipped}")
    return 0


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="AUC and logloss of a trained model on a prepared split (or a labelled raw file)",
        description="Evaluate a trained run folder on a split of a prepared dataset (--data) or on labelled raw rows (--input).",
    )
    p.add_argument("--model", required=True, metavar="RUN", help="a trained run folder (model bundle)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", metavar="DIR", help="a prepared dataset folder encoded with the model's encoder")
    src.add_argument("--input", metavar="FILE", help="a labelled raw file in the model's format")
    p.add_argument("--split", default="test", choices=("train", "valid", "test"), help="with --data: the split (default test)")
    p.add_argument("--format", metavar="FORMAT", help="with --input: read it as this format (same fields)")
    p.add_argument("--threads", type=int, metavar="N", help="torch threads (default: all cores)")
    p.set_defaults(func=_run_evaluate)


def _run_evaluate(args: argparse.Namespace) -> int:
    import json

    from .serving.bundle import verify_and_load
    from .serving.predict import evaluate_file, evaluate_prepared

    bundle = verify_and_load(args.model, threads=args.threads)
    if args.data:
        r = evaluate_prepared(bundle, args.data, args.split)
    else:
        r = evaluate_file(bundle, args.input, args.format)
    print(json.dumps(r))
    return 0


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="export a trained model to ONNX",
        description=(
            "Export the run folder's model to ONNX: input x int64 [batch, fields] (encoded indices; dynamic batch), "
            "outputs score and logit [batch] ([batch, tasks] for a multi-task model; score_uncalibrated beside score "
            "when the bundle is calibrated). The export is run in onnxruntime and compared with PyTorch."
        ),
    )
    p.add_argument("--model", required=True, metavar="RUN", help="a trained run folder (model bundle)")
    p.add_argument("--format", default="onnx", choices=("onnx",), help="export format (onnx)")
    p.add_argument("--output", required=True, metavar="FILE", help="model.onnx")
    p.add_argument("--opset", type=int, default=17, metavar="N", help="ONNX opset (default 17)")
    p.set_defaults(func=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    _require("serve", "masknet export")
    from .serving.bundle import verify_and_load
    from .serving.export import export_onnx

    r = export_onnx(verify_and_load(args.model), args.output, opset=args.opset)
    print(f"wrote {r['output']} ({r['bytes']:,} bytes, opset {r['opset']}); onnxruntime vs PyTorch max |diff| {r['max_abs_diff']:.2e}")
    return 0


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="HTTP ranking service (FastAPI on uvicorn): /rank, /predict, /health, /metadata",
        description="Serve a trained run folder over HTTP. See docs/serving.md for the API; /docs has the OpenAPI UI.",
    )
    p.add_argument("--model", required=True, metavar="RUN", help="a trained run folder (model bundle)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; anything else warns: no authentication)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--runtime", choices=("torch", "onnx"), default="torch", help="PyTorch (default) or onnxruntime")
    p.add_argument("--precision", choices=("fp32", "int8", "bf16"), default="fp32",
                   help="fp32 (default); int8: dynamic quantization of the dense layers; bf16: autocast (torch only). "
                        "Its test-AUC difference from fp32 is measured at start-up")
    p.add_argument("--threads", type=int, metavar="N", help="intra-op threads of the one inference thread (default: all cores)")
    p.add_argument("--max-candidates", type=int, default=1000, metavar="N", help="most candidates (or rows) per request (default 1000)")
    p.add_argument("--max-body-bytes", type=int, default=8 << 20, metavar="N", help="largest request body (default 8 MiB)")
    p.add_argument("--max-value-chars", type=int, default=1024, metavar="N",
                   help="longest string value one feature may send (default 1024 characters)")
    p.add_argument("--max-batch-rows", type=int, default=2048, metavar="N",
                   help="dynamic batching: most rows in one forward pass (default 2048)")
    p.add_argument("--max-wait-ms", type=float, default=2.0, metavar="MS",
                   help="dynamic batching: longest wait for more requests while others are arriving (default 2)")
    p.add_argument("--max-queue-rows", type=int, default=8192, metavar="N",
                   help="rows that may wait for the model; a request beyond gets 503 + Retry-After (default 8192)")
    p.add_argument("--max-pending", type=int, default=16, metavar="N",
                   help="requests in the server at once (from their headers to their answer); beyond: 503 + Retry-After "
                        "before the body is read (default 16)")
    p.add_argument("--max-body-buffer", type=int, default=32 << 20, metavar="N",
                   help="bytes of request bodies held in memory at once; beyond: 503 + Retry-After (default 32 MiB)")
    p.add_argument("--body-timeout", type=float, default=10.0, metavar="S",
                   help="seconds a request's whole body may take to arrive; beyond: 408 (default 10)")
    p.add_argument(
        "--task-weights", metavar="TASK=W,...",
        help="multi-task bundles: weights of the combined score /rank ranks by (default 1 per task), e.g. click=1,purchase=20",
    )
    p.set_defaults(func=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:
    _require("serve", "masknet serve")
    from .serving.bundle import verify_and_load
    from .serving.service import serve

    for name in ("max_candidates", "max_body_bytes", "max_value_chars", "max_batch_rows", "max_queue_rows", "max_pending",
                 "max_body_buffer"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1")
    if args.max_wait_ms < 0 or (args.threads is not None and args.threads < 1):
        raise UserError("--max-wait-ms must be >= 0 and --threads >= 1")
    if not args.body_timeout > 0:
        raise UserError("--body-timeout must be > 0")
    from .serving.tasks import parse_weights

    bundle = verify_and_load(args.model, threads=args.threads)
    if args.task_weights and not bundle.multitask:
        raise UserError(f"--task-weights: {args.model} is a single-task model (task {bundle.tasks[0]!r})")
    weights = parse_weights(args.task_weights, bundle.tasks) if bundle.multitask else None
    serve(bundle, args.host, args.port, runtime=args.runtime, precision=args.precision, threads=args.threads,
          max_candidates=args.max_candidates, max_body_bytes=args.max_body_bytes, max_value_chars=args.max_value_chars,
          max_batch_rows=args.max_batch_rows, max_wait_ms=args.max_wait_ms, max_queue_rows=args.max_queue_rows,
          max_pending=args.max_pending, max_body_buffer=args.max_body_buffer, body_timeout_s=args.body_timeout,
          task_weights=weights)
    return 0


def _add_reproduce(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "reproduce",
        help="run the paper's Tables 2-6 and its mask analysis (RQ4) and write a report beside the published numbers",
        description=(
            "Train every cell of the paper's Table 2 (FM, DNN, DeepFM, DCN, xDeepFM, AutoInt, SerMaskNet, "
            "ParaMaskNet), Table 3 (ablations), Tables 4-6 (embedding size, number of blocks, reduction ratio) "
            "over several seeds with the same budget, analyse the masks of a 3-block SerMaskNet (RQ4), and write "
            "OUTPUT/report.md, OUTPUT/results.json and PNG plots. Each cell's result is saved as it finishes: "
            "rerunning with the same --output resumes. Settings resolve in order: the preset, --config FILE, "
            "--data, then each --set (applied to every cell)."
        ),
    )
    p.add_argument(
        "--preset",
        choices=("quick", "paper"),
        default="paper",
        help="quick: small models on 10k synthetic rows (10 fields), 2 epochs, 2 seeds (minutes on 2 cores); "
        "paper: the paper's settings, 3 seeds (default)",
    )
    p.add_argument("--tables", metavar="LIST", help="comma-separated subset of 2,3,4,5,6,rq4 (default: all)")
    p.add_argument("--seeds", type=int, metavar="N", help="seeds per cell (default: the preset's, 3 for paper, 2 for quick)")
    p.add_argument("--data", metavar="DIR", help="a prepared dataset folder; default: the built-in synthetic data")
    p.add_argument("--config", metavar="FILE", help="a YAML run config whose keys override the preset (model/seed/output keys ignored)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config key for every cell, e.g. --set train.threads=1 (repeatable)",
    )
    p.add_argument("--output", metavar="DIR", help="output folder (default: runs/reproduce-<timestamp>); an existing one resumes")
    p.add_argument(
        "--tune",
        type=int,
        metavar="N",
        help="equal tuning (BARS protocol): before the seeds run, tune every model with N trials of `masknet tune` "
        "and the same per-trial step cap; the report gives each claim's verdict with and without tuning (needs Optuna)",
    )
    p.add_argument("--tune-max-steps", type=int, metavar="N", help="with --tune: the step cap of every trial (default: the untuned cells' step budget)")
    p.add_argument("--tune-seed", type=int, default=0, metavar="N", help="with --tune: the sampler seed of every study (default 0)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=_run_reproduce)


def _run_reproduce(args: argparse.Namespace) -> int:
    import shlex
    import time
    from pathlib import Path

    _require("plots", "masknet reproduce")
    from .experiments.plan import PRESETS, parse_tables
    from .experiments.reproduce import EqualTuning, base_config, reproduce

    if args.tune is not None and args.tune < 1:
        raise UserError(f"--tune: must be >= 1, got {args.tune}")
    if args.tune is None and args.tune_max_steps is not None:
        raise UserError("--tune-max-steps needs --tune N")
    if args.tune is not None:
        _require("tune", "masknet reproduce --tune")
    tuning = EqualTuning(args.tune, args.tune_max_steps, args.tune_seed) if args.tune else None
    tables = parse_tables(args.tables)
    cfg, applied = base_config(args.preset, args.config, args.data, args.set)
    seeds = args.seeds if args.seeds is not None else PRESETS[args.preset]["seeds"]
    out = Path(args.output) if args.output else Path("runs") / f"reproduce-{time.strftime('%Y%m%d-%H%M%S')}"
    command = "masknet " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:2] == ["reproduce"] else "masknet reproduce"
    log = (lambda msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    reproduce(cfg, tables, seeds, out, args.preset, applied, command, quiet=args.quiet, log=log, tuning=tuning)
    print(out / "report.md")
    return 0


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="benchmark training/prediction throughput, latency, memory and roofline fractions",
        description=(
            "Generate a synthetic Criteo-like dataset, then for every model x precision measure "
            "steady-state training samples/s (trainer step incl. optimizer, data wait timed apart), "
            "prediction samples/s at batch 1024 and 8192, 1,000-candidate latency p50/p99 and peak RSS "
            "(each in its own process), the machine's fp32/bf16 GEMM rate at the model's matmul shapes "
            "and the roofline fraction; print a table and write JSON. Method: docs/performance.md."
        ),
    )
    p.add_argument("--models", metavar="LIST", help="comma-separated models (default: all)")
    p.add_argument("--precisions", default="fp32,bf16", metavar="LIST", help="comma-separated, of fp32,bf16 (default both); none: only the vocabulary test")
    p.add_argument("--rows", type=int, default=1_000_000, metavar="N", help="synthetic rows to generate (default 1,000,000)")
    p.add_argument("--data", metavar="DIR", help="use this prepared dataset instead of generating one")
    p.add_argument("--steps", type=int, metavar="N", help="timed training steps after warm-up (default 30; --quick 3)")
    p.add_argument("--threads", type=int, default=2, metavar="N", help="torch threads (default 2)")
    p.add_argument("--latency-reps", type=int, default=100, metavar="N", help="1,000-candidate requests timed per model (default 100)")
    p.add_argument("--predict-rows", type=int, default=32768, metavar="N", help="test rows scored per prediction measurement (default 32768)")
    p.add_argument("--auc-rows", type=int, default=0, metavar="N",
                   help="also train SerMaskNet 1 epoch on N rows in fp32 and bf16 and compare test AUC (default 0: skip)")
    p.add_argument("--auc-data", action="append", default=[], metavar="DIR", help="another prepared dataset for the AUC check (repeatable)")
    p.add_argument("--vocab", default="100000,10000000", metavar="SMALL,LARGE", help="vocabulary sizes for the scaling test, or none")
    p.add_argument("--output", default="bench.json", metavar="FILE", help="JSON output (default bench.json)")
    p.add_argument("--quick", action="store_true", help="tiny models and data: a smoke test whose figures are noise (CI); labelled as such")
    p.add_argument("--multi-valued", action="store_true",
                   help="also train each model on the same rows plus one multi-valued field (T1: mean length 10, max 20) "
                   "and print the training samples/s ratio with / without it")
    p.set_defaults(func=_run_bench)


def _run_bench(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .bench.runner import SMOKE_NOTE, format_table, run_bench
    from .registry import model_names

    models = args.models.split(",") if args.models else list(model_names())
    bad = [m for m in models if m not in model_names()]
    if bad:
        raise UserError(f"--models: unknown model {bad[0]!r}; choose from {', '.join(model_names())}")
    precisions = [] if args.precisions == "none" else args.precisions.split(",")
    if any(p not in ("fp32", "bf16") for p in precisions):
        raise UserError(f"--precisions: use fp32 and/or bf16, got {args.precisions!r}")
    try:
        vocab = () if args.vocab == "none" else tuple(int(v) for v in args.vocab.split(","))
        assert vocab == () or (len(vocab) == 2 and min(vocab) > 0)
    except (ValueError, AssertionError):
        raise UserError(f"--vocab: expected SMALL,LARGE row counts, got {args.vocab!r}") from None
    rows = 20_000 if args.quick and args.rows == 1_000_000 else args.rows
    steps = args.steps if args.steps is not None else (3 if args.quick else 30)
    if args.quick and args.vocab == "100000,10000000":
        vocab = (10_000, 100_000)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    report = run_bench(models, precisions, rows, steps, Path(args.output), quick=args.quick, threads=args.threads,
                       data=args.data, vocab=vocab, auc_rows=args.auc_rows, auc_data=args.auc_data, log=log,
                       job_options=dict(latency_reps=args.latency_reps, predict_rows=args.predict_rows),
                       multi_valued=args.multi_valued)
    print(format_table(report["results"], quick=args.quick))
    mv = report.get("multi_valued")
    if mv:
        print(f"with the multi-valued field {mv['field']}:")
        print(format_table(mv["results"], quick=args.quick))
        for key, ratio in mv["ratios"].items():
            shown = f"{ratio:.3f}" if ratio is not None else "n/a (a job failed)"
            print(f"multi-valued field {mv['field']} (mean length {mv['mean_length']}, max {mv['max_len']}): "
                  f"training samples/s ratio with / without, {key}: {shown}")
    vs = report.get("vocab_scaling")
    if vs and vs["ratio_large_over_small"] is not None:
        print(f"vocabulary {vocab[0]:,} -> {vocab[1]:,} rows: training samples/s ratio {vs['ratio_large_over_small']:.3f} "
              f"(CPU time per step: {vs['cpu_time_ratio_large_over_small']:.3f})")
    for c in report.get("auc_check", []):
        print(f"AUC check {c['data']}: fp32 {c['fp32']['test_auc']:.4f}, bf16 {c['bf16']['test_auc']:.4f}, delta {c['test_auc_delta']:+.4f}")
    print(f"load average {report['load_avg_1m_start']:.2f} -> {report['load_avg_1m_end']:.2f}; JSON: {args.output}")
    if args.quick:
        print(SMOKE_NOTE)
    return 0


def _add_tune(sub: argparse._SubParsersAction) -> None:
    from .registry import model_names

    p = sub.add_parser(
        "tune",
        help="tune a model's hyperparameters on the validation split (Optuna: TPE sampler, median pruner)",
        description=(
            "Run an Optuna study over the model's search space (declared beside the model's code; --space FILE "
            "replaces it): each trial trains on the train split and is scored by its best validation AUC (the test "
            "split is never read); a trial below the median of earlier ones at the same evaluation is pruned. "
            "Writes OUTPUT/best.yaml (run it with `masknet train --config`), trials.csv/.parquet, history.png, "
            "importances.png and the study itself (study.db): rerunning with the same --output continues it. "
            "Needs Optuna: pip install 'masknet[tune]'."
        ),
    )
    p.add_argument("--model", required=True, choices=model_names(), help="model to tune")
    p.add_argument("--data", metavar="DIR", help="a prepared dataset folder; default: the built-in synthetic data")
    p.add_argument("--trials", type=int, required=True, metavar="N", help="trials to finish (complete or pruned), resumed ones included")
    p.add_argument("--timeout", type=float, metavar="S", help="start no new trial after S seconds")
    p.add_argument("--output", metavar="DIR", help="study folder (default: runs/tune-<model>-<timestamp>); an existing one resumes")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="sampler seed (default 0): the same seed draws the same trials")
    p.add_argument("--max-steps", type=int, metavar="N", help="cap every trial at N training steps (the same budget for each)")
    p.add_argument("--space", metavar="FILE", help="a YAML search space replacing the model's (see docs/model.md)")
    p.add_argument("--config", metavar="FILE", help="a YAML run config every trial starts from")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="fix a config key for every trial (repeatable)")
    p.add_argument("--margin", type=float, default=1.0, metavar="SE",
                   help="keep the default unless the re-check's best beats it by more than SE standard errors of "
                        "the paired validation AUC difference (DeLong; default 1, 0: best mean wins)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_tune)


def _run_tune(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    _require("tune", "masknet tune")
    from .config import RunConfig, apply_override, load_config
    from .tuning import Recheck, load_space, tune

    if not args.margin >= 0:
        raise UserError(f"--margin: must be >= 0, got {args.margin:g}")
    cfg = load_config(args.config) if args.config else RunConfig()
    cfg.model.name = args.model
    if args.data:
        cfg.data.path = args.data
    for assignment in args.set:
        apply_override(cfg, assignment)
    space = load_space(args.space) if args.space else None
    out = Path(args.output) if args.output else Path("runs") / f"tune-{args.model}-{time.strftime('%Y%m%d-%H%M%S')}"
    r = tune(cfg, args.trials, out, space=space, seed=args.seed, timeout=args.timeout, max_steps=args.max_steps,
             progress=not args.quiet, log=lambda msg: print(msg, file=sys.stderr), recheck=Recheck(margin_se=args.margin))
    chosen = next((c for c in r.rechecked if c.params == r.best_params), None)
    how = f" (trial {chosen.number}{', the default' if chosen.default else ''}; mean over {len(chosen.values)} seeds {chosen.mean:.4f})" if chosen else ""
    print(f"best of {r.finished} trials: validation AUC {r.best_value:.4f}{how}; train it: masknet train --config {out / 'best.yaml'}")
    return 0


# Each later capability (prepare, predict, serve, ...) registers its subcommand here.
SUBCOMMANDS: list[SubcommandSetup] = [
    _add_train, _add_generate, _add_prepare, _add_predict, _add_evaluate, _add_export, _add_serve,
    _add_reproduce, _add_bench, _add_tune,
]


class _Parser(argparse.ArgumentParser):
    """Bad options: one line naming the problem (and where to look), exit code 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="masknet",
        description="MaskNet CTR ranking models (Wang, She, Zhang 2021): train, evaluate, prepare data.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for setup in SUBCOMMANDS:
        setup(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)  # argparse itself exits 2 with a one-line message on bad options
    args.argv = argv
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except UserError as exc:
        print(f"masknet {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"masknet {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
