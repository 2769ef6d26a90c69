"""The forward pass of the service: PyTorch or onnxruntime, fp32, int8 or bf16, and its accuracy.

    Scorer(bundle, runtime="onnx", precision="int8", threads=2)(x) -> click probabilities (float32)
    accuracy_check(bundle, scorer)  -> test AUC of this scorer against the fp32 PyTorch model

int8 is dynamic quantization of the dense layers (weights int8, activations quantized per
batch): torch.ao's `quantize_dynamic` of every nn.Linear for PyTorch, onnxruntime's
`quantize_dynamic` of every MatMul for ONNX. Embedding tables stay fp32 (a lookup is not a
product, so int8 would save memory, not time). bf16 is PyTorch autocast (CPUs with AVX512-BF16
or AMX run it natively). Any of them changes the scores a little, so the service measures the
change on the bundle's own test split at start-up and reports it (/metadata).
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..errors import UserError
from .bundle import Bundle

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
        self.threads = threads or default_threads()
        if runtime == "onnx":
            self.session = _onnx_session(bundle, precision, self.threads)
        else:
            import torch

            torch.set_num_threads(self.threads)
            self.model = _quantized(bundle.model) if precision == "int8" else bundle.model

    @property
    def name(self) -> str:
        return f"{self.runtime} {self.precision}"

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if len(x) == 0:
            return np.zeros(0, np.float32)
        if self.runtime == "onnx":
            return self.session.run(["score"], {"x": x})[0]
        import torch

        with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=self.precision == "bf16"):
            return torch.sigmoid(self.model(torch.from_numpy(x)).float()).numpy()


def _quantized(model: Any) -> Any:
    import copy

    import torch

    with warnings.catch_warnings():  # torch.ao.quantization's deprecation notice (torchao is not a dependency)
        warnings.simplefilter("ignore")
        from torch.ao.quantization import quantize_dynamic

        return quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8)


def _onnx_session(bundle: Bundle, precision: str, threads: int):
    from .export import export_onnx_bytes, onnx_session

    data = export_onnx_bytes(bundle)
    if precision == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        with tempfile.TemporaryDirectory(prefix="masknet-int8-") as tmp:
            src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
            src.write_bytes(data)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"])
            data = dst.read_bytes()
    return onnx_session(data, threads)


def test_split(bundle: Bundle) -> tuple[Optional[Any], str]:
    """The test split of the prepared folder the bundle was trained on, or (None, why not)."""
    import yaml

    from ..data.dataset import load_prepared

    cfg_path = bundle.path / "config.yaml"
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
    if ds.field_names != bundle.field_names or ds.cardinalities != bundle.cardinalities or "test" not in ds.splits:
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
    x = np.ascontiguousarray(np.asarray(split.x[:n], dtype=np.int64))
    y = np.asarray(split.y[:n])
    if not 0 < y.sum() < n:
        return {"measured": False, "why": f"the first {n:,} test rows of {source} have one class only"}
    ref = score(bundle.model, x).astype(np.float64)
    got = np.concatenate([scorer(x[i : i + 8192]) for i in range(0, n, 8192)]).astype(np.float64)
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
