"""The run folder's rules: which folder a new run may use, and which checkpoint a resume may continue.

- One process at a time: a train or resume holds an exclusive flock on RUN/.masknet-lock (holding
  its pid) from before it looks at the folder until it ends; a second one is refused, naming that
  pid. The kernel drops the lock when its process dies, however it dies.
- A new run goes into a folder that does not exist or is empty, and not inside another run's folder.
  A folder holding an earlier run is replaced only when asked (`--overwrite`): the files a run
  writes (RUN_FILES) are deleted first. A folder holding anything else is never touched.
- Every checkpoint records the run's config and its fingerprint: SHA-256 of the canonical config
  without `output`, `data.path` and the RESUMABLE keys. A resume is refused, naming the keys, when
  the run's config.yaml no longer has the checkpoint's fingerprint (edited, or rewritten by another run).
- Every checkpoint records the run's data (`data_identity`): the prepared folder's resolved path, as
  given too, and its fingerprint (its fields and every array file's SHA-256, from meta.json), or the
  generator version, rows and seed of the built-in synthetic data. A resume on other data is refused,
  naming what differs; the same content at another path resumes.
- A resume may change the RESUMABLE keys (`masknet train --resume RUN --set train.lr=1e-4`); each such
  change is an event stored in the checkpoints that follow, written to log.jsonl between the epochs and
  as comments at the end of config.yaml, so the run's record says what it trained with. The record is
  changed only once the checkpoint has loaded (run.py).
docs/runs.md states these rules for users.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shlex
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import yaml

from ..config import RunConfig, dotted_keys
from ..data import dataset as prepared
from ..data.integrity import fingerprint as record_fingerprint
from .. import runs
from ..errors import UserError
from ..integrity import sha256_bytes, temp_target, write_atomic, writer_gone
from .checkpoint import CHECKPOINT_DIR, STEP_NAME, TEMP_NAME, CheckpointError, Resumable, latest_checkpoint
from .trainer import TrainState

# The run's files are masknet.runs'; these names are kept for this module's callers.
CONFIG_FILE = runs.CONFIG
LOCK_FILE = runs.LOCK  # a dot file: never part of the bundle's manifest
TENSORBOARD_DIR = runs.TENSORBOARD  # train.tensorboard's event files (training/tracking.py)
RUN_FILES = runs.RUN_FILES  # everything a run writes at the top of its folder: `overwrite` deletes these and nothing else
# Keys a resume may change: how long and how fast the run goes on, not what it trains.
RESUMABLE = (
    "train.lr", "train.epochs", "train.min_steps", "train.patience", "train.on_nan", "train.threads", "train.progress",
    "train.checkpoint_every_steps", "train.keep_checkpoints", "train.checkpoint_overhead",
)
UNRECORDED = ("train.progress",)  # the progress bar changes nothing worth recording
# what a finished run was trained with: changing one on a run with nothing left to train would
# only make its record false (config.yaml would say what the weights were not trained with)
TRAINED_WITH = ("train.lr", "train.epochs", "train.min_steps", "train.patience", "train.on_nan")
IDENTIFIED_APART = ("data.path",)  # checked by the data's own identity (a dataset may move)


# ---------------------------------------------------------------------------
# One process per run folder


@dataclass
class RunLock:
    """The flock on RUN/.masknet-lock; `release` deletes the file, then drops the lock."""

    path: Path
    fd: int

    def release(self) -> None:
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        os.close(self.fd)


def lock_run_folder(out: Path) -> RunLock:
    """Take the run folder's lock (the folder must exist), or refuse in one line naming its holder.
    Where the filesystem has no flock (some network filesystems) the run goes on without it."""
    path = out / LOCK_FILE
    while True:
        with folder_errors(out):
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                break  # no locks here
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise UserError(
                f"{out}: in use by another masknet train (pid {holder}); wait for it to end (or stop it), then run again"
            ) from None
        try:  # a run that just ended may have deleted the file we locked: lock the one at `path`
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    with folder_errors(out):
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return RunLock(path, fd)


@contextlib.contextmanager
def folder_errors(out: Path) -> Iterator[None]:
    """An OSError while creating or writing the run folder is one line naming the path."""
    try:
        yield
    except OSError as exc:
        where = exc.filename or out
        raise UserError(f"{where}: cannot write the run folder {out}: {exc.strerror or exc}") from None


# ---------------------------------------------------------------------------
# A new run: claim the folder


def _foreign_entries(out: Path) -> Iterator[str]:
    """Entries of `out` that no run writes (links are never followed into)."""
    for p in sorted(out.iterdir()):
        if p.name == LOCK_FILE and p.is_file() and not p.is_symlink():
            continue  # this run's own lock
        if p.is_symlink():
            yield p.name
        elif p.name == CHECKPOINT_DIR and p.is_dir():
            for c in sorted(p.iterdir()):
                if c.is_symlink() or not c.is_dir() or not (STEP_NAME.match(c.name) or TEMP_NAME.match(c.name)):
                    yield f"{CHECKPOINT_DIR}/{c.name}"
        elif p.name == TENSORBOARD_DIR and p.is_dir():
            for c in sorted(p.iterdir()):  # only SummaryWriter's event files
                if c.is_symlink() or not c.is_file() or not c.name.startswith("events.out.tfevents."):
                    yield f"{TENSORBOARD_DIR}/{c.name}"
        elif not p.is_file() or (p.name not in RUN_FILES and temp_target(p.name) not in RUN_FILES):
            yield p.name


def is_run_folder(path: Path) -> bool:
    """A folder a run wrote: its config.yaml and at least one other file a run writes."""
    path = Path(path)
    return (path / CONFIG_FILE).is_file() and any((path / name).exists() for name in RUN_FILES if name != CONFIG_FILE)


def _surely_a_run(path: Path) -> bool:
    """A run folder by more than two names (a project folder may hold a config.yaml and a
    checkpoints/ of its own): config.yaml, log.jsonl, and checkpoints/ or manifest.json."""
    run = runs.RunFolder(path)
    return run.config.is_file() and run.log.is_file() and (run.checkpoints.is_dir() or run.manifest.is_file())


def check_new_run_folder(out: Path, overwrite: bool) -> list[Path]:
    """What a new run in `out` must delete first (an earlier run, with `overwrite`); refuses
    (UserError) a folder that holds another run without `overwrite`, or anything else, or that lies
    inside another run's folder. Reads only."""
    inside = next((p for p in Path(os.path.abspath(out)).parents if _surely_a_run(p)), None)
    if inside is not None:
        raise UserError(f"{out}: is inside the run folder {inside}; choose an --output outside it")
    if not out.exists():
        return []
    if not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder; choose another --output")
    try:
        entries = sorted(p for p in out.iterdir() if p.name != LOCK_FILE)
    except OSError as exc:
        raise UserError(f"{out}: cannot read the folder: {exc.strerror or exc}") from None
    if not entries:
        return []
    foreign = next(_foreign_entries(out), None)
    if foreign is not None:
        raise UserError(
            f"{out}: not empty and not a run folder ({foreign} is nothing masknet train writes); "
            "choose another --output (--overwrite only replaces an earlier run)"
        )
    if not overwrite:
        unfinished = latest_checkpoint(out) and not runs.RunFolder(out).metrics.exists()
        resume = f", or continue it with `masknet train --resume {_q(out)}`" if unfinished else ""
        raise UserError(f"{out}: already holds a run; pass --overwrite to replace it (its checkpoints, metrics and weights are deleted first){resume}")
    return entries


def clear_earlier_run(out: Path, entries: list[Path], log: Callable[[str], None] = print) -> None:
    """Delete what check_new_run_folder found (--overwrite)."""
    for p in entries:
        with folder_errors(out):
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    if entries:
        log(f"--overwrite: deleted the earlier run in {out} ({', '.join(p.name for p in entries)})")


def remove_stale_bundle_temp(out: Path) -> list[Path]:
    """Temporary files of bundle writes whose process was killed."""
    removed = []
    for p in sorted(out.iterdir()):
        if p.is_file() and temp_target(p.name) in RUN_FILES and writer_gone(int(p.name.rsplit(".tmp-", 1)[1])):
            p.unlink()
            removed.append(p)
    return removed


# ---------------------------------------------------------------------------
# The config a checkpoint belongs to


def config_record(cfg: RunConfig) -> dict[str, Any]:
    """The config as a checkpoint stores it: resolved, JSON-typed, without `output` (a run may move)."""
    d = json.loads(json.dumps(cfg.to_dict()))
    d.pop("output", None)
    return d


def fingerprint(record: dict[str, Any]) -> str:
    """SHA-256 of the canonical config without the keys a resume may change, and the data's path."""
    kept = {k: v for k, v in dotted_keys(record).items() if k not in RESUMABLE + IDENTIFIED_APART}
    return sha256_bytes(json.dumps(kept, sort_keys=True, separators=(",", ":")).encode())


def data_identity(cfg: RunConfig, data: prepared.CTRDataset, given: Optional[str]) -> dict[str, Any]:
    """What the run trains on (stored in every checkpoint). `cfg.data.path` is already resolved;
    `given` is the path as the user wrote it."""
    if cfg.data.path and isinstance(data.meta.get("fields"), list) and data.meta.get("format") == prepared.FORMAT_NAME:
        return {"path": cfg.data.path, "given": given, **prepared.identity(cfg.data.path, data.meta)}
    source = data.meta.get("source") or {}
    if source.get("name") == "synthetic" and "generator" in source:
        synthetic = {**{k: source.get(k) for k in ("generator", "rows", "seed")}, "fields": data.field_names}
        return {"synthetic": synthetic, "fingerprint": record_fingerprint(synthetic)}
    # an in-memory dataset handed to train_run: its arrays are what identifies it
    arrays = {f"{s}.{k}": sha256_bytes(np.ascontiguousarray(getattr(split, k))) for s, split in data.splits.items() for k in ("x", "y")}
    return {"in_memory": True, "fingerprint": record_fingerprint({"fields": data.cardinalities, "arrays": arrays})}


def checkpoint_meta(cfg: RunConfig, resumes: list[dict[str, Any]], data: dict[str, Any]) -> dict[str, Any]:
    record = config_record(cfg)
    return {"config": record, "config_sha256": fingerprint(record), "data": data, "resumes": resumes}


def check_resume(
    cfg: RunConfig, found: Resumable, out: Path, data: dict[str, Any], log: Callable[[str], None] = print
) -> list[dict[str, Any]]:
    """Refuse a checkpoint of another config or other data, and changes that cannot apply (see the
    module doc); return the run's resume events, with this resume's appended when it changes a
    RESUMABLE key."""
    saved = found.meta.get("config")
    if not isinstance(saved, dict):
        log(f"warning: {found.path} was written before checkpoints recorded their config: resuming it unchecked")
        return []
    now, then = dotted_keys(config_record(cfg)), dotted_keys(saved)
    if found.meta.get("config_sha256") != fingerprint(config_record(cfg)):
        # keys only one side has come from another masknet version (added with their default)
        differ = sorted(k for k in now.keys() & then.keys() if k not in RESUMABLE + IDENTIFIED_APART and now[k] != then[k])
        if differ:
            shown = "; ".join(f"{k}: {then[k]!r} in the checkpoint, {now[k]!r} in {out / CONFIG_FILE}" for k in differ[:3])
            more = f" (and {len(differ) - 3} more)" if len(differ) > 3 else ""
            raise CheckpointError(
                f"{found.path} belongs to another config ({shown}{more}); refusing to resume it. Restore the "
                f"config, or start afresh: masknet train --config {_q(out / CONFIG_FILE)} --output {_q(out)} --overwrite"
            )
    _check_same_data(found, out, data, log)
    events = [e for e in found.meta.get("resumes", []) if isinstance(e, dict)]
    changed = {
        k: {"from": then[k], "to": now[k]}
        for k in RESUMABLE
        if k not in UNRECORDED and k in then and k in now and then[k] != now[k]
    }
    completed = TrainState.from_dict(found.state).completed_epochs()  # not len(history): one record per evaluation
    if cfg.train.epochs < completed:
        raise UserError(
            f"{out}: train.epochs={cfg.train.epochs} is fewer than the {completed} epochs the run has already "
            f"trained ({found.path.name}); give {completed} or more"
        )
    if not changed:
        return events
    final = [k for k in TRAINED_WITH if k in changed]
    if found.state.get("done") and final:
        raise UserError(
            f"{out}: the run has finished training (its last checkpoint {found.path.name} is final); "
            f"{' and '.join(final)} cannot change it (nothing is left to train with {'it' if len(final) == 1 else 'them'}): "
            "start a new run"
        )
    event = {
        "event": "resume", "checkpoint": found.path.name, "after_epoch": completed,
        "after_evaluations": len(found.state.get("history", [])),  # where log.jsonl places it
        "global_step": found.state.get("global_step"), "changed": changed,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    return events + [event]


def _check_same_data(found: Resumable, out: Path, data: dict[str, Any], log: Callable[[str], None]) -> None:
    then = found.meta.get("data")
    if not isinstance(then, dict):
        log(f"warning: {found.path} was written before checkpoints recorded their data: its data is not checked")
        return
    if then.get("fingerprint") == data.get("fingerprint"):
        if then.get("path") != data.get("path"):
            log(f"note: the data moved ({then.get('path')} -> {data.get('path')}); same content, resuming")
        return
    what = _data_difference(then, data)
    raise CheckpointError(
        f"{found.path} was trained on other data ({what}); refusing to resume it. Point data.path in "
        f"{out / CONFIG_FILE} back to that data, or start afresh with --overwrite"
    )


def _data_difference(then: dict[str, Any], now: dict[str, Any]) -> str:
    def where(d: dict[str, Any]) -> str:
        if "synthetic" in d:
            s = d["synthetic"]
            return f"the built-in synthetic data ({s.get('generator')}, {s.get('rows')} rows, seed {s.get('seed')})"
        return "an in-memory dataset" if d.get("in_memory") else f"the prepared dataset {d.get('path')}"

    said = [f"then {where(then)}, now {where(now)}"]
    old, new = then.get("files"), now.get("files")
    if isinstance(old, dict) and isinstance(new, dict):
        changed = sorted(n for n in old.keys() | new.keys() if old.get(n) != new.get(n))
        said.append(f"files that differ: {', '.join(changed)}" if changed else "its fields differ")
    return "; ".join(said)


# ---------------------------------------------------------------------------
# The run's record: config.yaml and log.jsonl


def write_config(cfg: RunConfig, path: Path, resumes: list[dict[str, Any]]) -> None:
    """config.yaml (atomically: a resume reads it), with one comment line per resume event."""
    text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    if resumes:
        text += "# settings changed by `masknet train --resume RUN --set ...` (the values above are the latest):\n"
        for e in resumes:
            changes = ", ".join(f"{k} {c['from']!r} -> {c['to']!r}" for k, c in e["changed"].items())
            text += f"# {e['time']}: resumed from {CHECKPOINT_DIR}/{e['checkpoint']} (after epoch {e['after_epoch']}): {changes}\n"
    write_atomic(path, text.encode())


def log_records(history: list[dict[str, Any]], resumes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The evaluation records with each resume event placed after the evaluations that preceded it
    (events written before evaluations were on a step schedule count them as `after_epoch`)."""
    placed = lambda e: e.get("after_evaluations", e["after_epoch"])  # noqa: E731
    out, pending = [], sorted(resumes, key=placed)
    for i, record in enumerate(history):
        while pending and placed(pending[0]) <= i:
            out.append(pending.pop(0))
        out.append(record)
    return out + pending


def nan_advice(out: Path, cfg: RunConfig, world_size: int) -> str:
    """A command that continues (or, without a checkpoint, restarts) the run with a lower learning rate."""
    lower = f"--set train.lr={cfg.train.lr / 10:g}"
    nproc = f" --nproc {world_size}" if world_size > 1 else ""
    if latest_checkpoint(out):
        return (f"to continue from it with a lower learning rate run: masknet train --resume {_q(out)} {lower}{nproc} "
                "(or --set train.on_nan=skip-batch to skip such batches)")
    return (f"no checkpoint was written before it, so start the run again with a lower learning rate: masknet train "
            f"--config {_q(out / CONFIG_FILE)} --output {_q(out)} --overwrite {lower}{nproc} "
            "(or --set train.on_nan=skip-batch to skip such batches)")


def _q(path: Path) -> str:
    return shlex.quote(str(path))
