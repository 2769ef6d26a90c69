"""Checkpoints: everything needed to continue a run exactly, written atomically, no pickle.

A checkpoint is a folder `RUN/checkpoints/step-<global step>/` holding
    model.safetensors   current weights
    best.safetensors    weights of the best epoch so far (early stopping restores them)
    optim.safetensors   every optimizer tensor (Adam / SparseAdam moments and steps), torch RNG
    state.json          epoch, step in epoch, early-stopping state, history, optimizer hyper-parameters
    manifest.json       SHA-256 and size of each file above, the write sequence number `seq`, and
                        what the caller passes as `meta` (the run's config and its fingerprint)

Atomicity: the folder is written under a temporary name (`.tmp-step-<step>-<pid>`), every file
is fsync'ed, the manifest last, then the folder is renamed into place (and the parent fsync'ed).
A crash at any moment leaves either the complete new checkpoint or none of it (plus a temporary
folder that `remove_stale_temp` deletes when the run resumes). Older checkpoints are deleted
only after the new one is in place, and only the last `keep` in write order are kept: `seq`
orders checkpoints, not the step number, so a run's newest checkpoint is never pruned in favour of
an older one with a higher step. A pruned checkpoint is first renamed to a temporary name, then
deleted, so a kill while pruning never leaves a partial `step-*` folder (`remove_stale_temp` also
deletes the incomplete ones older versions left). `find_resumable` verifies checkpoints newest first
against their manifests and falls back past a corrupt one with a warning; one whose manifest
cannot be read (so its `seq` is unknown) is tried first when its step number is at least the
newest readable one's. The data position needs no state of its own: batch order is a pure
function of (seed, epoch) (see iterate_batches).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from ..errors import UserError
from ..runs import CHECKPOINTS
from ..integrity import entry_of, file_problem, writer_gone
from .distributed import DistContext, set_rng_states

CHECKPOINT_DIR = CHECKPOINTS  # RUN/checkpoints/ (masknet.runs names the run's files)
STATE_FILE = "state.json"
MANIFEST = "manifest.json"
FILES = ("model.safetensors", "best.safetensors", "optim.safetensors", STATE_FILE)
CHECKPOINT_FORMAT = "masknet-checkpoint"
CHECKPOINT_VERSION = 1
STEP_NAME = re.compile(r"^step-\d+$")
TEMP_NAME = re.compile(r"^\.tmp-step-\d+-(\d+)$")  # save_checkpoint's temporary folders


class CheckpointError(UserError):
    """A checkpoint could not be written or read (disk full, corrupted files)."""


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _flatten_optimizers(optimizers: list[torch.optim.Optimizer]) -> tuple[dict[str, torch.Tensor], list[dict]]:
    tensors: dict[str, torch.Tensor] = {}
    meta: list[dict] = []
    for i, opt in enumerate(optimizers):
        sd = opt.state_dict()
        scalars: dict[str, dict[str, Any]] = {}
        for pid, st in sd["state"].items():
            for name, value in st.items():
                if torch.is_tensor(value):
                    tensors[f"opt{i}.{pid}.{name}"] = value.detach().cpu().contiguous()
                else:
                    scalars.setdefault(str(pid), {})[name] = value
        meta.append({"param_groups": sd["param_groups"], "scalars": scalars, "state_ids": [str(k) for k in sd["state"]]})
    return tensors, meta


def _unflatten_optimizers(optimizers: list[torch.optim.Optimizer], tensors: dict[str, torch.Tensor], meta: list[dict]) -> None:
    if len(meta) != len(optimizers):
        raise CheckpointError(f"checkpoint has {len(meta)} optimizers, this run has {len(optimizers)}")
    for i, (opt, m) in enumerate(zip(optimizers, meta)):
        state: dict[int, dict[str, Any]] = {}
        for pid in m["state_ids"]:
            st = dict(m["scalars"].get(pid, {}))
            prefix = f"opt{i}.{pid}."
            st.update({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
            state[int(pid)] = st
        lrs = [group["lr"] for group in opt.param_groups]
        opt.load_state_dict({"state": state, "param_groups": m["param_groups"]})
        # the run's config sets the learning rate: `--resume --set train.lr=...` may lower it
        # (without one it equals the saved value, so a plain resume stays exact)
        for group, lr in zip(opt.param_groups, lrs):
            group["lr"] = lr


def _state_tensors(module_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous().clone() for k, v in module_state.items()}


def save_checkpoint(
    run_dir: Path,
    model: torch.nn.Module,
    optimizers: list[torch.optim.Optimizer],
    best_state: dict[str, torch.Tensor],
    state: dict[str, Any],
    keep: int,
    rng: Optional[dict[str, torch.Tensor]] = None,
    meta: Optional[dict[str, Any]] = None,
) -> Path:
    """Write checkpoint `step-<state['global_step']>` atomically; prune to the last `keep`.
    `rng`: every rank's RNG states (`distributed.rng_states`); default this process's CPU RNG.
    `meta`: JSON-able facts about the run stored in the manifest (train_run: its config)."""
    root = Path(run_dir) / CHECKPOINT_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{state['global_step']:09d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    optim_tensors, optim_meta = _flatten_optimizers(optimizers)
    optim_tensors.update(rng if rng is not None else {"rng.torch.rank0": torch.get_rng_state()})
    # serialised one at a time (a large model's files are never all in memory at once)
    contents: dict[str, Callable[[], bytes]] = {
        "model.safetensors": lambda: save(_state_tensors(model.state_dict())),
        "best.safetensors": lambda: save(_state_tensors(best_state)),
        "optim.safetensors": lambda: save(optim_tensors),
        STATE_FILE: lambda: json.dumps({**state, "optimizers": optim_meta}).encode(),
    }
    manifest = {
        "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "seq": _next_seq(run_dir),
        "global_step": state["global_step"], **(meta or {}), "files": {},
    }
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        for name, serialise in contents.items():
            data = serialise()
            manifest["files"][name] = entry_of(data)  # hashed from memory: no second read
            _write_file(tmp / name, data)
            del data
        _write_file(tmp / MANIFEST, json.dumps(manifest, indent=1).encode())  # last: the folder is complete
        _fsync_dir(tmp)
        if final.exists():  # same step written twice (e.g. an epoch end that is also a step mark)
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(root)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_checkpoint(run_dir)
        kept = f"; the previous checkpoint {previous} is intact" if previous else ""
        raise CheckpointError(f"could not write checkpoint {final}: {exc.strerror or exc}{kept}") from None
    for old in list_checkpoints(run_dir)[:-keep]:
        _delete(old)
    return final


def _delete(checkpoint: Path) -> None:
    """Delete a checkpoint folder: renamed first (atomic), so that a kill leaves a temporary folder
    that `remove_stale_temp` deletes, never a partial `step-*` one."""
    doomed = checkpoint.with_name(f".tmp-{checkpoint.name}-{os.getpid()}")
    try:
        os.rename(checkpoint, doomed)
    except OSError:
        doomed = checkpoint
    shutil.rmtree(doomed, ignore_errors=True)


def _read_manifest(path: Path) -> Optional[dict[str, Any]]:
    """The checkpoint's manifest; None if it has none (written before checkpoints had manifests).
    Raises CheckpointError if it is unreadable or not shaped like one."""
    p = path / MANIFEST
    if not p.exists():
        return None
    try:
        manifest = json.loads(p.read_bytes())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{p}: unreadable ({_first_line(exc)})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{p}: not a masknet checkpoint manifest")
    if manifest.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{p}: checkpoint format version {manifest.get('version')!r}; this masknet reads {CHECKPOINT_VERSION}")
    _check_manifest(p, manifest)
    return manifest


def _check_manifest(p: Path, m: dict[str, Any]) -> None:
    """Types of the keys a resume reads (a manifest that parses may still be garbled)."""

    def bad(key: str, want: str) -> CheckpointError:
        return CheckpointError(f"{p}: {key}: expected {want}, got {json.dumps(_get(m, key))[:60]}")

    if not isinstance(m.get("seq"), int) or isinstance(m["seq"], bool):
        raise bad("seq", "an integer")
    files = m.get("files")
    if not isinstance(files, dict):
        raise bad("files", "an object")
    for name, entry in files.items():
        if not (isinstance(entry, dict) and isinstance(entry.get("sha256"), str) and isinstance(entry.get("bytes"), int)):
            raise bad(f"files.{name}", 'an object with "sha256" and "bytes"')
    for key in ("config", "data"):
        if key in m and not isinstance(m[key], dict):
            raise bad(key, "an object")
    resumes = m.get("resumes", [])
    if not isinstance(resumes, list) or not all(
        isinstance(e, dict) and isinstance(e.get("changed"), dict) and isinstance(e.get("after_epoch"), int) for e in resumes
    ):
        raise bad("resumes", 'a list of resume events ({"changed": {...}, "after_epoch": N, ...})')


def _get(m: dict[str, Any], key: str) -> Any:
    """m["a"]["b.c"] for key "a.b.c" (file names hold dots)."""
    head, _, rest = key.partition(".")
    value = m.get(head)
    return value.get(rest) if rest and isinstance(value, dict) else value


def _first_line(exc: BaseException, limit: int = 300) -> str:
    """The error's message on one line (torch's load errors span several), cut at `limit` characters."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _seq(path: Path) -> Optional[int]:
    """Write order: the manifest's sequence number; -1 (oldest) without a manifest (an older
    masknet's checkpoint); None when the manifest cannot be read."""
    try:
        manifest = _read_manifest(path)
    except CheckpointError:
        return None
    return -1 if manifest is None else manifest["seq"]


def _step(path: Path) -> int:
    return int(path.name.split("-", 1)[1])


def _next_seq(run_dir: Path) -> int:
    return max((s for s in map(_seq, list_checkpoints(run_dir)) if s is not None), default=0) + 1


def _complete(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and STEP_NAME.match(path.name) is not None and all((path / f).is_file() for f in FILES)


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first in write order (temporary folders of interrupted writes
    are ignored). Checkpoints whose manifest cannot be read come first (they are pruned first and
    never reported as the latest), then those without one, by step."""
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    seqs = {p: _seq(p) for p in root.iterdir() if _complete(p)}
    return sorted(seqs, key=lambda p: (seqs[p] is not None, seqs[p] or 0, _step(p)))


def resume_candidates(run_dir: Path) -> list[Path]:
    """Checkpoints newest first, as a resume tries them: a checkpoint with an unreadable manifest
    (its write order unknown) first when its step is at least the newest readable one's (the
    newest, corrupted: it gets its warning), then the readable ones by write order."""
    found = list_checkpoints(run_dir)
    readable = [p for p in found if _seq(p) is not None]
    top = _step(readable[-1]) if readable else -1
    garbled = sorted((p for p in found if p not in readable and _step(p) >= top), key=_step, reverse=True)
    return garbled + readable[::-1]


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def remove_stale_temp(run_dir: Path) -> list[Path]:
    """Delete the temporary folders of checkpoint writes whose process is gone (a killed run
    leaves one, as large as a checkpoint), and incomplete `step-*` folders (an older masknet
    killed while pruning left them). Only names `save_checkpoint` uses are touched; complete
    checkpoints never are. Call it with the run folder locked."""
    root = Path(run_dir) / CHECKPOINT_DIR
    removed = []
    for p in sorted(root.iterdir()) if root.is_dir() else []:
        m = TEMP_NAME.match(p.name)
        stale = m and p.is_dir() and writer_gone(int(m.group(1)))
        partial = STEP_NAME.match(p.name) and p.is_dir() and not p.is_symlink() and not _complete(p)
        if stale or partial:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


@dataclass
class Resumable:
    """A verified checkpoint to resume from."""

    path: Path
    state: dict[str, Any]  # state.json: progress, early-stopping state, history
    manifest: Optional[dict[str, Any]]  # None: a checkpoint written before checkpoints had manifests

    @property
    def meta(self) -> dict[str, Any]:
        return self.manifest or {}

    @property
    def history(self) -> list[dict[str, Any]]:
        """The evaluation records up to this checkpoint (what log.jsonl is rewritten from)."""
        return list(self.state["history"])


def verify_checkpoint(path: Path) -> Resumable:
    """Check `path` against its manifest (every file's size and SHA-256) and read its state.
    Raises CheckpointError naming the first bad file."""
    manifest = _read_manifest(path)
    if manifest is not None:
        files = manifest.get("files")
        if not isinstance(files, dict) or set(files) != set(FILES):
            raise CheckpointError(f"{path / MANIFEST}: its file list is not a checkpoint's")
        for name in FILES:
            problem = file_problem(path / name, files[name])
            if problem:
                raise CheckpointError(f"{path / name}: {problem}")
    try:
        state = json.loads((path / STATE_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path / STATE_FILE}: unreadable ({exc})") from None
    if not isinstance(state, dict) or not isinstance(state.get("history"), list) or "optimizers" not in state:
        raise CheckpointError(f"{path / STATE_FILE}: not a checkpoint's state")
    return Resumable(path, state, manifest)


def find_resumable(run_dir: Path, warn: Callable[[str], None] = print) -> Optional[Resumable]:
    """The newest intact checkpoint, verified; past a corrupt or unreadable one it falls back to
    the previous one with a one-line warning. None when the run has no checkpoint at all."""
    found = resume_candidates(run_dir)
    problems = []
    for path in found:
        try:
            return verify_checkpoint(path)
        except CheckpointError as exc:
            problems.append(str(exc))
            if path != found[-1]:
                warn(f"warning: {exc}; falling back to the previous checkpoint")
    if problems:
        raise CheckpointError(f"{run_dir}: no intact checkpoint to resume from (the newest: {problems[0]})")
    return None


def check_loadable(path: Path, model: torch.nn.Module) -> None:
    """Deserialise every file of checkpoint `path` and load its weights into `model`, as `fit` will:
    a resume calls this before it changes the run's record (config.yaml, log.jsonl), so a
    checkpoint that cannot continue this model leaves the record as it was."""
    try:
        json.loads((path / STATE_FILE).read_bytes())["optimizers"]
        load((path / "optim.safetensors").read_bytes())
        model.load_state_dict(load((path / "best.safetensors").read_bytes()))
        model.load_state_dict(load((path / "model.safetensors").read_bytes()))
    except (OSError, ValueError, SafetensorError, RuntimeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: unreadable checkpoint ({_first_line(exc)})") from None


def load_checkpoint(
    path: Path, model: torch.nn.Module, optimizers: list[torch.optim.Optimizer], ctx: Optional[DistContext] = None
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Restore model, optimizers and this rank's RNG states in place; return (progress state,
    best-epoch weights, on CPU)."""
    try:
        state = json.loads((path / STATE_FILE).read_text())
        model.load_state_dict(load((path / "model.safetensors").read_bytes()))
        best = load((path / "best.safetensors").read_bytes())
        optim = load((path / "optim.safetensors").read_bytes())
        optim_meta = state.pop("optimizers")
    except (OSError, ValueError, SafetensorError, RuntimeError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{path}: unreadable checkpoint ({_first_line(exc)})") from None
    set_rng_states({k: optim.pop(k) for k in list(optim) if k.startswith("rng.")}, ctx or DistContext())
    _unflatten_optimizers(optimizers, optim, optim_meta)
    return state, best
