"""Batch prediction on raw files, and evaluation on a prepared split.

    predict_file(bundle, "new.txt", "scores.csv")              the format the model was trained on
    predict_file(bundle, "rows.csv", "s.parquet", fmt="criteo-csv")   same fields, another layout
    evaluate_prepared(bundle, "data/criteo", split="test")     {"auc", "logloss", "rows"}

Raw rows are read by the data layer's streaming readers in blocks (bounded memory, whatever the
file size), checked and tokenized by the same code as `masknet prepare`, and encoded with the
bundle's saved encoder (unseen categories -> out-of-vocabulary). One score per input row is
written in file order, with the row's id column when the format has one (Avazu's `id`); with
`bad_lines="skip"` bad rows are left out and a `line` column says which input line each score
belongs to.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import pyarrow as pa

from ..data.batch import EncodedRows
from ..errors import DataError, UserError
from ..data.dataset import MISSING_LABEL
from .bundle import Bundle

_ID_FIELD = "__row_id__"


def _require_encoder(bundle: Bundle, what: str) -> None:
    if bundle.encoder is None:
        raise UserError(
            f"{bundle.path}: this model was trained on the built-in synthetic data, which has no raw format and no "
            f"encoder, so {what} cannot read raw rows; train on a prepared dataset (`masknet prepare`, then "
            f"`masknet train --data DIR`), or score encoded rows with `masknet evaluate --data DIR` or the "
            f"service's /predict (integer indices)"
        )


def reading_spec(bundle: Bundle, fmt: Optional[str] = None):
    """The DatasetSpec to read raw input with: the training format, or `fmt` if it has the same fields."""
    from ..data.formats import spec_for_format

    enc = bundle.encoder
    spec = enc.spec
    if fmt:
        other = spec_for_format(fmt)
        by_name = {f.name: f for f in other.fields}
        fields = []
        for fe in enc.fields:
            f = by_name.get(fe.spec.name)
            if f is None or f.transform != fe.spec.transform:
                raise UserError(
                    f"--format {fmt}: its fields do not match the model's (field {fe.spec.name!r} "
                    f"{'is missing' if f is None else 'is transformed differently'}); the model was trained on "
                    f"{enc.spec.name}"
                )
            fields.append(replace(fe.spec, column=f.column))
        multi = []
        theirs = {m.name: m for m in other.multi_valued}
        for me in enc.multi_valued:
            m = theirs.get(me.spec.name)
            if m is None:
                raise UserError(f"--format {fmt}: it has no multi-valued field {me.spec.name!r}; the model was trained on {enc.spec.name}")
            multi.append(replace(me.spec, column=m.column, weight_column=m.weight_column if me.spec.weight_column else None))
        spec = replace(other, fields=fields, multi_valued=multi)
    return replace(spec, time=None)  # ordering rows is a training concern; prediction does not need the column


def _has_label(spec, path: Path) -> Optional[list[str]]:
    """For header-less formats whose first column is the label: the column list for a file
    without it (e.g. Criteo's unlabelled test.txt), or None when the file has the label."""
    from ..data.readers import first_line

    if spec.header or not spec.columns or spec.label != spec.columns[0] or spec.file_type == "parquet":
        return None
    line = first_line(path).rstrip(b"\r").decode("utf-8", "replace")
    n = len(line.split(spec.delimiter))
    if spec.file_type == "libfm":
        return spec.columns[1:] if n == len(spec.fields) else None
    return spec.columns[1:] if n == len(spec.columns) - 1 else None


def encode_raw(
    bundle: Bundle,
    input: str | Path,
    fmt: Optional[str] = None,
    bad_lines: str = "error",
    with_label: bool = False,
    id_column: Optional[str] = None,
    stats: Optional[dict] = None,
    block_bytes: Optional[int] = None,
) -> Iterator[tuple[np.ndarray, Optional[np.ndarray], np.ndarray, Optional[pa.Array]]]:
    """Yield (x int64 [n, f], y uint8 [n] or None, line numbers [n], ids or None) per block; for a
    model with multi-valued fields x is a data.batch.EncodedRows (x and the padded seq ids).
    `stats["skipped"]` gets the number of bad lines skipped (bad_lines="skip")."""
    from ..data.encoder import Encoder
    from ..data.formats import id_column as format_id_column
    from ..data.rawrows import read_encoded
    from ..data.readers import file_columns, iter_chunks
    from ..data.rows import BadLineLog
    from ..data.schema import FieldSpec

    _require_encoder(bundle, "predict")
    if bad_lines not in ("error", "skip"):
        raise UserError(f"--bad-lines: expected error or skip, got {bad_lines!r}")
    input = Path(input)
    spec = reading_spec(bundle, fmt)
    short = _has_label(spec, input) if input.is_file() else None
    if short is not None:
        spec = replace(spec, columns=short).without_labels()
    present = file_columns(spec, input)
    if with_label:
        if not spec.label or spec.label not in present:
            raise UserError(f"{input}: no label column {spec.label!r}; evaluation needs labelled rows")
        spec = _keep_model_labels(spec, bundle, present, input)
    elif spec.label:
        spec = spec.without_labels()  # a label column, when present, is ignored (and not checked)
    if id_column is None:
        id_column = format_id_column(spec.name if fmt is None else fmt)
    if id_column is not None and id_column not in present:
        id_column = None
    nf = len(bundle.encoder.fields)
    if id_column is not None:
        spec = replace(spec, fields=spec.fields + [FieldSpec(_ID_FIELD, id_column, "category")])
    enc = Encoder(spec, bundle.encoder.fields, bundle.encoder.multi_valued)
    log = BadLineLog(bad_lines)
    kw = {"block_bytes": block_bytes} if block_bytes else {}
    hint = "" if fmt else f" (the model was trained on format {enc.spec.name}; give --format if this file has another layout)"

    def check(parsed: Any) -> None:
        try:
            log.check(parsed, record=True)
        except DataError as exc:
            layout = "wrong number of columns" in str(exc) or "empty line" in str(exc)
            raise DataError(f"{exc}{hint if layout else ''}") from None

    chunks = _hinted(iter_chunks(spec, input, serial=True, **kw), hint)
    for x, pc_ in read_encoded(enc, spec, input, check, chunks=chunks, dtype=np.int64):
        g = pc_.good
        ids = None
        if id_column is not None:
            ix, tok = pc_.fields[nf]
            ixg = ix[g].astype(np.int32)
            ids = pa.DictionaryArray.from_arrays(pa.array(np.maximum(ixg, 0), mask=ixg < 0), tok.tokens.cast(pa.string()))
            ids = ids.dictionary_decode()
        yield x, (pc_.y[g] if with_label else None), pc_.lines[g], ids
    if stats is not None:
        stats["skipped"] = log.total


def _keep_model_labels(spec: Any, bundle: Bundle, present: list[str], input: Path) -> Any:
    """Read the model's tasks as labels, in its order (a single-task model: its one label)."""
    from ..data.schema import LabelSpec

    by_name = {lab.column: lab for lab in spec.labels}
    wanted = bundle.tasks if bundle.multitask or len(by_name) > 1 else [spec.label]
    for t in wanted:
        if t not in by_name or t not in present:
            raise UserError(f"{input}: no label column {t!r} for the model's task {t!r}; evaluation needs labelled rows")
    first = by_name[wanted[0]]
    more = [LabelSpec(by_name[t].column, by_name[t].kind, by_name[t].optional) for t in wanted[1:]]
    return replace(spec, label=first.column, label_kind=first.kind, more_labels=more)


def _hinted(chunks: Iterator, hint: str) -> Iterator:
    try:
        yield from chunks
    except DataError as exc:
        raise DataError(f"{exc}{hint}") from None


def score(model: Any, x: np.ndarray | EncodedRows, batch_size: int = 8192, head: Any = None) -> np.ndarray:
    """Click probabilities (float32) for encoded rows (x [n, f], or EncodedRows), in sub-batches: [n],
    or [n, T] for a multi-task model. `head` (the bundle's models.scoring.ScoreHead) gives the served scores."""
    return score_both(model, x, batch_size, head)[0]


def score_both(model: Any, x: np.ndarray | EncodedRows, batch_size: int = 8192, head: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """(served scores, uncalibrated scores), float32, [n] or [n, T] (see models.scoring)."""
    import torch

    rows = x if isinstance(x, EncodedRows) else EncodedRows(x)
    served, raw = [], []
    with torch.inference_mode():
        for i in range(0, len(rows), batch_size):
            logits = model(rows[i : i + batch_size].to_batch())
            s, u = head(logits) if head is not None else (torch.sigmoid(logits),) * 2
            served.append(s.numpy())
            raw.append(u.numpy())
    if not served:
        shape = (0, len(model.tasks)) if getattr(model, "tasks", None) is not None else (0,)
        return np.zeros(shape, np.float32), np.zeros(shape, np.float32)
    return np.concatenate(served).astype(np.float32), np.concatenate(raw).astype(np.float32)


def score_columns(bundle: Bundle, x: np.ndarray | EncodedRows, batch_size: int = 8192) -> dict[str, np.ndarray]:
    """The output columns of `masknet predict`: `score` (single task) or `score_<task>` per task,
    and with calibration `score_uncalibrated` (or `score_uncalibrated_<task>`)."""
    served, raw = score_both(bundle.model, x, batch_size, bundle.head)
    if not bundle.multitask:
        cols = {"score": served}
        if bundle.calibrated:
            cols["score_uncalibrated"] = raw
        return cols
    cols = {f"score_{t}": served[:, i] for i, t in enumerate(bundle.tasks)}
    if bundle.calibrated:
        cols.update({f"score_uncalibrated_{t}": raw[:, i] for i, t in enumerate(bundle.tasks)})
    return cols


def predict_file(
    bundle: Bundle,
    input: str | Path,
    output: str | Path,
    fmt: Optional[str] = None,
    bad_lines: str = "error",
    batch_size: int = 8192,
    id_column: Optional[str] = None,
    progress: Optional[Callable[[int], None]] = None,
    block_bytes: Optional[int] = None,
) -> dict[str, Any]:
    """Score every row of a raw file into `output` (.csv, or .parquet/.pq). Returns counts."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    output = Path(output)
    suffix = output.suffix.lower()
    if suffix not in (".csv", ".parquet", ".pq"):
        raise UserError(f"--output {output}: expected a .csv or .parquet file name")
    if output.parent and not output.parent.exists():
        raise UserError(f"--output {output}: folder {output.parent} does not exist")
    stats = {"skipped": 0}
    writer = None
    rows = 0
    tmp = output.with_name(output.name + ".partial")
    try:
        for x, _, lines, ids in encode_raw(bundle, input, fmt, bad_lines, id_column=id_column, stats=stats, block_bytes=block_bytes):
            if len(x) == 0 and writer is not None:
                continue
            cols: dict[str, pa.Array] = {}
            if ids is not None:
                cols["id"] = ids
            if bad_lines == "skip":
                cols["line"] = pa.array(lines, pa.int64())
            for name, values in score_columns(bundle, x, batch_size).items():
                cols[name] = pa.array(values, pa.float32())
            table = pa.table(cols)
            if writer is None:
                writer = pq.ParquetWriter(str(tmp), table.schema) if suffix != ".csv" else pacsv.CSVWriter(str(tmp), table.schema)
            writer.write_table(table)
            rows += len(x)
            if progress:
                progress(len(x))
    except BaseException:
        if writer is not None:
            writer.close()
        tmp.unlink(missing_ok=True)
        raise
    if writer is None:
        raise UserError(f"{input}: no data rows")
    writer.close()
    tmp.replace(output)
    return {"rows": rows, "skipped": stats["skipped"], "output": str(output)}


def evaluate_file(bundle: Bundle, input: str | Path, fmt: Optional[str] = None, batch_size: int = 8192) -> dict[str, Any]:
    """AUC and logloss (of the served scores) on a labelled raw file; "tasks" with several labels."""
    from ..training.metrics import auc, logloss
    from ..training.tasks import task_metrics

    ys, ps = [], []
    for x, y, _, _ in encode_raw(bundle, input, fmt, with_label=True):  # x: ndarray or EncodedRows
        if len(x):
            ys.append(y)
            ps.append(score(bundle.model, x, batch_size, bundle.head).astype(np.float64))
    if not ys:
        raise UserError(f"{input}: no data rows")
    y, p = np.concatenate(ys), np.concatenate(ps)
    if y.ndim == 1 and p.ndim == 1 and not (y == MISSING_LABEL).any():
        return {"auc": auc(y, p), "logloss": logloss(y, p), "rows": int(len(y)), "positives": int(y.sum())}
    return _task_summary(task_metrics(y.reshape(len(y), -1), p.reshape(len(p), -1), bundle.tasks), len(y))


def _task_summary(per_task: dict[str, dict], rows: int) -> dict[str, Any]:
    first = next(iter(per_task.values()))
    return {"auc": first["auc"], "logloss": first["logloss"], "rows": rows, "positives": first["positives"], "tasks": per_task}


def evaluate_prepared(bundle: Bundle, data: str | Path, split: str = "test", batch_size: int = 8192) -> dict[str, Any]:
    """AUC and logloss of the bundle's model on a split of a prepared dataset folder."""
    from ..data.dataset import load_prepared
    from ..training.trainer import evaluate

    ds = load_prepared(data)
    if ds.field_names != bundle.field_names or ds.cardinalities != bundle.cardinalities or ds.multi_valued != bundle.multi_valued:
        raise UserError(
            f"{data}: its fields/cardinalities do not match the model's ({bundle.path}); evaluate on data encoded "
            f"with the model's own encoder (the prepared folder it was trained on), or use --input for raw rows"
        )
    enc_path = Path(data) / "encoder.json"
    if bundle.encoder is not None and enc_path.is_file():
        from ..data.encoder import Encoder

        other = Encoder.load(enc_path).to_dict()["fields"]
        if other != bundle.encoder.to_dict()["fields"]:
            raise UserError(f"{data}: encoded with a different encoder than the model's ({bundle.path}/encoder.json)")
    if split not in ds.splits:
        raise UserError(f"--split: expected one of {', '.join(ds.splits)}, got {split!r}")
    s = ds.splits[split]
    if len(s) == 0:
        raise UserError(f"{data}: split {split!r} has no rows")
    ds = _model_tasks(bundle, ds, data)
    s = ds.splits[split]
    m = evaluate(bundle.model, s, batch_size, head=bundle.head, tasks=bundle.tasks)
    out = {"split": split, "auc": m["auc"], "logloss": m["logloss"], "rows": len(s), "positives": int(np.asarray(s.y).sum())}
    if "tasks" in m:
        out["tasks"] = m["tasks"]
    return out


def _model_tasks(bundle: Bundle, ds: Any, data: Any) -> Any:
    """Multi-label data restricted to the model's tasks, in its order (single-label data as it is)."""
    from ..training.tasks import select_tasks

    if ds.splits["valid"].labels is None and len(ds.task_names) == 1:
        if bundle.multitask and len(bundle.tasks) > 1:
            raise UserError(f"{data}: has one label; the model predicts {len(bundle.tasks)} tasks ({', '.join(bundle.tasks)})")
        return ds
    missing = [t for t in bundle.tasks if t not in ds.task_names]
    if missing:
        raise UserError(f"{data}: no label {missing[0]!r} (its labels: {', '.join(ds.task_names)}); the model's tasks are {', '.join(bundle.tasks)}")
    return select_tasks(ds, bundle.tasks)
