"""Reading raw rows: validate and tokenize a chunk (`parse_chunk`), and count or refuse its bad lines
(`BadLineLog`). Shared by `masknet prepare` (data/prepare.py), the raw-row encoder (data/rawrows.py:
predict, evaluate, the estimator) and nothing else: every reader of raw rows checks them the same way.

Bad lines (wrong number of columns, empty line, label not 0/1, unparsable number, bad value, bad
time): with bad_lines="error" the first one stops the run with a DataError naming file, line and
field; with "skip" they are dropped, counted per kind and file, and the first examples are kept.
"""

from __future__ import annotations

import os
from collections import Counter as _Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..errors import DataError
from .dataset import MISSING_LABEL
from .encoder import Tokens, parse_label, parse_time, to_numpy, transform
from .multivalued import tokenize
from .readers import BadLine, RawChunk
from .schema import DatasetSpec

MAX_EXAMPLES = 20  # bad-line examples kept in the stats
# Arrow and numpy release the GIL: a chunk's fields are parsed (and prepare's windows counted) in parallel
POOL = ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1)), thread_name_prefix="masknet-prepare")


@dataclass
class ParsedChunk:
    file: str
    unit: str
    n: int
    good: np.ndarray  # bool [n]
    y: np.ndarray  # uint8 [n], or [n, tasks] with several labels (meaningless on bad rows)
    row_ids: np.ndarray
    lines: np.ndarray
    fields: list[tuple[np.ndarray, Tokens]]  # per field: raw-value index per row (-1 missing), tokens
    time: Optional[np.ndarray]
    first_error: np.ndarray  # int32 [n]: index into `checks` of the row's first problem, -1 if good
    checks: list[tuple[str, str, str, Optional[pa.Array], Optional[np.ndarray]]] = field(default_factory=list)
    invalid: list[BadLine] = field(default_factory=list)  # rows the parser dropped
    multi: list = field(default_factory=list)  # per multi-valued field: multivalued.MultiChunk

    def bad_lines(self, limit: int) -> list[BadLine]:
        out = []
        for r in np.nonzero(self.first_error >= 0)[0][:limit]:
            fname, kind, msg, values, idx = self.checks[self.first_error[r]]
            if values is not None and idx is not None and idx[r] >= 0:
                msg = f"{msg}: {values[int(idx[r])].as_py()!r}"
            out.append(BadLine(self.file, int(self.lines[r]), fname, msg, kind, self.unit))
        return out

    def bad_counts(self) -> dict[str, int]:
        if self.good.all():
            return {}
        kinds = _Counter()
        codes, counts = np.unique(self.first_error[self.first_error >= 0], return_counts=True)
        for c, k in zip(codes, counts):
            kinds[self.checks[c][1]] += int(k)
        return dict(kinds)


def _indices(arr: pa.DictionaryArray) -> np.ndarray:
    ind = arr.indices
    if ind.null_count:
        ind = pc.fill_null(ind, -1)
    return to_numpy(ind).astype(np.int32, copy=False)


def parse_chunk(spec: DatasetSpec, chunk: RawChunk, path: str) -> ParsedChunk:
    """Validate and tokenize one chunk, vectorized over its distinct raw values."""
    n = len(chunk)
    first_error = np.full(n, -1, dtype=np.int32)
    checks: list = []

    def flag(rows_bad: np.ndarray, fname: Optional[str], kind: str, msg: str, values=None, idx=None) -> None:
        if rows_bad.any():
            checks.append((fname, kind, msg, values, idx))
            first_error[rows_bad & (first_error < 0)] = len(checks) - 1

    needed = spec.needed_columns()
    lists = [c for c in needed if not pa.types.is_dictionary(chunk.columns[c].type)]  # Parquet list columns
    needed = [c for c in needed if c not in lists]
    idx_of = dict(zip(needed, POOL.map(lambda c: _indices(chunk.columns[c]), needed)))
    multi = [POOL.submit(tokenize, mv, chunk.columns, n) for mv in spec.multi_valued]  # beside the single fields
    if n and chunk.unit == "line":
        all_null = np.ones(n, dtype=bool)
        for ix in idx_of.values():
            all_null &= ix < 0
        flag(all_null, None, "empty_line", "empty line")
    for fs in spec.fields:
        if fs.column in lists:
            raise DataError(f"{path}: column {fs.column!r} is a list column; list field {fs.name!r} under multi_valued in the schema")

    labels = spec.labels
    y = np.zeros((n, len(labels)) if len(labels) > 1 else n, np.uint8)  # [n], or [n, tasks] with several labels
    for t, lab in enumerate(labels):
        lab_arr = chunk.columns[lab.column]
        lab_idx = idx_of[lab.column]
        lab_vals, lab_bad = parse_label(lab_arr.dictionary, lab.kind)
        safe = np.maximum(lab_idx, 0)
        col = lab_vals[safe] if len(lab_vals) else np.zeros(n, np.uint8)
        if lab.optional:
            col = np.where(lab_idx < 0, MISSING_LABEL, col).astype(np.uint8)
        else:
            flag(lab_idx < 0, lab.column, "bad_label", "the label is missing")
        if y.ndim == 2:
            y[:, t] = col
        else:
            y = col
        if lab_bad.any():
            want = {"pm1": "-1 or 1", "01": "0 or 1"}.get(lab.kind, "a number")
            flag((lab_idx >= 0) & lab_bad[safe], lab.column, "bad_label", f"the label must be {want}", lab_arr.dictionary, lab_idx)

    fields = []
    toks = POOL.map(lambda fs: transform(fs, chunk.columns[fs.column].dictionary), spec.fields)
    for fs, tok in zip(spec.fields, toks):
        arr = chunk.columns[fs.column]
        ix = idx_of[fs.column]
        if tok.bad is not None:
            flag((ix >= 0) & tok.bad[np.maximum(ix, 0)], fs.column, tok.kind, tok.message, arr.dictionary, ix)
        fields.append((ix, tok))

    multi_chunks = []
    for mv, job in zip(spec.multi_valued, multi):
        try:
            mc, mchecks = job.result()
        except DataError as exc:
            raise DataError(f"{path}: {exc}") from None
        for check in mchecks:
            flag(*check)
        multi_chunks.append(mc)

    times = None
    if spec.time:
        arr = chunk.columns[spec.time]
        ix = idx_of[spec.time]
        tv, tbad = parse_time(arr.dictionary, spec.time_kind)
        flag(ix < 0, spec.time, "bad_time", "the time is missing")
        if tbad.any():
            flag((ix >= 0) & tbad[np.maximum(ix, 0)], spec.time, "bad_time", f"not a valid time ({spec.time_kind})", arr.dictionary, ix)
        times = tv[np.maximum(ix, 0)] if len(tv) else np.zeros(n, np.int64)

    return ParsedChunk(
        path, chunk.unit, n, first_error < 0, y, chunk.row_ids, chunk.lines, fields, times, first_error, checks, chunk.invalid,
        multi_chunks,
    )


@dataclass
class BadLineLog:
    mode: str
    total: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)
    by_file: dict[str, int] = field(default_factory=dict)
    examples: list[BadLine] = field(default_factory=list)

    def check(self, parsed: ParsedChunk, record: bool) -> None:
        """Raise on the first bad line (mode error); else count them (when `record`)."""
        if parsed.good.all() and not parsed.invalid:
            return
        if self.mode == "error":
            cands = parsed.bad_lines(1) + sorted(parsed.invalid, key=lambda b: b.line)[:1]
            first = min(cands, key=lambda b: b.line)
            raise DataError(f"{first} (use --bad-lines skip to skip such lines)")
        if not record:
            return
        kinds = parsed.bad_counts()
        for b in parsed.invalid:
            kinds[b.kind] = kinds.get(b.kind, 0) + 1
        n = sum(kinds.values())
        self.total += n
        self.by_file[parsed.file] = self.by_file.get(parsed.file, 0) + n
        for k, v in kinds.items():
            self.by_kind[k] = self.by_kind.get(k, 0) + v
        room = MAX_EXAMPLES - len(self.examples)
        if room > 0:
            self.examples.extend(sorted(parsed.bad_lines(room) + parsed.invalid, key=lambda b: (b.file, b.line))[:room])

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "total": self.total,
            "by_kind": self.by_kind,
            "by_file": self.by_file,
            "examples": [b.to_dict() for b in self.examples],
        }


