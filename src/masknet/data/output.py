"""Writing a prepared dataset folder without ever losing the one already there.

`prepare` builds into a temporary sibling of the output and moves it into place only once it is
complete. Names, all in the output's parent folder:

    <name>                         the output
    .prepare-tmp-<name>-<id>/      a folder being built; its BUILD_MARK file is locked while its run lives
    .prepare-old-<name>-<id>/      the dataset being replaced, for the instant of the swap

rename(2) replaces a missing or empty folder atomically, but not a full one, so replacing a
dataset takes three steps (under a lock on the parent folder, so that two runs never interleave):

    1. rename <name> -> .prepare-old-<name>-<id>
    2. rename .prepare-tmp-<name>-<id> -> <name>   (it carries BUILD_MARK, which holds <id>)
    3. delete .prepare-old-<name>-<id>, then <name>/BUILD_MARK

A run killed at any moment leaves one of four states, which `recover` (the first thing every
`prepare` does) turns back into "the old dataset" or "the new dataset", never neither:

    before 1         old dataset in place, a stale build folder   -> the build folder is deleted
    between 1 and 2  no <name>, .prepare-old-<name>-<id>          -> renamed back: the old dataset returns
    between 2 and 3  <name> with BUILD_MARK <id>, .prepare-old-*  -> the old copy is deleted (the new one is complete)
    during 3         <name> with a stale BUILD_MARK               -> the mark is deleted

A build folder is stale when no process holds the lock on its BUILD_MARK: flock locks are released
by the kernel when their process dies, however it dies. Only folders this module names and marks
are ever deleted (the mark holds the <id> the folder is named with), and an output is replaced only
if it holds nothing but the files its own meta.json says prepare wrote there (`dataset_files`):
exact names, regular files, never a pattern, so no file of the user's can look like one of ours.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

from ..errors import UserError
from .dataset import FORMAT_NAME, array_file_names

TMP_PREFIX = ".prepare-tmp-"
OLD_PREFIX = ".prepare-old-"
BUILD_MARK = ".masknet-build"
BUILD_ID = re.compile(r"^\d+-[0-9a-f]+$")  # <pid>-<random hex>: what a build folder's name ends with


@dataclass
class Build:
    """A folder being built, and the open, locked BUILD_MARK that says its run is alive."""

    path: Path
    build_id: str
    mark_fd: int
    installed: bool = False

    def discard(self) -> None:
        if not self.installed:
            shutil.rmtree(self.path, ignore_errors=True)
            os.close(self.mark_fd)


@contextlib.contextmanager
def build_folder(output: str | Path, overwrite: bool = False, log: Optional[Callable[[str], None]] = None) -> Iterator[Path]:
    """Yield an empty folder to write a dataset into; on a clean exit it becomes `output`.

    The output is checked first: a folder that holds anything but a prepared dataset is refused,
    and a prepared dataset is replaced only with `overwrite`. On any exception (a UserError, a full
    disk, Ctrl-C) the build folder is deleted and `output` is left as it was. What `recover` did
    about earlier, killed runs is told to `log`.
    """
    output = resolve_output(output)
    with _parent_lock(output.parent):
        for action in recover(output):
            if log is not None:
                log(action)
        check_output(output, overwrite)
        build = _new_build(output)
    try:
        yield build.path
        with _parent_lock(output.parent):
            check_output(output, overwrite)  # again: another run may have written there meanwhile
            _install(build, output)
    except BaseException:
        build.discard()
        raise


def resolve_output(output: str | Path) -> Path:
    """The output as an absolute path, symlinks resolved (the swap renames the real folder), with
    its parent folder created."""
    path = Path(os.path.realpath(output))
    if path.exists() and not path.is_dir():
        raise UserError(f"{output}: exists and is not a folder; choose another --output")
    if path.is_dir() and os.path.ismount(path):
        raise UserError(f"{output}: is a mount point, which prepare cannot replace atomically; prepare into a folder inside it")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{output}: cannot create its parent folder {path.parent}: {exc.strerror or exc}") from None
    return path


def check_output(output: Path, overwrite: bool) -> None:
    if not output.exists():
        return
    if not output.is_dir():
        raise UserError(f"{output}: exists and is not a folder; choose another --output")
    entries = sorted(os.listdir(output))
    if not entries:
        return
    ours = dataset_files(output)
    foreign = [e for e in entries if e not in ours or output.joinpath(e).is_symlink() or not output.joinpath(e).is_file()]
    if foreign:
        first = "meta.json" if ours == set() and "meta.json" in entries else foreign[0]
        raise UserError(
            f"{output}: exists, is not empty and is not a prepared dataset (it holds {first!r}, which prepare did not "
            "write there); choose another --output"
        )
    if not overwrite:
        raise UserError(
            f"{output}: already holds a prepared dataset; pass --overwrite to replace it "
            "(the old one is kept until the new one is complete)"
        )


def dataset_files(folder: Path) -> set[str]:
    """The names a prepare wrote in `folder`, as its meta.json tells: meta.json, encoder.json,
    the array files of its splits, and the swap's mark. Empty when there is no meta.json of ours."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return set()
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        return set()
    return {"meta.json", "encoder.json", BUILD_MARK, *array_file_names(bool(meta.get("has_prob")))}


# ---------------------------------------------------------------------------
# Names


def _stem(name: str) -> str:
    """The output's name as it appears in its sibling folders' names (hashed when very long, so that
    they stay under the 255-byte name limit)."""
    return name if len(name.encode()) <= 150 else "h" + hashlib.sha256(name.encode()).hexdigest()[:24]


def _old_path(output: Path, build_id: str) -> Path:
    return output.parent / f"{OLD_PREFIX}{_stem(output.name)}-{build_id}"


# ---------------------------------------------------------------------------
# Building and swapping


def _new_build(output: Path) -> Build:
    while True:
        build_id = f"{os.getpid()}-{secrets.token_hex(4)}"
        path = output.parent / f"{TMP_PREFIX}{_stem(output.name)}-{build_id}"
        try:
            os.mkdir(path)  # not mkdtemp: the dataset gets the user's usual permissions (umask), not 0700
            break
        except FileExistsError:
            continue
        except OSError as exc:
            raise UserError(f"{output}: cannot write there: {exc.strerror or exc}") from None
    try:
        fd = os.open(path / BUILD_MARK, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, build_id.encode())
    except OSError as exc:
        shutil.rmtree(path, ignore_errors=True)
        raise UserError(f"{output}: cannot write there: {exc.strerror or exc}") from None
    return Build(path, build_id, fd)


def _install(build: Build, output: Path) -> None:
    old: Optional[Path] = None
    if not output.exists() or not os.listdir(output):
        os.rename(build.path, output)  # atomic, and replaces an empty folder
    else:
        old = _old_path(output, build.build_id)
        os.rename(output, old)
        try:
            os.rename(build.path, output)
        except BaseException:
            os.rename(old, output)
            raise
    build.installed, build.path = True, output
    try:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        if old is None or not old.exists():  # else the mark stays, and the next run's `recover` retries
            with contextlib.suppress(FileNotFoundError):
                os.unlink(output / BUILD_MARK)
    finally:
        os.close(build.mark_fd)


# ---------------------------------------------------------------------------
# Recovering from killed runs


def recover(output: Path) -> list[str]:
    """Undo what a killed run left around `output` (see the module doc). Returns what was done,
    one phrase per action. Call it with the parent folder locked."""
    done = []
    parent = output.parent
    mark = output / BUILD_MARK
    if mark.is_file():  # killed between steps 2 and 3, or during 3
        fd = _try_lock(mark)
        if fd is not None:
            try:
                old = _old_path(output, mark.read_text().strip())
                if old.exists():
                    shutil.rmtree(old)
                    done.append(f"deleted {old.name}, the dataset a finished run had replaced")
                os.unlink(mark)
            finally:
                os.close(fd)
    olds = _siblings(parent, f"{OLD_PREFIX}{_stem(output.name)}-")
    if olds and not output.exists():  # killed between steps 1 and 2
        if len(olds) > 1:
            raise UserError(f"{output}: missing, and several earlier versions exist ({', '.join(o.name for o in olds)}); rename one to {output.name}")
        os.rename(olds[0], output)
        done.append(f"restored {output.name} from {olds[0].name} (a run was killed while replacing it)")
    for tmp in _siblings(parent, TMP_PREFIX):
        if tmp.is_dir() and _stale_build(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
            done.append(f"deleted {tmp.name}, left by a killed run")
    return done


def _siblings(parent: Path, prefix: str) -> list[Path]:
    return sorted(parent / n for n in os.listdir(parent) if n.startswith(prefix))  # not glob: names may hold [ or *


def _stale_build(folder: Path) -> bool:
    """A build folder of a run that is gone: its name ends with the build id its own mark holds and
    no process holds the mark's lock (or, killed between mkdir and the mark, it is empty)."""
    build_id = folder.name.rsplit("-", 2)[-2:]
    if len(build_id) != 2 or not BUILD_ID.match("-".join(build_id)):
        return False
    mark = folder / BUILD_MARK
    if not mark.is_file() or mark.is_symlink():
        return not any(folder.iterdir())
    try:
        if mark.read_text().strip() != "-".join(build_id):
            return False  # not the mark of this folder's build
    except (OSError, UnicodeDecodeError):
        return False
    fd = _try_lock(mark)
    if fd is None:
        return False  # its run is alive
    os.close(fd)
    return True


def _try_lock(path: Path) -> Optional[int]:
    """An fd holding the exclusive lock on `path`, or None when another process holds it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return fd
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return None
        raise


@contextlib.contextmanager
def _parent_lock(parent: Path) -> Iterator[None]:
    """Serialize the checks and swaps of runs writing in the same folder (they are short). Where a
    folder cannot be locked (some network filesystems) the run goes on without it."""
    try:
        fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass
        yield
    finally:
        os.close(fd)
