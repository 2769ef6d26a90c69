"""Applying a fitted encoder to new raw rows: the one raw-row encoder of `masknet predict`, `masknet
evaluate --input`, the estimator's predict and `encode_file`.

Rows are read by the same readers and checked by the same code as `masknet prepare` (rows.py), and
each field's tokens are mapped through the saved vocabulary (unseen categories -> out-of-vocabulary,
missing -> 0), exactly as prepare's pass 2 maps its spilled windows (FieldEncoder.lookup_table).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import numpy as np

from .batch import EncodedRows
from .encoder import Encoder
from .multivalued import encode_chunk
from .readers import RawChunk, file_columns, iter_chunks
from .rows import BadLineLog, ParsedChunk, parse_chunk
from .schema import DatasetSpec


def encode_rows(encoder: Encoder, parsed: ParsedChunk, dtype: type = np.int32) -> np.ndarray | EncodedRows:
    """The good rows of a parsed chunk, encoded: x [good rows, f] for the encoder's fields (parsed
    fields after them, e.g. predict's row id, are left out); with multi-valued fields an EncodedRows."""
    g = parsed.good
    x = np.empty((int(g.sum()), len(encoder.fields)), dtype=dtype)
    for j, (fe, (ix, tok)) in enumerate(zip(encoder.fields, parsed.fields)):
        x[:, j] = fe.lookup_table(tok.tokens)[ix[g]]
    if encoder.multi_valued:
        return EncodedRows(x, *encode_chunk(encoder.multi_valued, parsed.multi, g))
    return x


def read_encoded(
    encoder: Encoder, spec: DatasetSpec, path: str | Path, check: Callable[[ParsedChunk], None],
    chunks: Optional[Iterable[RawChunk]] = None, dtype: type = np.int32,
) -> Iterator[tuple[np.ndarray | EncodedRows, ParsedChunk]]:
    """Per chunk of `path` read with `spec`: `check` it (e.g. BadLineLog.check), then yield its
    encoded good rows and the parsed chunk (labels, line numbers). `chunks`: the raw chunks, when
    the caller reads them itself; by default single-threaded, so that rows with a wrong number of
    columns get their line numbers at once."""
    for raw in chunks if chunks is not None else iter_chunks(spec, path, serial=True):
        parsed = parse_chunk(spec, raw, str(path))
        check(parsed)
        yield encode_rows(encoder, parsed, dtype), parsed


def encode_file(
    encoder: Encoder | str | Path,
    path: str | Path,
    bad_lines: str = "error",
    with_label: Optional[bool] = None,
) -> Iterator[tuple[np.ndarray | EncodedRows, Optional[np.ndarray], np.ndarray]]:
    """Encode a raw file with a fitted encoder, chunk by chunk: yields (x int32 [n, f], y uint8 [n]
    ([n, T] for multi-task data) or None, line numbers [n]); with multi-valued fields x is a
    data.batch.EncodedRows (x and seq). `with_label=None`: use the label column if the file has one.
    Bad lines raise a DataError (`bad_lines="error"`) or are dropped (`"skip"`)."""
    enc = encoder if isinstance(encoder, Encoder) else Encoder.load(encoder)
    spec = enc.spec
    if with_label is None:
        present = file_columns(spec, path)
        with_label = bool(spec.labels) and all(lab.column in present for lab in spec.labels)
    if not with_label:
        spec = spec.without_labels()
    log = BadLineLog(bad_lines)
    for x, parsed in read_encoded(enc, spec, path, lambda p: log.check(p, record=True)):
        g = parsed.good
        yield x, (parsed.y[g] if with_label else None), parsed.lines[g]
