"""Is a prepared dataset's content what prepare wrote? Ranges at every open, SHA-256 on request.

Recorded in meta.json when a dataset is written (`PreparedWriter.close`):

    splits.<split>.x_min, x_max   per field, the smallest and largest index written (absent when empty)
    files.<file>                  {"bytes": size, "sha256": hex digest} of every array file

Checked when it is opened (`load_prepared`), besides the file sizes:

    always        the recorded ranges lie in [0, cardinality), and one read of every x and y file finds
                  each field's actual min and max: an index outside [0, cardinality) (it would reach
                  an embedding lookup as an IndexError), a label other than 0/1, or a range other than
                  the recorded one is refused, naming the file and field. Folders written before
                  these keys existed get the same scan without the comparison.
    verify=True   also every array file's SHA-256 against meta.json (`masknet train` verifies once,
                  when it opens the data), which catches in-range corruption the ranges cannot.

Both read the files through one reused buffer, not the memory map, so a check adds no resident
memory; files are scanned in parallel threads (reading, numpy's reductions and hashlib release the
GIL). Costs are in docs/data.md ("Integrity checks").
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from ..errors import DataError

READ_BYTES = 1 << 20  # per block read, whole rows (6,721 rows of 39 int32 fields); 8 MB was no faster


@dataclass
class FileScan:
    """What one read of an array file found."""

    lo: Optional[np.ndarray]  # per column min (None: not asked, or no rows)
    hi: Optional[np.ndarray]  # per column max
    sha256: Optional[str]


def _blocks(path: Path, dtype: np.dtype, cols: int) -> Iterator[np.ndarray]:
    """The file as [rows, cols] blocks of whole rows, read into one reused buffer."""
    row_bytes = dtype.itemsize * cols
    buf = np.empty(max(1, READ_BYTES // row_bytes) * row_bytes, dtype=np.uint8)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as fh:
        while True:
            n = 0
            while n < len(buf):
                got = fh.readinto(view[n:])
                if not got:
                    break
                n += got
            if n == 0:
                return
            if n % row_bytes:
                raise DataError(f"{path}: {n} trailing bytes do not make whole rows (truncated?)")
            yield buf[:n].view(dtype).reshape(-1, cols)
            if n < len(buf):
                return


def scan_file(path: Path, dtype: np.dtype, cols: int, ranges: bool, digest: bool) -> FileScan:
    lo = hi = None
    h = hashlib.sha256() if digest else None
    for blk in _blocks(path, dtype, cols):
        if h is not None:
            h.update(blk)
        if ranges and len(blk):
            b_lo, b_hi = blk.min(axis=0), blk.max(axis=0)
            lo = b_lo if lo is None else np.minimum(lo, b_lo)
            hi = b_hi if hi is None else np.maximum(hi, b_hi)
    return FileScan(lo, hi, h.hexdigest() if h is not None else None)


def first_row_outside(path: Path, dtype: np.dtype, cols: int, col: int, lo: int, hi: int) -> tuple[int, int]:
    """(row, value) of the first value of column `col` outside [lo, hi]; only called once one is known to exist."""
    start = 0
    for blk in _blocks(path, dtype, cols):
        v = blk[:, col]
        bad = np.flatnonzero((v < lo) | (v > hi))
        if len(bad):
            return start + int(bad[0]), int(v[bad[0]])
        start += len(blk)
    raise AssertionError(f"{path}: no value outside [{lo}, {hi}] in column {col}")


_POOL = ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1)), thread_name_prefix="masknet-integrity")


def scan_files(jobs: list[tuple[Path, np.dtype, int, bool, bool]]) -> list[FileScan]:
    """scan_file for each (path, dtype, cols, ranges, digest), in parallel."""
    return list(_POOL.map(lambda job: scan_file(*job), jobs))


def sha256_files(paths: list[Path]) -> list[str]:
    return [s.sha256 for s in scan_files([(p, np.dtype("u1"), 1, False, True) for p in paths])]


def fingerprint(record: dict) -> str:
    """SHA-256 of a JSON-able record in canonical form (sorted keys, compact): a dataset's identity."""
    return hashlib.sha256(json.dumps(record, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# ---------------------------------------------------------------------------
# Recording (at write time) and checking (at open)


@dataclass
class ArrayFile:
    """One array file of a split: x (indices [rows, fields]), y (labels) or p (probabilities)."""

    split: str
    kind: str  # x | y | p
    path: Path
    dtype: np.dtype
    cols: int


def record(files: list[ArrayFile]) -> dict:
    """meta.json's `files` entry: size and SHA-256 of each file, read back from disk in parallel."""
    digests = sha256_files([f.path for f in files])
    return {f.path.name: {"bytes": f.path.stat().st_size, "sha256": d} for f, d in zip(files, digests)}


def check(meta_path: Path, meta: dict, files: list[ArrayFile], names: list[str], cards: list[int], verify: bool) -> None:
    """Refuse (DataError) an array file whose content is not what prepare wrote; see the module doc."""
    for s, info in meta["splits"].items():
        if "x_min" in info:
            _check_recorded(meta_path, s, info["x_min"], info["x_max"], names, cards)
    recorded = meta.get("files") or {}
    jobs = [(f.path, f.dtype, f.cols, f.kind in ("x", "y"), verify) for f in files]
    for f, found in zip(files, scan_files(jobs)):
        if f.kind == "x" and found.lo is not None:
            _check_x(f, found, meta["splits"][f.split], names, cards)
        if f.kind == "y" and found.hi is not None and int(found.hi[0]) > 1:
            row, v = first_row_outside(f.path, f.dtype, 1, 0, 0, 1)
            raise DataError(f"{f.path}: row {row}: label {v} is not 0 or 1: {_AGAIN}")
        want = recorded.get(f.path.name, {}).get("sha256")
        if verify and want is not None and found.sha256 != want:
            raise DataError(f"{f.path}: its SHA-256 differs from the one recorded in {meta_path.name}: {_AGAIN}")


_AGAIN = "the file is corrupt or was changed after prepare; prepare the dataset again"


def _check_recorded(meta_path: Path, split: str, lo: list, hi: list, names: list[str], cards: list[int]) -> None:
    if len(lo) != len(names) or len(hi) != len(names):
        raise DataError(f"{meta_path}: splits.{split}: x_min/x_max have {len(lo)}/{len(hi)} entries for {len(names)} fields")
    for name, card, a, b in zip(names, cards, lo, hi):
        if not (0 <= a <= b < card):
            raise DataError(
                f"{meta_path}: splits.{split}: field {name!r}: recorded range {a}..{b} is not inside 0..{card - 1} "
                "(its cardinality): meta.json is inconsistent; prepare the dataset again"
            )


def _check_x(f: ArrayFile, found: FileScan, info: dict, names: list[str], cards: list[int]) -> None:
    for j, (name, card) in enumerate(zip(names, cards)):
        lo, hi = int(found.lo[j]), int(found.hi[j])
        if lo < 0 or hi >= card:
            row, v = first_row_outside(f.path, f.dtype, f.cols, j, 0, card - 1)
            raise DataError(
                f"{f.path}: field {name!r}: index {v} at row {row} is outside 0..{card - 1} (the field's cardinality is {card}): {_AGAIN}"
            )
        if "x_min" in info and (lo, hi) != (info["x_min"][j], info["x_max"][j]):
            raise DataError(
                f"{f.path}: field {name!r}: its indices span {lo}..{hi}, but prepare wrote {info['x_min'][j]}..{info['x_max'][j]}: {_AGAIN}"
            )
