"""Prepare's pass 1 on disk: each window's raw-value indices, labels, split codes and distinct tokens
(`Spill`, `.prepare-spill` in the folder being built), read back by pass 2 instead of the input.
Also `release_memory`, which keeps the peak memory flat as the input grows.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .encoder import to_numpy
from .multivalued import MultiSpill
from .rows import POOL, ParsedChunk
from .schema import DatasetSpec


def _load_malloc_trim() -> Optional[Callable[[int], int]]:
    try:
        import ctypes

        trim = ctypes.CDLL("libc.so.6").malloc_trim  # glibc only
        trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
        return trim
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _load_malloc_trim()


def release_memory() -> None:
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


WINDOW_ROWS = 1 << 18  # rows per spilled window: one token lookup per field per window in pass 2


@dataclass
class Window:
    ix: np.ndarray  # int32 [f, rows]: per field, index into that field's window tokens, -1 = missing
    tokens: list[pa.Array]  # per field: the distinct raw tokens of the window's chunks, concatenated
    y: np.ndarray  # uint8 [rows], or [rows, tasks] with several labels
    codes: np.ndarray  # uint8 [rows]: 0/1/2 = train/valid/test
    multi: list = field(default_factory=list)  # per multi-valued field: multivalued.MultiWindow


class Spill:
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

    def add(self, pc_: ParsedChunk, good: np.ndarray, codes: np.ndarray) -> Optional[Window]:
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

    def flush(self) -> Optional[Window]:
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

        tokens = list(POOL.map(one_field, range(self.nf)))  # Arrow and numpy release the GIL
        multi = self.multi.flush(self._rows) if self.multi is not None else []
        w = Window(ix, tokens, np.concatenate(self._ys), np.concatenate(self._codes_parts), multi)
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
