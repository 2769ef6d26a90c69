"""SHA-256 file hashes and atomic file writes: shared by checkpoints and model bundles.

The lowest layer (no torch, no masknet imports): training/checkpoint.py seals every
checkpoint with these hashes and serving/bundle.py seals and verifies the run folder with
the same ones, so both agree on what "intact" means.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Optional

BLOCK = 1 << 20  # hash files in 1 MiB blocks: bounded memory for multi-GB weights


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(BLOCK), b""):
            h.update(block)
    return h.hexdigest()


def entry_of(data: bytes) -> dict[str, Any]:
    """The manifest entry of a file whose content is `data`."""
    return {"sha256": sha256_bytes(data), "bytes": len(data)}


def file_problem(path: Path, entry: Any) -> Optional[str]:
    """Why `path` does not match its manifest entry (missing, truncated, modified), or None."""
    if not isinstance(entry, dict):
        return "has no valid manifest entry"
    if not path.is_file():
        return "listed in the manifest but missing"
    size = path.stat().st_size
    if size != entry.get("bytes"):
        what = "truncated" if isinstance(entry.get("bytes"), int) and size < entry["bytes"] else "modified"
        return f"{size} bytes, the manifest says {entry.get('bytes')} ({what})"
    if sha256_file(path) != entry.get("sha256"):
        return "SHA-256 does not match the manifest (the file was modified)"
    return None


def temp_name(path: Path) -> Path:
    """The temporary sibling `write_atomic` writes first (a dot file: never part of a manifest)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def temp_target(name: str) -> Optional[str]:
    """The file name a `write_atomic` temporary file was for (None: not such a temporary)."""
    if name.startswith(".") and ".tmp-" in name[1:]:
        target, pid = name[1:].rsplit(".tmp-", 1)
        if pid.isdigit():
            return target
    return None


def writer_gone(pid: int) -> bool:
    """Whether the process that named a temporary file after its id can no longer be writing it
    (no such process, or our own id: a killed run's, reused)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except PermissionError:
        return False  # exists, owned by someone else
    except (OSError, OverflowError):
        return True
    return False


def write_atomic(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` so that a crash or a full disk leaves either the old file (or none)
    or the complete new one, never a part: temporary sibling, fsync, rename. Raises OSError."""
    path = Path(path)
    tmp = temp_name(path)
    try:
        _write_synced(tmp, data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
