"""Raw click logs -> a prepared dataset folder, streaming, in bounded memory.

    prepare(spec, "out/", input="train.txt", split="random")            one file, random 8:1:1
    prepare(spec, "out/", input="train.csv", split="time")              one file, time-ordered 8:1:1
    prepare(spec, "out/", train="a.txt", valid="b.txt", test="c.txt")   explicit files

Passes (the input itself is read in full once, by pass 1; each pass streams chunk by chunk):
    0. (time split only) the row count (file order) or the time column's value counts
    1. validate every row, assign its split, count tokens per field over the TRAIN rows only,
       and spill each window's raw-value indices and distinct tokens to disk (spill.Spill,
       `.prepare-spill` in the output folder) -> fit the encoder
    2. read the spill back (not the input): map each window's indices through its
       token -> index table and append each row to its split (`PreparedWriter`)
Memory is bounded by the chunk size, one spill window (WINDOW_ROWS rows) and the vocabulary
counts (distinct values in train).

Splits (splits.py)
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

This module is the run only: rows.py parses and checks chunks, splits.py assigns them, spill.py
holds pass 1 on disk, and rawrows.py applies a saved encoder to new raw rows (predict, evaluate).

Bad lines (rows.py: wrong number of columns, empty line, label not 0/1, unparsable number, bad
value, bad time): with bad_lines="error" the first one stops the run with a DataError
naming file, line and field; with "skip" they are dropped, counted per kind and file,
and the first examples are kept in the stats.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np

from ..errors import DataError, UserError
from .dataset import SPLITS, PreparedWriter
from .encoder import MISSING, OOV, Encoder, TokenCounter, fit_field
from .multivalued import LengthStats, fit_multi, meta_entry, token_counts
from .output import build_folder
from .readers import DEFAULT_BLOCK_BYTES, NeedSerial, check_columns, iter_chunks
from .rows import POOL, BadLineLog, ParsedChunk, parse_chunk
from .schema import SMALL_FILE_TRAIN_ROWS, DatasetSpec
from .spill import Spill, Window, release_memory
from .splits import TEST, TRAIN, VALID, SplitPlan, plan_splits


@dataclass(frozen=True)
class PrepareJob:
    """What `prepare` was asked to do, checked; kept whole for the single-threaded retry."""

    input: Optional[str]
    train: Optional[str]
    valid: Optional[str]
    test: Optional[str]
    split: str = "random"
    seed: int = 2021
    bad_lines: str = "error"
    block_bytes: int = DEFAULT_BLOCK_BYTES
    log: Optional[Callable[[str], None]] = None

    def __post_init__(self) -> None:
        explicit = [self.train, self.valid, self.test]
        if self.input is not None and any(p is not None for p in explicit):
            raise UserError("give either --input or --train/--valid/--test, not both")
        if self.input is None and not all(p is not None for p in explicit):
            raise UserError("give --input FILE, or all three of --train, --valid and --test")
        if self.split not in ("random", "time"):
            raise UserError(f"--split: expected random or time, got {self.split!r}")
        if self.bad_lines not in ("error", "skip"):
            raise UserError(f"--bad-lines: expected error or skip, got {self.bad_lines!r}")

    @property
    def sources(self) -> list[tuple[str, Optional[int]]]:
        """(path, split code) per input file; None: the rows are split by `split`."""
        if self.input is not None:
            return [(str(self.input), None)]
        return [(str(self.train), TRAIN), (str(self.valid), VALID), (str(self.test), TEST)]


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
    job = PrepareJob(input, train, valid, test, split, seed, bad_lines, block_bytes, log)
    try:
        with build_folder(output, overwrite, log) as build:
            try:
                return _run(spec, build, job, serial=False)
            except NeedSerial:  # rows with a wrong number of columns: re-read single-threaded to locate them
                return _run(spec, build, job, serial=True)
    except OSError as exc:  # the readers turn their own errors into DataErrors: this one is writing
        raise DataError(_write_error(output, exc)) from None


def _write_error(output: str | Path, exc: OSError) -> str:
    what = exc.strerror or str(exc).strip().splitlines()[0] or type(exc).__name__
    code = f" (errno {exc.errno})" if exc.errno else ""
    return f"{output}: writing the prepared dataset failed: {what}{code}; {output} was left as it was and the partial output removed"


@dataclass
class _Pass2:
    """What pass 2 leaves for the stats: the writer and per split x field missing / OOV counts [3, f]."""

    writer: PreparedWriter
    missing: np.ndarray
    oov: np.ndarray


def _run(spec: DatasetSpec, output: Path, job: PrepareJob, serial: bool) -> dict[str, Any]:
    t_start = time.perf_counter()
    sources = job.sources
    for path, _ in sources:
        check_columns(spec, path)  # missing file, empty file, missing header columns: fail fast

    def chunks(path: str) -> Iterator[ParsedChunk]:
        for raw in iter_chunks(spec, path, serial=serial, block_bytes=job.block_bytes):
            yield parse_chunk(spec, raw, path)

    badlog = BadLineLog(job.bad_lines)
    plan = plan_splits(spec, sources, job.split, job.seed, chunks, lambda parsed: badlog.check(parsed, record=False))
    t1 = time.perf_counter()
    lengths = [LengthStats(mv.max_len) for mv in spec.multi_valued]
    spill = Spill(output / ".prepare-spill", spec)
    try:
        encoder = _count_and_spill(spec, sources, chunks, badlog, plan, spill, lengths, job.log)
        spec = encoder.spec  # the min counts used
        t2 = time.perf_counter()
        written = _encode_spill(spec, encoder, spill, lengths, output)
        encoder.save(output / "encoder.json")
    finally:
        spill.close()
    t3 = time.perf_counter()
    seconds = {"pre_pass": round(t1 - t_start, 3), "read_count": round(t2 - t1, 3), "encode": round(t3 - t2, 3), "total": round(t3 - t_start, 3)}
    stats = _stats(encoder, written, badlog, lengths, seconds, serial)
    source = {
        "name": spec.name,
        "format": spec.name,
        "inputs": [{"path": str(Path(p).resolve()), "bytes": Path(p).stat().st_size} for p, _ in sources],
        "split": plan.describe,
        "encoder": "encoder.json",
    }
    written.writer.close(source=source, stats=stats)
    return stats


def _count_and_spill(
    spec: DatasetSpec, sources: list, chunks: Callable[[str], Iterator[ParsedChunk]], badlog: BadLineLog,
    plan: SplitPlan, spill: Spill, lengths: list[LengthStats], log: Optional[Callable[[str], None]] = None,
) -> Encoder:
    """Pass 1, the only full read of the input: validate, assign splits, count tokens over the train
    rows, and spill each window's raw-value indices and distinct tokens to disk. -> the fitted encoder
    (its spec carries the min counts used: the small-file rule is applied once the train rows are counted)."""
    counters = [TokenCounter() for _ in spec.fields]
    multi_counters = [TokenCounter() for _ in spec.multi_valued]
    train_rows = 0
    if plan.ranker is not None:
        plan.ranker.reset()
    for path, role in sources:
        file_rows = 0
        for parsed in chunks(path):
            badlog.check(parsed, record=True)
            file_rows += parsed.n + len(parsed.invalid)
            g = parsed.good
            codes = plan.assign(parsed, role)[g]
            train_rows += int(np.count_nonzero(codes == TRAIN))
            for stat, mc in zip(lengths, parsed.multi):
                stat.add_lengths(mc.lengths[g], codes)
            window = spill.add(parsed, g, codes)
            if window is not None:
                _count_window(window, counters, spec, multi_counters)
                window = None
                release_memory()
        if file_rows == 0:
            raise DataError(f"{path}: no data rows")
    window = spill.flush()
    if window is not None:
        _count_window(window, counters, spec, multi_counters)
    if train_rows == 0:
        raise DataError(f"{sources[0][0]}: no valid training rows")
    small = spec.for_train_rows(train_rows)
    if small is not None:
        if log is not None:
            log(f"min count {spec.small_file_min_count} for every field: a small file ({train_rows:,} train rows, "
                f"under {SMALL_FILE_TRAIN_ROWS:,}); --min-count N sets it")
        spec = small
    return Encoder(
        spec, [fit_field(fs, c.result()) for fs, c in zip(spec.fields, counters)],
        [fit_multi(mv, c.result()) for mv, c in zip(spec.multi_valued, multi_counters)],
    )


def _encode_spill(spec: DatasetSpec, encoder: Encoder, spill: Spill, lengths: list[LengthStats], output: Path) -> _Pass2:
    """Pass 2: map the spilled indices through each window's token -> index table, append each split's rows."""
    nf = len(spec.fields)
    labels = [{"name": lab.column, "optional": lab.optional} for lab in spec.labels]
    multi_meta = [meta_entry(m) for m in encoder.multi_valued]
    writer = PreparedWriter(output, encoder.field_meta(), multi_valued=multi_meta, labels=labels)
    missing = np.zeros((3, nf), dtype=np.int64)
    oov = np.zeros((3, nf), dtype=np.int64)
    xt_flat = np.empty(nf * max(spill.window_rows, default=0), dtype=np.int32)  # reused by every window
    for (ix, tokens, y, codes), multi in zip(spill.windows(), spill.multi_windows()):
        xt = xt_flat[: ix.size].reshape(ix.shape)  # [f, rows]

        def one_field(j: int) -> None:
            col = xt[j]
            np.take(encoder.fields[j].lookup_table(tokens[j]), ix[j], out=col)  # index -1 -> the missing slot (0)
            missing[:, j] += np.bincount(codes[col == MISSING], minlength=3)  # per split
            oov[:, j] += np.bincount(codes[col == OOV], minlength=3)

        list(POOL.map(one_field, range(nf)))
        seq, seq_w = _encode_multi_window(encoder, multi, codes, lengths)
        for s_code, s_name in enumerate(SPLITS):
            m = codes == s_code
            if m.any():
                writer.append(  # [rows of the split, f]: one gather, C-contiguous
                    s_name, xt.T[m], y[m], seq=None if seq is None else seq[m], seq_weights=None if seq_w is None else seq_w[m]
                )
        m = seq = seq_w = None  # free before trimming
        release_memory()
    return _Pass2(writer, missing, oov)


def _stats(encoder: Encoder, written: _Pass2, badlog: BadLineLog, lengths: list[LengthStats], seconds: dict, serial: bool) -> dict[str, Any]:
    """meta.json's stats: rows and positive rate per split, bad lines, and each field's rates."""
    rows = dict(written.writer.rows)

    def rate(counts: np.ndarray, j: int) -> dict[str, Optional[float]]:
        return {s: (float(counts[i, j]) / rows[s] if rows[s] else None) for i, s in enumerate(SPLITS)}

    return {
        "rows": rows,
        "positive_rate": {s: (written.writer.positives[s] / rows[s] if rows[s] else None) for s in SPLITS},
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
                "missing_rate": rate(written.missing, j),
                "oov_rate": rate(written.oov, j),
            }
            for j, fe in enumerate(encoder.fields)
        ],
        **({"multi_valued": _multi_stats(encoder, lengths)} if encoder.multi_valued else {}),
        "seconds": seconds,
        "single_threaded_parse": serial,
    }


def _encode_multi_window(encoder: Encoder, multi: list, codes: np.ndarray, lengths: list[LengthStats]):
    """A window's multi-valued ids [rows, ΣL] (and weights), counting values and OOV values per split."""
    if not encoder.multi_valued:
        return None, None
    seq, weights = [], []
    for enc, mw, stat in zip(encoder.multi_valued, multi, lengths):
        ids = enc.values.lookup_table(mw.tokens)[mw.ids]  # -1 (padding) -> 0
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


def _count_window(w: Window, counters: list[TokenCounter], spec: DatasetSpec, multi_counters: list[TokenCounter]) -> None:
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

    list(POOL.map(one_field, range(len(spec.fields))))
