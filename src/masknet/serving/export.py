"""ONNX export of a bundle's model (every model in the registry).

The exported graph takes `x`: int64 [batch, fields] (the encoded indices, batch size dynamic)
and returns `score` (click probability, float32 [batch]) and `logit` (float32 [batch]).
Preprocessing stays outside the graph: encode raw rows with the bundle's encoder.json (or
use `masknet serve --runtime onnx`, which does both). The model's name, field names,
cardinalities and the bundle hash are stored in the ONNX metadata.

PyTorch's TorchScript-based exporter (`dynamo=False`) is used: it needs no extra package
(the dynamo exporter needs onnxscript) and handles every model here.
"""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..errors import UserError
from .bundle import Bundle

OPSET = 17


def _scorer(model: Any):
    import torch

    class Scorer(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module):
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor):
            logit = self.inner(x)
            return torch.sigmoid(logit), logit

    return Scorer(model).eval()


def export_onnx_bytes(bundle: Bundle, opset: int = OPSET) -> bytes:
    """The serialized ONNX model (see the module docstring)."""
    import onnx
    import torch

    model = bundle.model.eval()
    for emb in model.embeddings():
        emb.sparse = False  # sparse gradients are a training concern
    f = len(bundle.field_names)
    example = torch.zeros((2, f), dtype=torch.long)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
        torch.onnx.export(
            _scorer(model),
            (example,),
            buf,
            input_names=["x"],
            output_names=["score", "logit"],
            dynamic_axes={"x": {0: "batch"}, "score": {0: "batch"}, "logit": {0: "batch"}},
            opset_version=opset,
            dynamo=False,
        )
    proto = onnx.load_from_string(buf.getvalue())
    meta = {
        "masknet.model": bundle.spec["model"],
        "masknet.field_names": json.dumps(bundle.field_names),
        "masknet.cardinalities": json.dumps(bundle.cardinalities),
        "masknet.bundle_sha256": bundle.bundle_hash,
        "masknet.inputs": "x: int64 [batch, fields], indices from the bundle's encoder.json",
    }
    for k, v in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    proto.producer_name = "masknet"
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


def export_onnx(bundle: Bundle, output: str | Path, opset: int = OPSET, check: bool = True) -> dict[str, Any]:
    """Write the ONNX model to `output`; with `check`, run it in onnxruntime on a batch and compare."""
    output = Path(output)
    if output.parent and not output.parent.exists():
        raise UserError(f"--output {output}: folder {output.parent} does not exist")
    data = export_onnx_bytes(bundle, opset)
    output.write_bytes(data)
    result: dict[str, Any] = {"output": str(output), "bytes": len(data), "opset": opset}
    if check:
        result["max_abs_diff"] = parity(bundle, data)
    return result


def onnx_session(model_bytes: bytes, threads: Optional[int] = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    return ort.InferenceSession(model_bytes, sess_options=opts, providers=["CPUExecutionProvider"])


def parity(bundle: Bundle, model_bytes: bytes, x: Optional[np.ndarray] = None, rows: int = 257, seed: int = 0) -> float:
    """Max |score_onnx - score_torch| on `x` (default: random in-range indices, incl. 0 and 1)."""
    import torch

    if x is None:
        rng = np.random.default_rng(seed)
        x = np.stack([rng.integers(0, c, rows) for c in bundle.cardinalities], axis=1).astype(np.int64)
    sess = onnx_session(model_bytes)
    got = sess.run(["score"], {"x": x})[0]
    with torch.inference_mode():
        want = torch.sigmoid(bundle.model(torch.from_numpy(x))).numpy()
    return float(np.max(np.abs(got - want))) if len(x) else 0.0
