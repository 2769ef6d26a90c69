"""The forward pass of the service: PyTorch or onnxruntime, fp32, int8 or bf16, and its accuracy.

    Scorer(bundle, runtime="onnx", precision="int8", threads=2)(x) -> click probabilities (float32):
        [n] for a single-task bundle without calibration (scores are the logits' sigmoids), else
        [n, 2, T]: per task the served score and the uncalibrated one (models.scoring)
    accuracy_check(bundle, scorer)  -> test AUC of this scorer against the fp32 PyTorch model

int8 is dynamic quantization of the dense layers (weights int8, activations quantized per
batch): torch.ao's `quantize_dynamic` of every nn.Linear for PyTorch, onnxruntime's
`quantize_dynamic` of every MatMul/Gemm with one scale per output channel for ONNX (per-tensor
scales moved the paper-size model's test AUC by -0.0019, per-channel by -0.0006; docs/serving.md). Embedding tables stay fp32 (a lookup is not a
product, so int8 would save memory, not time). bf16 is PyTorch autocast (CPUs with AVX512-BF16
or AMX run it natively). Any of them changes the scores a little, so the service measures the
change on the bundle's own test split at start-up and reports it (/metadata).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from ..data.batch import to_batch
from ..errors import UserError
from .bundle import Bundle
from .export import feeds

RUNTIMES = ("torch", "onnx")
PRECISIONS = ("fp32", "int8", "bf16")
CHECK_ROWS = 100_000  # test rows the start-up accuracy check scores at most (seconds on 2 cores)


def default_threads() -> int:
    """The cores this process may use: one forward pass at a time uses all of them."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


class Scorer:
    """Scores encoded rows (int64 [n, fields]) with the bundle's model; not thread-safe by design:
    the service calls it from its one inference thread."""

    def __init__(self, bundle: Bundle, runtime: str = "torch", precision: str = "fp32", threads: Optional[int] = None):
        if runtime not in RUNTIMES:
            raise UserError(f"--runtime: expected one of {', '.join(RUNTIMES)}, got {runtime!r}")
        if precision not in PRECISIONS:
            raise UserError(f"--precision: expected one of {', '.join(PRECISIONS)}, got {precision!r}")
        if precision == "bf16" and runtime != "torch":
            raise UserError("--precision bf16 runs under PyTorch autocast; use it with --runtime torch")
        self.runtime, self.precision = runtime, precision
        self.bundle = bundle
        self.thread_timings_ms: dict[int, float] = {}
        self.plain = not bundle.multitask and not bundle.calibrated  # [n] sigmoids, as before several tasks existed
        self.head = None if self.plain else bundle.head
        self.outputs = ["score"] if self.plain or not bundle.calibrated else ["score", "score_uncalibrated"]
        self.empty_shape = (0,) if self.plain else (0, 2, len(bundle.tasks))
        if runtime == "onnx":
            data = _onnx_bytes(bundle, precision)
            counts = [threads] if threads else _thread_counts()
            sessions = {t: onnx_session(data, t) for t in counts}
            self.threads = self._fastest(bundle, counts, lambda t: sessions[t])
            self.session = sessions[self.threads]
        else:
            import torch

            self.model = _quantized(bundle.model) if precision == "int8" else bundle.model
            self.threads = threads or self._fastest(bundle, _thread_counts(), lambda t: torch.set_num_threads(t))
            torch.set_num_threads(self.threads)

    def _fastest(self, bundle: Bundle, counts: list[int], use: Callable[[int], Any], rows: int = 1000, reps: int = 5) -> int:
        """The intra-op thread count whose forward pass of `rows` random rows is fastest (median of
        reps), measured now: on a machine shared with other jobs, fewer threads than cores can be
        several times faster (a preempted thread stalls each parallel region: 2 threads 262 ms vs
        1 thread 97 ms for the paper-size model at load average 5 on 2 cores)."""
        if len(counts) == 1:
            return counts[0]
        from .export import random_rows

        x = random_rows(bundle, rows)  # with lists of every length when the model has multi-valued fields
        for t in counts:
            session = use(t)
            if session is not None:
                self.session = session
            self(x)  # warm-up
            ts = []
            for _ in range(reps):
                t0 = time.perf_counter()
                self(x)
                ts.append(time.perf_counter() - t0)
            self.thread_timings_ms[t] = round(float(np.median(ts)) * 1000, 2)
        return min(self.thread_timings_ms, key=self.thread_timings_ms.get)

    @property
    def name(self) -> str:
        return f"{self.runtime} {self.precision}"

    def __call__(self, x: Any) -> np.ndarray:
        """Scores for x int64 [n, fields], or a data.batch.EncodedRows (with multi-valued ids)."""
        if len(x) == 0:
            return np.zeros(self.empty_shape, np.float32)
        if self.runtime == "onnx":
            out = self.session.run(self.outputs, feeds(self.bundle, x))
            return out[0] if self.plain else _both(out[0], out[-1])
        import torch

        with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=self.precision == "bf16"):
            logits = self.model(to_batch(x)).float()
        with torch.inference_mode():
            if self.plain:
                return torch.sigmoid(logits).numpy()
            served, uncalibrated = self.head(logits)
            return _both(served.numpy(), uncalibrated.numpy())


def _both(served: np.ndarray, uncalibrated: np.ndarray) -> np.ndarray:
    """[n] or [n, T] served and uncalibrated scores -> [n, 2, T]."""
    n = len(served)
    return np.stack([served.reshape(n, -1), uncalibrated.reshape(n, -1)], axis=1)


def _quantized(model: Any) -> Any:
    import copy

    import torch

    with warnings.catch_warnings():  # torch.ao.quantization's deprecation notice (torchao is not a dependency)
        warnings.simplefilter("ignore")
        from torch.ao.quantization import quantize_dynamic

        return quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8)


@contextlib.contextmanager
def _quiet_root_logger():
    import logging

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _thread_counts() -> list[int]:
    """Thread counts to try: 1 to all cores (at most 4 of them: 1, a quarter, half, all)."""
    n = default_threads()
    return sorted({1, max(1, n // 4), max(1, n // 2), n})


def onnx_session(data: bytes, threads: int):
    from .export import onnx_session as session

    return session(data, threads)


def _onnx_bytes(bundle: Bundle, precision: str) -> bytes:
    from .export import export_onnx_bytes

    data = export_onnx_bytes(bundle)
    if precision == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        with tempfile.TemporaryDirectory(prefix="masknet-int8-") as tmp:
            src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
            src.write_bytes(data)
            with warnings.catch_warnings(), _quiet_root_logger():  # its advice to pre-process the model
                warnings.simplefilter("ignore")
                quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True,
                                 op_types_to_quantize=["MatMul", "Gemm"])
            data = dst.read_bytes()
    return data


def test_split(bundle: Bundle) -> tuple[Optional[Any], str]:
    """The test split of the prepared folder the bundle was trained on, or (None, why not)."""
    import yaml

    from ..data.dataset import load_prepared
    from ..runs import RunFolder

    cfg_path = RunFolder(bundle.path).config
    try:
        cfg = yaml.safe_load(cfg_path.read_text()) if cfg_path.is_file() else {}
        data = ((cfg or {}).get("data") or {}).get("path")
    except (yaml.YAMLError, OSError, AttributeError):
        data = None
    if not data:
        return None, "the run's config names no prepared data folder (built-in synthetic data)"
    if not Path(data).is_dir():
        return None, f"its prepared data folder {data} is not on this machine"
    try:
        ds = load_prepared(data)
    except UserError as exc:
        return None, f"its prepared data folder cannot be read ({exc})"
    if ds.field_names != bundle.field_names or ds.cardinalities != bundle.cardinalities or ds.multi_valued != bundle.multi_valued \
            or "test" not in ds.splits:
        return None, f"{data} does not match the model's fields or has no test split"
    if len(ds.splits["test"]) == 0:
        return None, f"{data} has an empty test split"
    return ds.splits["test"], str(data)


def accuracy_check(bundle: Bundle, scorer: Scorer, max_rows: int = CHECK_ROWS) -> dict[str, Any]:
    """Test AUC of `scorer` and of the fp32 PyTorch model on (up to max_rows of) the bundle's test
    split. {"measured": False, "why": ...} when the split is not available."""
    from ..training.metrics import auc
    from .predict import score

    split, source = test_split(bundle)
    if split is None:
        return {"measured": False, "why": source}
    n = min(len(split), max_rows)
    x = split.rows(0, n) if bundle.multi_valued else np.ascontiguousarray(np.asarray(split.x[:n], dtype=np.int64))
    y = np.asarray(split.y[:n])
    if not 0 < y.sum() < n:
        return {"measured": False, "why": f"the first {n:,} test rows of {source} have one class only"}
    ref = score(bundle.model, x, head=bundle.head).astype(np.float64).reshape(n, -1)[:, 0]  # the first task's served score
    got = np.concatenate([scorer(x[i : i + 8192]) for i in range(0, n, 8192)]).astype(np.float64)
    got = got if got.ndim == 1 else got[:, 0, 0]
    a_ref, a_got = auc(y, ref), auc(y, got)
    return {
        "measured": True, "data": source, "rows": int(n), "auc_fp32": round(a_ref, 6), "auc": round(a_got, 6),
        "auc_diff": round(a_got - a_ref, 6), "max_abs_score_diff": float(np.max(np.abs(got - ref))),
    }


def describe_check(scorer: Scorer, check: dict[str, Any]) -> str:
    """One line for the start-up log."""
    if not check.get("measured"):
        return f"runtime {scorer.name}: accuracy against fp32 not measured: {check['why']}"
    return (f"runtime {scorer.name}: test AUC {check['auc']:.4f} vs fp32 PyTorch {check['auc_fp32']:.4f} "
            f"(difference {check['auc_diff']:+.4f}, largest score difference {check['max_abs_score_diff']:.1e}) "
            f"on {check['rows']:,} test rows of {check['data']}")
