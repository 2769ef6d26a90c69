"""Raw click logs -> a prepared dataset folder, streaming, in bounded memory.

    prepare(spec, "out/", input="train.txt", split="random")            one file, random 8:1:1
    prepare(spec, "out/", input="train.csv", split="time")              one file, time-ordered 8:1:1
    prepare(spec, "out/", train="a.txt", valid="b.txt", test="c.txt")   explicit files

Passes (the input itself is read in full once, by pass 1; each pass streams chunk by chunk):
    0. (time split only) the row count (file order) or the time column's value counts
    1. validate every row, assign its split, count tokens per field over the TRAIN rows only,
       and spill each window's raw-value indices and distinct tokens to disk (`_Spill`,
       `.prepare-spill` in the output folder) -> fit the encoder
    2. read the spill back (not the input): map each window's indices through its
       token -> index table and append each row to its split (`PreparedWriter`)
Memory is bounded by the chunk size, one spill window (WINDOW_ROWS rows) and the vocabulary
counts (distinct values in train).

Splits
    random   row r (0-based data row of the input, bad lines included) goes to
             train if u < 0.8, valid if u < 0.9, else test, with
             u = splitmix64(r XOR splitmix64(seed)) / 2^64: deterministic, streaming, and the
             same row lands in the same split whatever else is in the file.
    time     rows ranked by (time column, then file order), or by file order alone when the
             format has no time column: the earliest 80% train, the next 10% valid, the
             last 10% test. File order counts bad lines; time ranks count valid rows only.
    explicit train/valid/test files; the encoder is fitted on the train file only.

Output: built in a temporary sibling folder of `output` and swapped in only when complete, so a
failed or killed run never damages the dataset already there; replacing one takes `overwrite`
(output.py).

Bad lines (wrong number of columns, empty line, label not 0/1, unparsable number, bad
value, bad time): with bad_lines="error" the first one stops the run with a DataError
naming file, line and field; with "skip" they are dropped, counted per kind and file,
and the first examples are kept in the stats.
"""

from __future__ import annotations

import os
import shutil
import time
from collections import Counter as _Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..errors import DataError, UserError
from .batch import EncodedRows
from .dataset import MISSING_LABEL, SPLITS, PreparedWriter
from .encoder import MISSING, OOV, Encoder, FieldEncoder, Tokens, TokenCounter, fit_field, parse_label, parse_time, splitmix64, to_numpy, transform
from .output import build_folder
from .readers import DEFAULT_BLOCK_BYTES, BadLine, NeedSerial, RawChunk, check_columns, count_data_rows, iter_chunks
from .multivalued import LengthStats, MultiSpill, encode_chunk, fit_multi, meta_entry, token_counts, tokenize
from .schema import DatasetSpec

TRAIN, VALID, TEST = 0, 1, 2
MAX_EXAMPLES = 20  # bad-line examples kept in the stats


# ---------------------------------------------------------------------------
# Validating a chunk


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
    idx_of = dict(zip(needed, _POOL.map(lambda c: _indices(chunk.columns[c]), needed)))
    multi = [_POOL.submit(tokenize, mv, chunk.columns, n) for mv in spec.multi_valued]  # beside the single fields
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
    toks = _POOL.map(lambda fs: transform(fs, chunk.columns[fs.column].dictionary), spec.fields)
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


# ---------------------------------------------------------------------------
# Splits


def random_split(row_ids: np.ndarray, seed: int) -> np.ndarray:
    """0/1/2 = train/valid/test for each data row, 8:1:1, from a seeded hash of the row index."""
    key = splitmix64(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))[0]
    u = (splitmix64(row_ids.astype(np.uint64) ^ key) >> np.uint64(11)).astype(np.float64) * 2.0**-53
    return ((u >= 0.8).astype(np.uint8) + (u >= 0.9).astype(np.uint8))


def _rank_split(rank: np.ndarray, total: int) -> np.ndarray:
    a, b = int(total * 0.8), int(total * 0.9)
    return ((rank >= a).astype(np.uint8) + (rank >= b).astype(np.uint8))


class TimeRanker:
    """Rank of each valid row in (time, file order), from the time values' counts (pass 0)."""

    def __init__(self, counts: pa.Table):
        order = pc.sort_indices(counts, sort_keys=[("t", "ascending")])
        counts = counts.take(order)
        self.times = to_numpy(counts["t"]).astype(np.int64)
        c = to_numpy(counts["c"]).astype(np.int64)
        self.before = np.concatenate([[0], np.cumsum(c)[:-1]])
        self.total = int(c.sum())
        self.seen = np.zeros(len(self.times), dtype=np.int64)

    def reset(self) -> None:
        self.seen[:] = 0

    def ranks(self, t: np.ndarray) -> np.ndarray:
        pos = np.searchsorted(self.times, t)
        order = np.argsort(pos, kind="stable")
        sp = pos[order]
        within = np.arange(len(sp)) - np.searchsorted(sp, sp, side="left")
        k = np.empty(len(t), dtype=np.int64)
        k[order] = within + self.seen[sp]
        np.add.at(self.seen, pos, 1)
        return self.before[pos] + k


# ---------------------------------------------------------------------------
# The run


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


def prepare(
    spec: DatasetSpec,
    output: str | Path,
    *,
    input: Optional[str | Path] = None,
    train: Optional[str | Path] = None,
    valid: Optional[str | Path] = None,
    test: Optional[str | Path] = None,
    split: str = "random",
    seed: int = 2021,
    bad_lines: str = "error",
    block_bytes: int = DEFAULT_BLOCK_BYTES,
    log: Optional[Callable[[str], None]] = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Prepare a dataset folder; returns its stats (also saved in meta.json). See the module doc.

    The dataset is built in a temporary sibling folder and moved into place only when complete
    (output.py): a failed or killed run leaves `output` as it was. An existing prepared dataset is
    replaced only with `overwrite=True`; a non-empty folder that is not one, never."""
    explicit = [train, valid, test]
    if input is not None and any(p is not None for p in explicit):
        raise UserError("give either --input or --train/--valid/--test, not both")
    if input is None and not all(p is not None for p in explicit):
        raise UserError("give --input FILE, or all three of --train, --valid and --test")
    if split not in ("random", "time"):
        raise UserError(f"--split: expected random or time, got {split!r}")
    if bad_lines not in ("error", "skip"):
        raise UserError(f"--bad-lines: expected error or skip, got {bad_lines!r}")
    kwargs = dict(input=input, train=train, valid=valid, test=test, split=split, seed=seed, bad_lines=bad_lines, block_bytes=block_bytes, log=log)
    try:
        with build_folder(output, overwrite, log) as build:
            try:
                return _prepare(spec, build, serial=False, **kwargs)
            except NeedSerial:  # rows with a wrong number of columns: re-read single-threaded to locate them
                return _prepare(spec, build, serial=True, **kwargs)
    except OSError as exc:  # the readers turn their own errors into DataErrors: this one is writing
        raise DataError(_write_error(output, exc)) from None


def _write_error(output: str | Path, exc: OSError) -> str:
    what = exc.strerror or str(exc).strip().splitlines()[0] or type(exc).__name__
    code = f" (errno {exc.errno})" if exc.errno else ""
    return f"{output}: writing the prepared dataset failed: {what}{code}; {output} was left as it was and the partial output removed"


def _prepare(
    spec: DatasetSpec, output: Path, *, input, train, valid, test, split, seed, bad_lines, block_bytes, log, serial
) -> dict[str, Any]:
    t_start = time.perf_counter()
    if input is not None:
        sources: list[tuple[str, Optional[int]]] = [(str(input), None)]
    else:
        sources = [(str(train), TRAIN), (str(valid), VALID), (str(test), TEST)]
    for path, _ in sources:
        check_columns(spec, path)  # missing file, empty file, missing header columns: fail fast

    def chunks(path: str):
        for raw in iter_chunks(spec, path, serial=serial, block_bytes=block_bytes):
            yield parse_chunk(spec, raw, path)

    badlog = BadLineLog(bad_lines)
    split_desc: dict[str, Any]
    ranker: Optional[TimeRanker] = None
    total_rows = 0
    if input is None:
        split_desc = {"kind": "explicit", "files": {s: p for s, (p, _) in zip(SPLITS, sources)}}
    elif split == "random":
        split_desc = {"kind": "random", "ratios": [0.8, 0.1, 0.1], "seed": seed, "method": "splitmix64(row ^ splitmix64(seed))"}
    elif spec.time:
        counter = TokenCounter()
        for pc_ in chunks(str(input)):
            badlog.check(pc_, record=False)
            g = pc_.good
            if g.any():
                t, c = np.unique(pc_.time[g], return_counts=True)
                counter.add(pa.array(t), c)
        counts = counter.result()
        if counts is None:
            raise DataError(f"{input}: no valid data rows")
        ranker = TimeRanker(counts)
        split_desc = {"kind": "time", "column": spec.time, "ratios": [0.8, 0.1, 0.1], "ranked_rows": ranker.total}
    else:
        total_rows = count_data_rows(spec, input)
        split_desc = {"kind": "time", "column": None, "order": "file", "ratios": [0.8, 0.1, 0.1], "data_rows": total_rows}

    def assign(pc_: ParsedChunk, role: Optional[int]) -> np.ndarray:
        if role is not None:
            return np.full(pc_.n, role, dtype=np.uint8)
        if split == "random":
            return random_split(pc_.row_ids, seed)
        if ranker is not None:
            codes = np.full(pc_.n, TEST, dtype=np.uint8)
            g = pc_.good
            codes[g] = _rank_split(ranker.ranks(pc_.time[g]), ranker.total)
            return codes
        return _rank_split(pc_.row_ids, total_rows)

    # ---- pass 1: the only full read of the input. Validate, assign splits, count tokens over
    # the train rows, and spill each window's raw-value indices and distinct tokens to disk.
    t1 = time.perf_counter()
    nf = len(spec.fields)
    counters = [TokenCounter() for _ in spec.fields]
    multi_counters = [TokenCounter() for _ in spec.multi_valued]
    lengths = [LengthStats(mv.max_len) for mv in spec.multi_valued]
    spill = _Spill(output / ".prepare-spill", spec)
    train_rows = 0
    if ranker is not None:
        ranker.reset()
    try:
        for path, role in sources:
            file_rows = 0
            for pc_ in chunks(path):
                badlog.check(pc_, record=True)
                file_rows += pc_.n + len(pc_.invalid)
                g = pc_.good
                codes = assign(pc_, role)[g]
                train_rows += int(np.count_nonzero(codes == TRAIN))
                for stat, mc in zip(lengths, pc_.multi):
                    stat.add_lengths(mc.lengths[g], codes)
                window = spill.add(pc_, g, codes)
                if window is not None:
                    _count_window(window, counters, spec, multi_counters)
                    window = None
                    _release_memory()
            if file_rows == 0:
                raise DataError(f"{path}: no data rows")
        window = spill.flush()
        if window is not None:
            _count_window(window, counters, spec, multi_counters)
        if train_rows == 0:
            raise DataError(f"{sources[0][0]}: no valid training rows")
        encoder = Encoder(
            spec, [fit_field(fs, c.result()) for fs, c in zip(spec.fields, counters)],
            [fit_multi(mv, c.result()) for mv, c in zip(spec.multi_valued, multi_counters)],
        )
        del counters, multi_counters
        t2 = time.perf_counter()

        # ---- pass 2: map the spilled indices through each window's token -> index table
        labels = [{"name": lab.column, "optional": lab.optional} for lab in spec.labels]
        multi_meta = [meta_entry(m) for m in encoder.multi_valued]
        writer = PreparedWriter(output, encoder.field_meta(), multi_valued=multi_meta, labels=labels)
        missing = np.zeros((3, nf), dtype=np.int64)
        oov = np.zeros((3, nf), dtype=np.int64)
        xt_flat = np.empty(nf * max(spill.window_rows, default=0), dtype=np.int32)  # reused by every window
        for (ix, tokens, y, codes), multi in zip(spill.windows(), spill.multi_windows()):
            xt = xt_flat[: ix.size].reshape(ix.shape)  # [f, rows]

            def one_field(j: int) -> None:
                lut = np.concatenate([encoder.fields[j].codes(tokens[j]), np.zeros(1, np.int32)])  # last: missing
                col = xt[j]
                np.take(lut, ix[j], out=col)  # index -1 -> the missing slot (0)
                missing[:, j] += np.bincount(codes[col == MISSING], minlength=3)  # per split
                oov[:, j] += np.bincount(codes[col == OOV], minlength=3)

            list(_POOL.map(one_field, range(nf)))
            seq, seq_w = _encode_multi_window(encoder, multi, codes, lengths)
            for s_code, s_name in enumerate(SPLITS):
                m = codes == s_code
                if m.any():
                    writer.append(  # [rows of the split, f]: one gather, C-contiguous
                        s_name, xt.T[m], y[m], seq=None if seq is None else seq[m], seq_weights=None if seq_w is None else seq_w[m]
                    )
            m = seq = seq_w = None  # free before trimming
            _release_memory()
        encoder.save(output / "encoder.json")
    finally:
        spill.close()
    t3 = time.perf_counter()

    rows = dict(writer.rows)
    stats = {
        "rows": rows,
        "positive_rate": {s: (writer.positives[s] / rows[s] if rows[s] else None) for s in SPLITS},
        "bad_lines": badlog.to_dict(),
        "fields": [
            {
                "name": fe.spec.name,
                "kind": fe.spec.kind,
                "transform": fe.spec.transform,
                "cardinality": fe.cardinality,
                "min_count": fe.spec.min_count,
                "hash_buckets": fe.spec.hash_buckets,
                "distinct_in_train": fe.distinct_in_train,
                "missing_rate": {s: (float(missing[i, j]) / rows[s] if rows[s] else None) for i, s in enumerate(SPLITS)},
                "oov_rate": {s: (float(oov[i, j]) / rows[s] if rows[s] else None) for i, s in enumerate(SPLITS)},
            }
            for j, fe in enumerate(encoder.fields)
        ],
        **({"multi_valued": _multi_stats(encoder, lengths)} if encoder.multi_valued else {}),
        "seconds": {"pre_pass": round(t1 - t_start, 3), "read_count": round(t2 - t1, 3), "encode": round(t3 - t2, 3), "total": round(t3 - t_start, 3)},
        "single_threaded_parse": serial,
    }
    source = {
        "name": spec.name,
        "format": spec.name,
        "inputs": [{"path": str(Path(p).resolve()), "bytes": Path(p).stat().st_size} for p, _ in sources],
        "split": split_desc,
        "encoder": "encoder.json",
    }
    writer.close(source=source, stats=stats)
    return stats


def _encode_multi_window(encoder: Encoder, multi: list, codes: np.ndarray, lengths: list[LengthStats]):
    """A window's multi-valued ids [rows, ΣL] (and weights), counting values and OOV values per split."""
    if not encoder.multi_valued:
        return None, None
    seq, weights = [], []
    for enc, mw, stat in zip(encoder.multi_valued, multi, lengths):
        ids = np.concatenate([enc.codes(mw.tokens), np.zeros(1, np.int32)])[mw.ids]  # -1 (padding) -> 0
        stat.add_ids(ids, codes)
        seq.append(ids)
        if any(e.spec.weighted for e in encoder.multi_valued):
            w = mw.weights if mw.weights is not None else np.ones(ids.shape, np.float32)
            weights.append(np.where(ids != 0, w, np.float32(0)))
    return np.concatenate(seq, axis=1), (np.concatenate(weights, axis=1) if weights else None)


def _multi_stats(encoder: Encoder, lengths: list[LengthStats]) -> list[dict[str, Any]]:
    return [
        {
            "name": e.spec.name,
            "kind": "multi_valued",
            "column": e.spec.column,
            "cardinality": e.cardinality,
            "max_len": e.spec.max_len,
            "pooling": e.spec.pooling,
            "keep": e.spec.keep,
            "min_count": e.spec.min_count,
            "hash_buckets": e.spec.hash_buckets,
            "weighted": e.spec.weighted,
            "distinct_in_train": e.values.distinct_in_train,
            "rows_with_several_values": stat.with_separator,
            "lengths": stat.to_dict(SPLITS),
        }
        for e, stat in zip(encoder.multi_valued, lengths)
    ]


# ---------------------------------------------------------------------------
# Spilling pass 1 to disk


def _load_malloc_trim() -> Optional[Callable[[int], int]]:
    try:
        import ctypes

        trim = ctypes.CDLL("libc.so.6").malloc_trim  # glibc only
        trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
        return trim
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _load_malloc_trim()


def _release_memory() -> None:
    """Hand freed memory back to the OS after each window.

    Without it, peak RSS grows with the input's size although the live memory does not: the
    windows' large temporaries are freed into glibc's heaps (and Arrow's allocator), and the
    next window's allocations land on other pages, so freed-but-resident memory accumulates
    (measured on 10M Criteo rows: 50-80 MB in use, 495 MB of heap). `malloc_trim(0)` returns
    every whole free page (glibc >= 2.8); Arrow's pool is asked to do the same.
    """
    pa.default_memory_pool().release_unused()
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


_POOL = ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1)), thread_name_prefix="masknet-prepare")
WINDOW_ROWS = 1 << 18  # rows per spilled window: one token lookup per field per window in pass 2


@dataclass
class _Window:
    ix: np.ndarray  # int32 [f, rows]: per field, index into that field's window tokens, -1 = missing
    tokens: list[pa.Array]  # per field: the distinct raw tokens of the window's chunks, concatenated
    y: np.ndarray  # uint8 [rows], or [rows, tasks] with several labels
    codes: np.ndarray  # uint8 [rows]: 0/1/2 = train/valid/test
    multi: list = field(default_factory=list)  # per multi-valued field: multivalued.MultiWindow


def _count_window(w: _Window, counters: list[TokenCounter], spec: DatasetSpec, multi_counters: list[TokenCounter]) -> None:
    train = w.codes == TRAIN
    if not train.any():
        return
    rows = None if train.all() else np.flatnonzero(train)  # the same rows for every field
    for mv, mw, counter in zip(spec.multi_valued, w.multi, multi_counters):
        if not mv.hash_buckets:
            counter.add(mw.tokens, token_counts(mw.ids if rows is None else mw.ids[rows], len(mw.tokens)))

    def one_field(j: int) -> None:
        if spec.fields[j].hash_buckets:
            return
        col = w.ix[j] if rows is None else np.take(w.ix[j], rows)
        # slot 0 collects the missing values (index -1), slot v + 1 token v
        counters[j].add(w.tokens[j], np.bincount(col + 1, minlength=len(w.tokens[j]) + 1)[1:])

    list(_POOL.map(one_field, range(len(spec.fields))))


class _Spill:
    """Pass 1's valid rows on disk: per window an int32 index block, labels, split codes,
    and per field one Arrow IPC record batch of tokens. Deleted when the run ends."""

    def __init__(self, folder: Path, spec: DatasetSpec):
        self.folder = folder
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        self.nf = len(spec.fields)
        self.kinds = [fs.kind for fs in spec.fields]
        self.tasks = len(spec.labels) if len(spec.labels) > 1 else 0  # 0: y is [rows]
        self._ix = open(folder / "ix.bin", "wb")
        self._y = open(folder / "y.bin", "wb")
        self._codes = open(folder / "codes.bin", "wb")
        self._tok_writers: list = [None] * self.nf
        self.multi = MultiSpill(folder, spec.multi_valued) if spec.multi_valued else None
        self.window_rows: list[int] = []
        # The window's raw-value indices [f, capacity], allocated once and reused by every window:
        # a fresh 40 MB array per window (plus its concatenation) made the peak RSS creep with
        # the number of windows (allocator fragmentation), i.e. with the input's size.
        self._buf = np.empty((self.nf, 0), dtype=np.int32)
        self._reset()

    def _reset(self) -> None:
        self._tokens: list[list[pa.Array]] = []  # per chunk, per field
        self._chunk_rows: list[int] = []
        self._ys: list[np.ndarray] = []
        self._codes_parts: list[np.ndarray] = []
        self._rows = 0

    def add(self, pc_: ParsedChunk, good: np.ndarray, codes: np.ndarray) -> Optional[_Window]:
        n = int(np.count_nonzero(good))
        if n:
            end = self._rows + n
            if end > self._buf.shape[1]:  # first window (or an unusually large chunk): grow once
                grown = np.empty((self.nf, max(end, WINDOW_ROWS + 2 * n)), dtype=np.int32)
                grown[:, : self._rows] = self._buf[:, : self._rows]
                self._buf = grown
            all_good = n == pc_.n
            for j, (idx, _) in enumerate(pc_.fields):
                self._buf[j, self._rows : end] = idx if all_good else idx[good]
            if self.multi is not None:
                self.multi.add(pc_.multi, good, self._rows, end, self._buf.shape[1])
            self._tokens.append([tok.tokens for _, tok in pc_.fields])
            self._chunk_rows.append(n)
            self._ys.append(pc_.y if all_good else pc_.y[good])
            self._codes_parts.append(codes)
            self._rows = end
        return self.flush() if self._rows >= WINDOW_ROWS else None

    def flush(self) -> Optional[_Window]:
        """Write the window to disk and return it. Its `ix` is a view of the reused buffer:
        valid until the next `add`."""
        if not self._rows:
            return None
        lengths = np.array([[len(t) for t in toks] for toks in self._tokens], dtype=np.int64)  # [chunks, f]
        bases = np.concatenate([np.zeros((1, self.nf), np.int64), np.cumsum(lengths, axis=0)[:-1]]).astype(np.int32)
        ix = self._buf[:, : self._rows]  # [f, rows]; each field's row is contiguous
        rows = np.array(self._chunk_rows)
        multi = len(self._tokens) > 1

        def one_field(j: int) -> pa.Array:
            parts = [t[j] for t in self._tokens]
            if not multi:
                return parts[0]
            col = ix[j]
            col += np.where(col >= 0, np.repeat(bases[:, j], rows), np.int32(0))
            # one dictionary per window: repeated tokens across chunks collapse to one entry
            enc = pc.dictionary_encode(pa.concat_arrays(parts))
            remap = np.concatenate([to_numpy(enc.indices).astype(np.int32), np.full(1, -1, np.int32)])
            col[:] = remap[col]  # -1 (missing) -> the last slot, which stays -1
            return enc.dictionary

        tokens = list(_POOL.map(one_field, range(self.nf)))  # Arrow and numpy release the GIL
        multi = self.multi.flush(self._rows) if self.multi is not None else []
        w = _Window(ix, tokens, np.concatenate(self._ys), np.concatenate(self._codes_parts), multi)
        for j in range(self.nf):  # field-major on disk, written from the buffer without a copy
            self._ix.write(ix[j])
        self._y.write(w.y)
        self._codes.write(w.codes)
        for j, t in enumerate(tokens):
            if self._tok_writers[j] is None:
                self._tok_writers[j] = pa.ipc.new_stream(str(self.folder / f"tok.{j}.arrow"), pa.schema([("t", t.type)]))
            self._tok_writers[j].write_batch(pa.record_batch([t], names=["t"]))
        self.window_rows.append(ix.shape[1])
        self._reset()
        return w

    def multi_windows(self):
        """Per window, in step with `windows()`: the multi-valued fields' MultiWindows (reused
        buffers, valid until the next window is read); [] per window without such fields."""
        if self.multi is None:
            return iter(lambda: [], None)
        return self.multi.windows(self.window_rows)

    def windows(self):
        """Yield (ix, tokens, y, codes) per window, in the order written. `ix` is a reused
        buffer: valid until the next window is read."""
        self._buf = np.empty((self.nf, 0), dtype=np.int32)  # pass 1's buffer is no longer needed
        for fh in (self._ix, self._y, self._codes):
            fh.close()
        for w in self._tok_writers:
            if w is not None:
                w.close()
        # Read through plain file handles: given a path, Arrow memory-maps the file, and every page
        # read stays resident (130 MB of file-backed RSS by the end of 10M Criteo rows).
        readers = [pa.ipc.open_stream(pa.OSFile(str(self.folder / f"tok.{j}.arrow"))) for j in range(self.nf)] if self.window_rows else []
        flat = np.empty(self.nf * max(self.window_rows, default=0), dtype=np.int32)  # reused by every window
        with open(self.folder / "ix.bin", "rb") as fix, open(self.folder / "y.bin", "rb") as fy, open(self.folder / "codes.bin", "rb") as fc:
            for rows in self.window_rows:
                ix = flat[: rows * self.nf]
                if fix.readinto(ix) != ix.nbytes:
                    raise OSError(f"{self.folder / 'ix.bin'}: spill file is shorter than written")
                ix = ix.reshape(self.nf, rows)
                y = np.fromfile(fy, dtype=np.uint8, count=rows * max(self.tasks, 1))
                if self.tasks:
                    y = y.reshape(rows, self.tasks)
                codes = np.fromfile(fc, dtype=np.uint8, count=rows)
                tokens = [r.read_next_batch().column(0) for r in readers]
                yield ix, tokens, y, codes

    def close(self) -> None:
        for fh in (self._ix, self._y, self._codes):
            fh.close()
        if self.multi is not None:
            self.multi.close_writers()
        for w in self._tok_writers:
            if w is not None:
                try:
                    w.close()
                except (pa.ArrowInvalid, OSError):
                    pass
        shutil.rmtree(self.folder, ignore_errors=True)


# ---------------------------------------------------------------------------
# Applying a saved encoder to new raw rows (evaluation, prediction)


def encode_file(
    encoder: Encoder | str | Path,
    path: str | Path,
    bad_lines: str = "error",
    with_label: Optional[bool] = None,
) -> Iterator[tuple[np.ndarray, Optional[np.ndarray], np.ndarray]]:
    """Encode a raw file with a fitted encoder, chunk by chunk: yields (x int32 [n, f], y uint8 [n]
    ([n, T] for multi-task data) or None, line numbers [n]); with multi-valued fields x is a data.batch.EncodedRows
    (x and seq). Same reading, checks and indices as `prepare`; unseen categories
    map to out-of-vocabulary. `with_label=None`: use the label column if the file has one.
    Bad lines raise a DataError (`bad_lines="error"`) or are dropped (`"skip"`)."""
    from .readers import file_columns

    enc = encoder if isinstance(encoder, Encoder) else Encoder.load(encoder)  # with multi-valued fields x is an EncodedRows
    spec = enc.spec
    if with_label is None:
        present = file_columns(spec, path)
        with_label = bool(spec.labels) and all(lab.column in present for lab in spec.labels)
    if not with_label:
        spec = spec.without_labels()
    log = BadLineLog(bad_lines)

    # single-threaded parse: rows with a wrong number of columns get their line numbers at once
    for raw in iter_chunks(spec, path, serial=True):
        pc_ = parse_chunk(spec, raw, str(path))
        log.check(pc_, record=True)
        g = pc_.good
        x = np.empty((int(g.sum()), len(enc.fields)), dtype=np.int32)
        for j, (fe, (ix, tok)) in enumerate(zip(enc.fields, pc_.fields)):
            x[:, j] = np.concatenate([fe.codes(tok.tokens), np.zeros(1, np.int32)])[ix[g]]
        if enc.multi_valued:
            x = EncodedRows(x, *encode_chunk(enc.multi_valued, pc_.multi, g))
        yield x, (pc_.y[g] if with_label else None), pc_.lines[g]
