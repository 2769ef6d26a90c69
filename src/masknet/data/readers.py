"""Streaming, chunked readers: a raw file in, dictionary-encoded column chunks out.

Every reader yields `RawChunk`s: the needed columns of a block of rows as Arrow
dictionary arrays (values + int32 indices, null = missing), plus each row's 0-based data
row index in the file and its line number (CSV, TSV, libFM) or row number (Parquet), so
that every later check can name the file, line and field of a bad value. Memory is
bounded by the block size, whatever the file size. gzip input (detected by its magic
bytes, not its name) is decompressed on the fly.

CSV parsing is Arrow's multi-threaded streaming reader. Rows with the wrong number of
columns are dropped by the parser and reported through its invalid-row handler; only the
single-threaded parser knows their line numbers, so a file that has such rows is read
again single-threaded (`NeedSerial`). Arrow also turns a fully empty line into a row of
nulls (kept: it is reported later as an "empty line"), so line numbers stay exact.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from ..errors import DataError
from .schema import DatasetSpec

DICT_STRING = pa.dictionary(pa.int32(), pa.string())
DEFAULT_BLOCK_BYTES = 4 << 20  # CSV bytes parsed per block (about 16k Criteo lines)
PARQUET_BATCH_ROWS = 1 << 16


class NeedSerial(Exception):
    """A multi-threaded read met a row with the wrong number of columns: redo it single-threaded."""


@dataclass
class BadLine:
    """One rejected input line: where, which field, what is wrong."""

    file: str
    line: int
    field: Optional[str]
    message: str
    kind: str  # wrong_columns | empty_line | bad_label | bad_number | bad_value | bad_time
    unit: str = "line"

    def __str__(self) -> str:
        where = f"{self.file}: {self.unit} {self.line}"
        return f"{where}: field {self.field!r}: {self.message}" if self.field else f"{where}: {self.message}"

    def to_dict(self) -> dict:
        return {"file": self.file, self.unit: self.line, "field": self.field, "kind": self.kind, "message": self.message}


@dataclass
class RawChunk:
    columns: dict[str, pa.DictionaryArray]
    row_ids: np.ndarray  # int64 [n]: 0-based data row index in the file, bad rows included
    lines: np.ndarray  # int64 [n]: 1-based line (CSV) or row (Parquet) number
    invalid: list[BadLine] = field(default_factory=list)  # rows the parser dropped since the last chunk
    unit: str = "line"

    def __len__(self) -> int:
        return len(self.row_ids)


# ---------------------------------------------------------------------------
# Opening files


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(2) == b"\x1f\x8b"


def open_stream(path: str | Path) -> pa.NativeFile:
    """A byte stream over `path`, decompressing gzip on the fly."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if not path.is_file():
        raise DataError(f"{path}: not a file")
    return pa.input_stream(str(path), compression="gzip" if _is_gzip(path) else None)


def _first_line(path: Path) -> bytes:
    with open_stream(path) as fh:
        buf = b""
        while b"\n" not in buf:
            try:
                part = fh.read(1 << 16)
            except OSError as exc:
                raise DataError(f"{path}: unreadable: {exc}") from None
            if not part:
                break
            buf += part
    return buf.split(b"\n", 1)[0]


def check_not_empty(path: str | Path) -> None:
    path = Path(path)
    with open_stream(path) as fh:
        try:
            first = fh.read(1)
        except OSError as exc:  # e.g. a truncated or corrupt gzip stream
            raise DataError(f"{path}: unreadable: {exc}") from None
        if not first:
            raise DataError(f"{path}: empty file")


def resolve_file_type(spec: DatasetSpec, path: Path) -> str:
    if spec.file_type != "auto":
        return spec.file_type
    name = path.name.lower()
    return "parquet" if name.endswith((".parquet", ".pq")) else "csv"


def file_columns(spec: DatasetSpec, path: str | Path) -> list[str]:
    """The column names of `path` (header line, Parquet schema, or the spec's fixed list)."""
    path = Path(path)
    ftype = resolve_file_type(spec, path)
    if ftype == "parquet":
        try:
            return list(pq.ParquetFile(str(path)).schema_arrow.names)
        except (pa.ArrowInvalid, OSError) as exc:
            raise DataError(f"{path}: not a readable Parquet file ({exc})") from None
    check_not_empty(path)
    if not spec.header:
        return list(spec.columns or [])
    line = _first_line(path).rstrip(b"\r")
    try:
        text = line.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise DataError(f"{path}: line 1: the header is not UTF-8 text") from None
    if not text.strip():
        raise DataError(f"{path}: line 1: empty header")
    if spec.quoting:
        names = next(csv.reader(io.StringIO(text), delimiter=spec.delimiter), [])
    else:
        names = text.split(spec.delimiter)
    return [n.strip() for n in names]


def check_columns(spec: DatasetSpec, path: str | Path) -> list[str]:
    """Fail unless every column the spec needs is in the file. Returns the file's columns."""
    cols = file_columns(spec, path)
    present = set(cols)
    for col in spec.needed_columns():
        if col not in present:
            if spec.schema_path:
                raise DataError(
                    f"{path}: column {col!r} named in schema {spec.schema_path} is not in the file "
                    f"(columns: {', '.join(cols)})"
                )
            what = "header" if spec.header else "columns"
            raise DataError(f"{path}: line 1: the {what} lacks column {col!r} (found: {', '.join(cols)})")
    return cols


# ---------------------------------------------------------------------------
# Reading


def iter_chunks(
    spec: DatasetSpec,
    path: str | Path,
    serial: bool = False,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
) -> Iterator[RawChunk]:
    path = Path(path)
    if resolve_file_type(spec, path) == "parquet":
        yield from _iter_parquet(spec, path)
    else:
        yield from _iter_csv(spec, path, serial, block_bytes)


def _iter_csv(spec: DatasetSpec, path: Path, serial: bool, block_bytes: int) -> Iterator[RawChunk]:
    columns = check_columns(spec, path)
    needed = spec.needed_columns()
    header_lines = 1 if spec.header else 0
    invalid: list[BadLine] = []
    invalid_rows: list[int] = []  # data row index of each dropped row, in order
    unknown_line = [False]

    def handler(row: pacsv.InvalidRow) -> str:
        if row.number is None:
            unknown_line[0] = True
        else:
            invalid_rows.append(row.number - 1 - header_lines)
            invalid.append(
                BadLine(
                    str(path), row.number, None,
                    f"wrong number of columns: expected {row.expected_columns}, found {row.actual_columns}",
                    "wrong_columns",
                )
            )
        return "skip"

    read_opts = pacsv.ReadOptions(
        use_threads=not serial,
        block_size=block_bytes,
        column_names=None if spec.header else columns,
        skip_rows=0,
    )
    parse_opts = pacsv.ParseOptions(
        delimiter=spec.delimiter,
        quote_char='"' if spec.quoting else False,
        newlines_in_values=False,
        ignore_empty_lines=False,
        invalid_row_handler=handler,
    )
    conv_opts = pacsv.ConvertOptions(
        column_types={c: DICT_STRING for c in needed},
        include_columns=needed,
        null_values=list(spec.missing_values),
        strings_can_be_null=True,
        quoted_strings_can_be_null=True,
    )
    stream = open_stream(path)
    try:
        try:
            reader = pacsv.open_csv(stream, read_options=read_opts, parse_options=parse_opts, convert_options=conv_opts)
        except pa.ArrowInvalid as exc:
            raise DataError(f"{path}: cannot parse: {_arrow_msg(exc)}") from None
        valid_seen = 0  # valid rows yielded so far
        adjusted = np.zeros(0, dtype=np.int64)  # invalid_rows[i] - i, for the row-index mapping
        while True:
            try:
                batch = reader.read_next_batch()
            except StopIteration:
                break
            except pa.ArrowInvalid as exc:
                raise DataError(f"{path}: cannot parse: {_arrow_msg(exc)}") from None
            except UnicodeDecodeError:
                raise DataError(f"{path}: not UTF-8 text") from None
            except OSError as exc:  # a gzip stream that ends early or is corrupt
                raise DataError(f"{path}: unreadable: {exc}") from None
            if unknown_line[0]:
                raise NeedSerial()
            n = batch.num_rows
            j = np.arange(valid_seen, valid_seen + n, dtype=np.int64)
            if invalid_rows:
                if len(adjusted) != len(invalid_rows):
                    adjusted = np.asarray(invalid_rows, dtype=np.int64) - np.arange(len(invalid_rows))
                row_ids = j + np.searchsorted(adjusted, j, side="right")
            else:
                row_ids = j
            valid_seen += n
            chunk = RawChunk(
                {c: batch.column(c) for c in needed},
                row_ids,
                row_ids + 1 + header_lines,
                invalid=list(invalid),
            )
            invalid.clear()
            yield chunk
        if unknown_line[0]:
            raise NeedSerial()
        if invalid:  # dropped rows after the last valid one
            yield RawChunk({c: pa.array([], DICT_STRING) for c in needed}, np.zeros(0, np.int64), np.zeros(0, np.int64), list(invalid))
    finally:
        stream.close()


def _arrow_msg(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _iter_parquet(spec: DatasetSpec, path: Path) -> Iterator[RawChunk]:
    check_columns(spec, path)
    needed = spec.needed_columns()
    pf = pq.ParquetFile(str(path))
    if pf.metadata.num_rows == 0:
        raise DataError(f"{path}: empty file (no rows)")
    start = 0
    try:
        for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=needed):
            cols = {}
            for c in needed:
                arr = batch.column(c)
                if not pa.types.is_dictionary(arr.type):
                    arr = pc.dictionary_encode(arr)
                cols[c] = _parquet_missing(arr, spec.missing_values)
            n = batch.num_rows
            row_ids = np.arange(start, start + n, dtype=np.int64)
            start += n
            yield RawChunk(cols, row_ids, row_ids + 1, unit="row")
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{path}: cannot read Parquet: {_arrow_msg(exc)}") from None


def _parquet_missing(arr: pa.DictionaryArray, missing: list[str]) -> pa.DictionaryArray:
    """Strings listed as missing values become nulls, as they do in CSV."""
    if not pa.types.is_string(arr.type.value_type) and not pa.types.is_large_string(arr.type.value_type):
        return arr
    is_missing = pc.is_in(arr.dictionary, value_set=pa.array(missing, arr.type.value_type)).to_numpy(zero_copy_only=False)
    if not is_missing.any():
        return arr
    idx = arr.indices.to_numpy(zero_copy_only=False)
    null = ~arr.indices.is_valid().to_numpy(zero_copy_only=False)
    null |= is_missing[np.where(null, 0, idx)] & ~null
    return pa.DictionaryArray.from_arrays(pa.array(np.where(null, 0, idx).astype(np.int32), mask=null), arr.dictionary)


def count_data_rows(spec: DatasetSpec, path: str | Path) -> int:
    """Number of data rows (lines, or Parquet rows), bad ones included: for the file-order split."""
    path = Path(path)
    if resolve_file_type(spec, path) == "parquet":
        return pq.ParquetFile(str(path)).metadata.num_rows
    check_not_empty(path)
    lines, last = 0, b"\n"
    with open_stream(path) as fh:
        while True:
            buf = fh.read(16 << 20)
            if not buf:
                break
            lines += buf.count(b"\n")
            last = buf[-1:]
    if last != b"\n":
        lines += 1  # last line without a newline
    return max(0, lines - (1 if spec.header else 0))
