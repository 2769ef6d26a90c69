"""ONNX export of a bundle's model (every model in the registry).

The exported graph takes `x`: int64 [batch, fields] (the encoded indices, batch size dynamic)
and returns `score` (click probability, float32 [batch]) and `logit` (float32 [batch]). A model
with multi-valued fields also takes `seq`: int64 [batch, ΣL], each multi-valued field's padded
ids (0 = padding; an all-zero block is an empty list), and, when a field is weighted,
`seq_weights`: float32 [batch, ΣL]; their layout is in the metadata (`masknet.multi_valued`).
A multi-task model returns its outputs as [batch, tasks] (the task names in the metadata,
`masknet.tasks`). With calibration.json in the bundle (post-hoc calibration or negative
down-sampling), `score` is the served, calibrated probability, computed inside the graph
(models.scoring), and `score_uncalibrated` is added.
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


def _scorer(model: Any, head: Any = None):
    import torch

    from ..data.batch import Batch

    class Scorer(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module, head: Any):
            super().__init__()
            self.inner = inner
            self.head = head

        def forward(self, x: torch.Tensor, seq: Optional[torch.Tensor] = None, seq_weights: Optional[torch.Tensor] = None):
            logit = self.inner(Batch(x, seq, seq_weights))
            if self.head is None:
                return torch.sigmoid(logit), logit
            score, uncalibrated = self.head(logit)
            return score, uncalibrated, logit

    return Scorer(model, head).eval()


def output_names(bundle: Bundle) -> list[str]:
    """The graph's outputs: score and logit, with score_uncalibrated between them when calibrated."""
    return ["score", "score_uncalibrated", "logit"] if bundle.calibrated else ["score", "logit"]


def input_names(bundle: Bundle) -> list[str]:
    """The graph's inputs: x, then seq (multi-valued fields), then seq_weights (weighted ones)."""
    multi = bundle.multi_valued
    return ["x"] + (["seq"] if multi else []) + (["seq_weights"] if any(m.weighted for m in multi) else [])


def feeds(bundle: Bundle, rows: Any) -> dict[str, np.ndarray]:
    """onnxruntime inputs for encoded rows (an ndarray x [n, f], or data.batch.EncodedRows)."""
    from ..data.batch import EncodedRows

    rows = rows if isinstance(rows, EncodedRows) else EncodedRows(rows)
    values = {"x": rows.x, "seq": rows.seq, "seq_weights": rows.seq_weights}
    out = {}
    for name in input_names(bundle):
        dtype = np.float32 if name == "seq_weights" else np.int64
        out[name] = np.ascontiguousarray(values[name], dtype=dtype)
    return out


def export_onnx_bytes(bundle: Bundle, opset: int = OPSET) -> bytes:
    """The serialized ONNX model (see the module docstring)."""
    import onnx
    import torch

    model = bundle.model.eval()
    for emb in model.embeddings():
        emb.sparse = False  # sparse gradients are a training concern
        emb.lookup = "gather"  # static shapes: not the compact lookup's data-dependent sizes (models/layers.py)
    from ..data.batch import seq_width

    f = len(bundle.field_names)
    names = input_names(bundle)
    width = seq_width(bundle.multi_valued)
    example = (torch.zeros((2, f), dtype=torch.long), torch.zeros((2, width), dtype=torch.long), torch.ones((2, width)))[: len(names)]
    buf = io.BytesIO()
    outputs = output_names(bundle)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
        torch.onnx.export(
            _scorer(model, bundle.head if bundle.calibrated else None),
            example,
            buf,
            input_names=names,
            output_names=outputs,
            dynamic_axes={**{n: {0: "batch"} for n in names}, **{o: {0: "batch"} for o in outputs}},
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
        "masknet.tasks": json.dumps(bundle.tasks),
        "masknet.outputs": ", ".join(outputs) + (" [batch, tasks]" if bundle.multitask else " [batch]"),
    }
    if bundle.calibrated:
        meta["masknet.calibration"] = json.dumps({"method": bundle.head_method, "negative_sampling_rate": bundle.head.rate})
    if bundle.multi_valued:
        meta["masknet.multi_valued"] = json.dumps([m.to_dict() for m in bundle.multi_valued])
        meta["masknet.inputs"] += "; seq: int64 [batch, sum of max_len], padded ids (0 = padding)" + (
            "; seq_weights: float32 [batch, sum of max_len]" if "seq_weights" in names else ""
        )
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


def random_rows(bundle: Bundle, rows: int = 257, seed: int = 0) -> Any:
    """Random in-range encoded rows (incl. 0 and 1); multi-valued fields get lists of every length
    from empty to max_len (an all-padding block, the empty list, in every field)."""
    from ..data.batch import EncodedRows

    rng = np.random.default_rng(seed)
    x = np.stack([rng.integers(0, c, rows) for c in bundle.cardinalities], axis=1).astype(np.int64)
    if not bundle.multi_valued:
        return x
    blocks, weights = [], []
    for m in bundle.multi_valued:
        lengths = np.arange(rows) % (m.max_len + 1)  # 0 (empty) .. max_len
        ids = rng.integers(1, m.cardinality, (rows, m.max_len)) if m.cardinality > 1 else np.zeros((rows, m.max_len), np.int64)
        ids[np.arange(m.max_len)[None, :] >= lengths[:, None]] = 0
        blocks.append(ids)
        weights.append(np.where(ids != 0, rng.uniform(0.1, 2.0, ids.shape), 0.0).astype(np.float32))
    seq = np.concatenate(blocks, axis=1)
    w = np.concatenate(weights, axis=1) if any(m.weighted for m in bundle.multi_valued) else None
    return EncodedRows(x, seq, w)


def parity(bundle: Bundle, model_bytes: bytes, x: Optional[Any] = None, rows: int = 257, seed: int = 0) -> float:
    """Max |onnx - torch| over every output (score, score_uncalibrated, logit) on `x` (an ndarray
    or EncodedRows; default `random_rows`)."""
    return max(parity_by_output(bundle, model_bytes, x, rows, seed).values())


def parity_by_output(
    bundle: Bundle, model_bytes: bytes, x: Optional[Any] = None, rows: int = 257, seed: int = 0
) -> dict[str, float]:
    """{output name: max |onnx - torch|} (every task's column of a multi-task output included)."""
    import torch

    from ..data.batch import to_batch

    if x is None:
        x = random_rows(bundle, rows, seed)
    names = output_names(bundle)
    sess = onnx_session(model_bytes)
    got = dict(zip(names, sess.run(names, feeds(bundle, x))))
    with torch.inference_mode():
        logit = bundle.model(to_batch(x))
        score, uncalibrated = bundle.head(logit) if bundle.calibrated else (torch.sigmoid(logit),) * 2
    want = {"score": score.numpy(), "score_uncalibrated": uncalibrated.numpy(), "logit": logit.numpy()}
    return {n: float(np.max(np.abs(got[n] - want[n]))) if len(x) else 0.0 for n in names}
