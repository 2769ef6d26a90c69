"""Streaming, chunked readers: a raw file in, dictionary-encoded column chunks out.

Every reader yields `RawChunk`s: the needed columns of a block of rows as Arrow
dictionary arrays (values + int32 indices, null = missing), plus each row's 0-based data
row index in the file and its line number (CSV, TSV, libFM) or row number (Parquet), so
that every later check can name the file, line and field of a bad value. Memory is
bounded by the block size, whatever the file size. gzip input (detected by its magic
bytes, not its name) is decompressed on the fly.

CSV parsing is Arrow's streaming reader, one block ahead in a background thread, giving plain
byte columns; two worker threads dictionary-encode each block while the next one is parsed
(Arrow's own dictionary conversion runs on its single parsing thread and was the bottleneck,
docs/data.md "Benchmark"). Rows with the wrong number of
columns are dropped by the parser and reported through its invalid-row handler; only the
single-threaded parser knows their line numbers, so a file that has such rows is read
again single-threaded (`NeedSerial`). Arrow also turns a fully empty line into a row of
nulls (kept: it is reported later as an "empty line"), so line numbers stay exact.

Text is read as bytes and checked for UTF-8 per block (on each column's dictionary, so the
cost is per distinct value): a row with a value that is not UTF-8 is reported with its line
and field ("bad_text") and, like every bad line, stops the read or is skipped (`--bad-lines`).
Arrow's invalid-row handler cannot pass a wrong-width line that is also not UTF-8 to Python
(pyarrow decodes the line's text before calling the handler, and fails); when that happens the
file is read again through `_SanitizedStream`, which replaces the undecodable bytes of exactly
those wrong-width lines, so they are reported as wrong-width lines with their line numbers.
"""

from __future__ import annotations

import csv
import io
import queue
import re
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from ..errors import DataError
from .schema import DatasetSpec

DICT_STRING = pa.dictionary(pa.int32(), pa.string())
DEFAULT_BLOCK_BYTES = 4 << 20  # CSV bytes parsed per block (about 16k Criteo lines)
# Arrow parses any line up to the block size (measured: every line of <= block_bytes bytes parses,
# longer ones fail with "straddling object straddles two block boundaries" depending on where
# they fall). A longer line makes the reader start again with a block that fits it, up to this
# cap: the longest line masknet reads (docs/data.md "Limits"). The read then holds a few such blocks.
MAX_BLOCK_BYTES = 64 << 20
PARQUET_BATCH_ROWS = 1 << 16
# Dictionary-encodes a block's columns while Arrow parses the next block: asking Arrow's streaming
# reader for dictionary columns hashes every value on its single parsing thread, which made it
# the critical path of `prepare` (3.9 s of a 1M-row Criteo file, against 2.0 s for plain bytes).
_ENCODE_POOL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="masknet-csv-encode")


class NeedSerial(Exception):
    """A multi-threaded read met a row with the wrong number of columns: redo it single-threaded."""


class _UndecodableRow(Exception):
    """Arrow met a wrong-width line that is not UTF-8 and could not hand it to Python."""


class _LineTooLong(Exception):
    """Arrow met a line longer than its block ("straddling object ... try to increase block size")."""


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
    """Line 1 without its newline, read in blocks (linear time: no growing buffer) and no longer
    than the longest line masknet reads (MAX_BLOCK_BYTES, as for data lines); a longer one is a
    DataError naming line 1, found after reading just past the cap."""
    parts: list[bytes] = []
    size = 0  # bytes of line 1 so far, its newline included once found
    with open_stream(path) as fh:
        while size <= MAX_BLOCK_BYTES:
            try:
                part = fh.read(1 << 20)
            except OSError as exc:
                raise DataError(f"{path}: unreadable: {exc}") from None
            if not part:
                break
            end = part.find(b"\n")
            parts.append(part if end < 0 else part[:end])
            size += len(part) if end < 0 else end + 1
            if end >= 0:
                break
    if size > MAX_BLOCK_BYTES:
        raise DataError(
            f"{path}: line 1: the header is over {MAX_BLOCK_BYTES:,} bytes long; the longest line masknet reads is "
            f"{MAX_BLOCK_BYTES:,} bytes ({MAX_BLOCK_BYTES >> 20} MiB)"
        )
    return b"".join(parts)


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
        try:
            names = next(csv.reader(io.StringIO(text), delimiter=spec.delimiter), [])
        except csv.Error as exc:  # e.g. a column name over the csv module's field size limit
            limit = f" (the csv module reads names up to {csv.field_size_limit():,} bytes)" if "field limit" in str(exc) else ""
            raise DataError(f"{path}: line 1: the header cannot be read: {exc}{limit}") from None
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
    """Read passes over the file until one gets to its end; each later pass skips what an earlier
    one yielded (`done_through`)."""
    done_through = [0]  # the last line number already yielded (rows and dropped lines)
    sanitize = False
    while True:
        try:
            yield from _iter_csv_pass(spec, path, serial, block_bytes, done_through, sanitize=sanitize)
            return
        except _UndecodableRow:
            if not serial:  # only the single-threaded parser gives line numbers
                raise NeedSerial() from None
            if sanitize:
                raise
            sanitize = True  # read again with those lines made decodable
        except _LineTooLong:
            block_bytes = _block_for_long_line(path, block_bytes)


def _block_for_long_line(path: Path, block_bytes: int) -> int:
    """A block size that fits the first line longer than `block_bytes`, or a DataError naming that
    line when it is longer than MAX_BLOCK_BYTES."""
    found = find_long_line(path, block_bytes)
    if found is None:  # not expected: Arrow parses every line that fits a block
        raise DataError(f"{path}: cannot parse: a line does not fit Arrow's {block_bytes:,}-byte block")
    line, length = found
    if length > MAX_BLOCK_BYTES:
        raise DataError(
            f"{path}: line {line}: {length:,} bytes long; the longest line masknet reads is "
            f"{MAX_BLOCK_BYTES:,} bytes ({MAX_BLOCK_BYTES >> 20} MiB)"
        )
    return min(MAX_BLOCK_BYTES, max(2 * block_bytes, 1 << (length - 1).bit_length()))


def find_long_line(path: str | Path, limit: int) -> Optional[tuple[int, int]]:
    """(line number, length in bytes with its newline) of the first line longer than `limit`."""
    line, run = 1, 0  # run: bytes of the current line seen so far
    try:
        with open_stream(path) as fh:
            while True:
                buf = fh.read(16 << 20)
                if not buf:
                    return (line, run) if run > limit else None
                ends = np.flatnonzero(np.frombuffer(buf, dtype=np.uint8) == 10)
                lengths = np.diff(ends, prepend=-1)  # bytes of each line ending in this buffer, newline included
                if len(lengths):
                    lengths[0] += run
                    long = np.flatnonzero(lengths > limit)
                    if len(long):
                        return line + int(long[0]), int(lengths[long[0]])
                    line += len(ends)
                    run = len(buf) - 1 - int(ends[-1])
                else:
                    run += len(buf)
                if run > limit:
                    return line, _line_length(fh, run)
    except OSError as exc:
        raise DataError(f"{path}: unreadable: {exc}") from None


def _line_length(fh: pa.NativeFile, run: int) -> int:
    """The full length of a line of which `run` bytes were read, reading on to its end."""
    while True:
        buf = fh.read(16 << 20)
        end = buf.find(b"\n")
        if end >= 0 or not buf:
            return run + (end + 1 if end >= 0 else 0)
        run += len(buf)


def _iter_csv_pass(
    spec: DatasetSpec, path: Path, serial: bool, block_bytes: int, done_through: list[int], sanitize: bool
) -> Iterator[RawChunk]:
    columns = check_columns(spec, path)
    needed = spec.needed_columns()
    header_lines = 1 if spec.header else 0
    skip_through = done_through[0]
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
        column_types={c: pa.binary() for c in needed},  # bytes: encoded and UTF-8-checked per block below
        include_columns=needed,
        null_values=list(spec.missing_values),
        strings_can_be_null=True,
        quoted_strings_can_be_null=True,
    )
    stream = open_stream(path)
    if sanitize:
        stream = _SanitizedStream(stream, spec, len(columns))
    batches: Optional[Iterator[pa.RecordBatch]] = None
    with _HandlerDecodeErrors(handler) as decode_errors:

        def parse_error(exc: pa.ArrowInvalid) -> Exception:
            if "straddling object straddles" in str(exc):
                return _LineTooLong()
            if _undecodable_wrong_width(exc, decode_errors):
                return _UndecodableRow()
            return DataError(f"{path}: cannot parse: {_arrow_msg(exc)}")

        try:
            try:
                reader = pacsv.open_csv(stream, read_options=read_opts, parse_options=parse_opts, convert_options=conv_opts)
            except pa.ArrowInvalid as exc:
                raise parse_error(exc) from None
            except OSError as exc:  # the first block is read here: a gzip stream that ends early or is corrupt
                raise DataError(f"{path}: unreadable: {_arrow_msg(exc)}") from None
            valid_seen = 0  # valid rows parsed so far
            adjusted = np.zeros(0, dtype=np.int64)  # invalid_rows[i] - i, for the row-index mapping
            # Multi-threaded reads parse the next blocks in a background thread while this one
            # processes the current block (Arrow's streaming reader parses about one block at a
            # time). Single-threaded reads stay in step: their invalid-row reports belong to the
            # block just read.
            batches = _read_ahead(reader.read_next_batch) if not serial else iter(reader.read_next_batch, None)
            while True:
                try:
                    batch = next(batches)
                except StopIteration:
                    break
                except pa.ArrowInvalid as exc:
                    raise parse_error(exc) from None
                except OSError as exc:  # a gzip stream that ends early or is corrupt
                    raise DataError(f"{path}: unreadable: {_arrow_msg(exc)}") from None
                if unknown_line[0] or (invalid and not serial):
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
                lines = row_ids + 1 + header_lines
                encoded = dict(zip(needed, _ENCODE_POOL.map(lambda c: pc.dictionary_encode(batch.column(c)), needed)))
                cols, undecodable, placeholders = _utf8_columns(encoded, needed)
                bad_text = [
                    BadLine(str(path), int(lines[i]), c, "not UTF-8 text", "bad_text")
                    for i, c in sorted(undecodable.items())
                ]
                keep = np.ones(n, dtype=bool)
                if undecodable:
                    keep[list(undecodable)] = False
                keep &= lines > skip_through  # a second pass: drop what the first one yielded
                dropped = sorted((b for b in invalid + bad_text if b.line > skip_through), key=lambda b: b.line)
                if not keep.all():
                    mask = pa.array(keep)
                    cols = {c: a.filter(mask) for c, a in cols.items()}
                    for c in placeholders:
                        cols[c] = pc.dictionary_encode(cols[c].dictionary_decode()).cast(DICT_STRING)
                    row_ids, lines = row_ids[keep], lines[keep]
                invalid.clear()
                if len(row_ids) or dropped:
                    done_through[0] = max(done_through[0], int(lines[-1]) if len(lines) else 0, *(b.line for b in dropped))
                    yield RawChunk(cols, row_ids, lines, invalid=dropped)
            if unknown_line[0]:
                raise NeedSerial()
            rest = [b for b in invalid if b.line > skip_through]
            if rest:  # dropped rows after the last valid one
                done_through[0] = max(done_through[0], *(b.line for b in rest))
                yield RawChunk({c: pa.array([], DICT_STRING) for c in needed}, np.zeros(0, np.int64), np.zeros(0, np.int64), rest)
        finally:
            if hasattr(batches, "close"):
                batches.close()  # stops the read-ahead thread before the stream closes
            stream.close()


def _read_ahead(read_next: Callable[[], pa.RecordBatch], depth: int = 2) -> Iterator[pa.RecordBatch]:
    """Yield read_next() results computed by a background thread up to `depth` ahead; the
    thread's exception (other than StopIteration, which ends the stream) is raised here."""
    results: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def work() -> None:
        while not stop.is_set():
            try:
                item = ("batch", read_next())
            except StopIteration:
                item = ("end", None)
            except BaseException as exc:  # handed to the consumer
                item = ("error", exc)
            while not stop.is_set():
                try:
                    results.put(item, timeout=0.05)
                    break
                except queue.Full:
                    continue
            if item[0] != "batch":
                return

    worker = threading.Thread(target=work, name="masknet-csv-read-ahead", daemon=True)
    worker.start()
    try:
        while True:
            kind, value = results.get()
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()
        worker.join(timeout=30)


def _utf8_columns(batch: dict[str, pa.DictionaryArray], needed: list[str]) -> tuple[dict[str, pa.DictionaryArray], dict[int, str], list[str]]:
    """The batch's byte columns as UTF-8 string columns, and {row: first field} of rows whose
    value is not UTF-8, and the columns that had such values (the caller drops those rows and
    re-encodes those columns, so that no placeholder value is left in a dictionary).
    Checked on the dictionary (distinct values), not per row."""
    out: dict[str, pa.DictionaryArray] = {}
    undecodable: dict[int, str] = {}
    placeholders: list[str] = []  # columns whose dictionary holds placeholder values
    for c in needed:
        arr = batch[c]
        try:
            # zero-copy view as text, then Arrow's full validation checks the UTF-8 (a cast to
            # string would copy every dictionary: 15x slower, 0.4 CPU-s per 1M Criteo rows)
            values = arr.dictionary.view(pa.string())
            values.validate(full=True)
        except pa.ArrowInvalid:  # rare: find the offending values in Python
            raw = arr.dictionary.to_pylist()
            bad = np.zeros(len(raw), dtype=bool)
            for k, v in enumerate(raw):
                try:
                    v.decode("utf-8")
                except UnicodeDecodeError:
                    bad[k] = True
            idx = arr.indices.fill_null(0).to_numpy(zero_copy_only=False)
            valid = arr.indices.is_valid().to_numpy(zero_copy_only=False)
            rows = np.flatnonzero(valid & bad[idx])
            for r in rows.tolist():
                undecodable.setdefault(r, c)
            placeholders.append(c)
            # placeholders for the bad values: their rows are dropped and the column re-encoded
            values = pa.array([v.decode("utf-8", "replace") for v in raw], pa.string())
        out[c] = pa.DictionaryArray.from_arrays(arr.indices, values, safe=False)  # Arrow's own indices: in range
    return out, undecodable, placeholders


class _HandlerDecodeErrors:
    """Swallow the UnicodeDecodeError that pyarrow raises (and reports as 'unraisable', with a
    traceback on stderr) when it cannot decode a wrong-width line for `handler`; count them.
    Only errors raised for this handler are touched; Arrow may parse ahead in another thread,
    so the hook stays installed for the whole read."""

    def __init__(self, handler) -> None:
        self.handler = handler
        self.seen = 0

    def __enter__(self) -> "_HandlerDecodeErrors":
        self.previous = sys.unraisablehook

        def hook(info) -> None:
            if isinstance(info.exc_value, UnicodeDecodeError) and info.object is self.handler:
                self.seen += 1
            else:
                self.previous(info)

        sys.unraisablehook = hook
        return self

    def __exit__(self, *exc) -> None:
        sys.unraisablehook = self.previous


def _undecodable_wrong_width(exc: Exception, decode_errors: _HandlerDecodeErrors) -> bool:
    # Our handler skips every wrong-width row; Arrow reports one as an error only when the
    # handler could not be called, i.e. when the line is not UTF-8.
    return bool(decode_errors.seen) or bool(re.search(r"Expected \d+ columns, got \d+", str(exc)))


class _SanitizedStream(io.RawIOBase):
    """The file's bytes, line for line, except that a line which is not UTF-8 AND has the wrong
    number of columns gets its undecodable bytes replaced by U+FFFD. Such a line is dropped
    either way; this lets Arrow hand it to the invalid-row handler with its line number. Lines
    with the right width are passed unchanged (their bad values are reported per field)."""

    def __init__(self, source: pa.NativeFile, spec: DatasetSpec, n_columns: int):
        super().__init__()
        self.source, self.spec, self.n_columns = source, spec, n_columns
        self.pending = b""  # output not yet read
        self.carry = b""  # an incomplete last line
        self.eof = False

    def readable(self) -> bool:
        return True

    def _fix_line(self, line: bytes) -> bytes:
        try:
            line.decode("utf-8")
            return line
        except UnicodeDecodeError:
            pass
        text = line.decode("utf-8", "replace")
        body = text.rstrip("\r\n")
        if self.spec.quoting:
            width = len(next(csv.reader([body], delimiter=self.spec.delimiter), []))
        else:
            width = body.count(self.spec.delimiter) + 1
        return line if width == self.n_columns else text.encode("utf-8")

    def _fill(self) -> None:
        while not self.pending and not self.eof:
            block = self.source.read(1 << 20)
            if not block:
                self.eof = True
                block, self.carry = self.carry, b""
            else:
                block = self.carry + block
                cut = block.rfind(b"\n") + 1
                block, self.carry = block[:cut], block[cut:]
            try:
                block.decode("utf-8")
                self.pending = block
            except UnicodeDecodeError:
                self.pending = b"".join(self._fix_line(ln) for ln in block.splitlines(keepends=True))

    def readinto(self, buf) -> int:
        self._fill()
        n = min(len(buf), len(self.pending))
        buf[:n] = self.pending[:n]
        self.pending = self.pending[n:]
        return n

    def close(self) -> None:
        self.source.close()
        super().close()


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
            try:
                buf = fh.read(16 << 20)
            except OSError as exc:
                raise DataError(f"{path}: unreadable: {_arrow_msg(exc)}") from None
            if not buf:
                break
            lines += buf.count(b"\n")
            last = buf[-1:]
    if last != b"\n":
        lines += 1  # last line without a newline
    return max(0, lines - (1 if spec.header else 0))
