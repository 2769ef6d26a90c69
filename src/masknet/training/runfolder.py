"""The run folder's rules: which folder a new run may use, and which checkpoint a resume may continue.

- A new run goes into a folder that does not exist or is empty. A folder holding an earlier run is
  replaced only when asked (`--overwrite`): the files a run writes (RUN_FILES) are deleted first.
  A folder holding anything else is never touched, with or without `--overwrite`.
- Every checkpoint records the run's config and its fingerprint: SHA-256 of the canonical config
  without `output` and the RESUMABLE keys. A resume is refused, naming the keys, when the run's
  config.yaml no longer has the checkpoint's fingerprint (edited, or rewritten by another run).
- A resume may change the RESUMABLE keys (`masknet train --resume RUN --set train.lr=1e-4`); each such
  change is an event stored in the checkpoints that follow, written to log.jsonl between the epochs and
  as comments at the end of config.yaml, so the run's record says what it trained with.
docs/runs.md states these rules for users.
"""

from __future__ import annotations

import json
import shlex
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import yaml

from ..config import RunConfig
from ..errors import UserError
from ..integrity import sha256_bytes, temp_target, write_atomic, writer_gone
from .checkpoint import CHECKPOINT_DIR, STEP_NAME, TEMP_NAME, CheckpointError, Resumable, latest_checkpoint

CONFIG_FILE = "config.yaml"
# Everything a run writes at the top of its folder: `overwrite` deletes these and nothing else.
RUN_FILES = (
    CONFIG_FILE, "log.jsonl", "model.json", "model.safetensors", "dataset.json", "metrics.json",
    "encoder.json", "manifest.json", CHECKPOINT_DIR,
)
# Keys a resume may change: how long and how fast the run goes on, not what it trains.
RESUMABLE = (
    "train.lr", "train.epochs", "train.patience", "train.on_nan", "train.threads", "train.progress",
    "train.checkpoint_every_steps", "train.keep_checkpoints",
)
UNRECORDED = ("train.progress",)  # the progress bar changes nothing worth recording
EXTENDING = ("train.epochs", "train.patience")  # cannot restart a run that has finished training


# ---------------------------------------------------------------------------
# A new run: claim the folder


def _foreign_entries(out: Path) -> Iterator[str]:
    """Entries of `out` that no run writes (links are never followed into)."""
    for p in sorted(out.iterdir()):
        if p.is_symlink():
            yield p.name
        elif p.name == CHECKPOINT_DIR and p.is_dir():
            for c in sorted(p.iterdir()):
                if c.is_symlink() or not c.is_dir() or not (STEP_NAME.match(c.name) or TEMP_NAME.match(c.name)):
                    yield f"{CHECKPOINT_DIR}/{c.name}"
        elif not p.is_file() or (p.name not in RUN_FILES and temp_target(p.name) not in RUN_FILES):
            yield p.name


def is_run_folder(path: Path) -> bool:
    """A folder a run wrote: its config.yaml and at least one other file a run writes."""
    path = Path(path)
    return (path / CONFIG_FILE).is_file() and any((path / name).exists() for name in RUN_FILES if name != CONFIG_FILE)


def check_new_run_folder(out: Path, overwrite: bool) -> list[Path]:
    """What a new run in `out` must delete first (an earlier run, with `overwrite`); refuses
    (UserError) a folder that holds another run without `overwrite`, or anything else. Reads only."""
    if not out.exists():
        return []
    if not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder; choose another --output")
    entries = sorted(out.iterdir())
    if not entries:
        return []
    foreign = next(_foreign_entries(out), None)
    if foreign is not None:
        raise UserError(
            f"{out}: not empty and not a run folder ({foreign} is nothing masknet train writes); "
            "choose another --output (--overwrite only replaces an earlier run)"
        )
    if not overwrite:
        unfinished = latest_checkpoint(out) and not (out / "metrics.json").exists()
        resume = f", or continue it with `masknet train --resume {_q(out)}`" if unfinished else ""
        raise UserError(f"{out}: already holds a run; pass --overwrite to replace it (its checkpoints, metrics and weights are deleted first){resume}")
    return entries


def clear_earlier_run(out: Path, entries: list[Path], log: Callable[[str], None] = print) -> None:
    """Delete what check_new_run_folder found (--overwrite)."""
    for p in entries:
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


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def fingerprint(record: dict[str, Any]) -> str:
    """SHA-256 of the canonical config without the keys a resume may change."""
    kept = {k: v for k, v in _flat(record).items() if k not in RESUMABLE}
    return sha256_bytes(json.dumps(kept, sort_keys=True, separators=(",", ":")).encode())


def checkpoint_meta(cfg: RunConfig, resumes: list[dict[str, Any]]) -> dict[str, Any]:
    record = config_record(cfg)
    return {"config": record, "config_sha256": fingerprint(record), "resumes": resumes}


def check_resume(cfg: RunConfig, found: Resumable, out: Path, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Refuse a checkpoint of another config; return the run's resume events, with this resume's
    appended when it changes a RESUMABLE key."""
    saved = found.meta.get("config")
    if not isinstance(saved, dict):
        log(f"warning: {found.path} was written before checkpoints recorded their config: resuming it unchecked")
        return []
    now, then = _flat(config_record(cfg)), _flat(saved)
    if found.meta.get("config_sha256") != fingerprint(config_record(cfg)):
        # keys only one side has come from another masknet version (added with their default)
        differ = sorted(k for k in now.keys() & then.keys() if k not in RESUMABLE and now[k] != then[k])
        if differ:
            shown = "; ".join(f"{k}: {then[k]!r} in the checkpoint, {now[k]!r} in {out / CONFIG_FILE}" for k in differ[:3])
            more = f" (and {len(differ) - 3} more)" if len(differ) > 3 else ""
            raise CheckpointError(
                f"{found.path} belongs to another config ({shown}{more}); refusing to resume it. Restore the "
                f"config, or start afresh: masknet train --config {_q(out / CONFIG_FILE)} --output {_q(out)} --overwrite"
            )
    events = [e for e in found.meta.get("resumes", []) if isinstance(e, dict)]
    changed = {
        k: {"from": then[k], "to": now[k]}
        for k in RESUMABLE
        if k not in UNRECORDED and k in then and k in now and then[k] != now[k]
    }
    if not changed:
        return events
    if found.state.get("done") and any(k in changed for k in EXTENDING):
        raise UserError(
            f"{out}: the run has finished training (its last checkpoint {found.path.name} is final); "
            f"{' and '.join(k for k in EXTENDING if k in changed)} cannot extend it: start a new run"
        )
    event = {
        "event": "resume", "checkpoint": found.path.name, "after_epoch": len(found.state["history"]),
        "global_step": found.state.get("global_step"), "changed": changed,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    return events + [event]


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
    """The epoch records with each resume event placed after the epochs that preceded it."""
    out, pending = [], sorted(resumes, key=lambda e: e["after_epoch"])
    for i, record in enumerate(history):
        while pending and pending[0]["after_epoch"] <= i:
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
