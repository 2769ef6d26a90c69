"""Checkpoints: everything needed to continue a run exactly, written atomically, no pickle.

A checkpoint is a folder `RUN/checkpoints/step-<global step>/` holding
    model.safetensors   current weights
    best.safetensors    weights of the best epoch so far (early stopping restores them)
    optim.safetensors   every optimizer tensor (Adam / SparseAdam moments and steps), torch RNG
    state.json          epoch, step in epoch, early-stopping state, history, optimizer hyper-parameters

Atomicity: the folder is written under a temporary name, every file is fsync'ed, then the
folder is renamed into place (and the parent fsync'ed). A crash at any moment leaves
either the complete new checkpoint or none of it; older checkpoints are deleted only
after the new one is in place, and only the last `keep` are kept. The data position needs
no state of its own: batch order is a pure function of (seed, epoch) (see iterate_batches).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from ..errors import UserError
from .distributed import DistContext, set_rng_states

CHECKPOINT_DIR = "checkpoints"
STATE_FILE = "state.json"
FILES = ("model.safetensors", "best.safetensors", "optim.safetensors", STATE_FILE)


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
        opt.load_state_dict({"state": state, "param_groups": m["param_groups"]})


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
) -> Path:
    """Write checkpoint `step-<state['global_step']>` atomically; prune to the last `keep`.
    `rng`: every rank's RNG states (`distributed.rng_states`); default this process's CPU RNG."""
    root = Path(run_dir) / CHECKPOINT_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{state['global_step']:09d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    optim_tensors, optim_meta = _flatten_optimizers(optimizers)
    optim_tensors.update(rng if rng is not None else {"rng.torch.rank0": torch.get_rng_state()})
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        _write_file(tmp / "model.safetensors", save(_state_tensors(model.state_dict())))
        _write_file(tmp / "best.safetensors", save(_state_tensors(best_state)))
        _write_file(tmp / "optim.safetensors", save(optim_tensors))
        _write_file(tmp / STATE_FILE, json.dumps({**state, "optimizers": optim_meta}).encode())
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
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders of interrupted writes are ignored)."""
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and all((p / f).is_file() for f in FILES)]
    return sorted(done, key=lambda p: p.name)


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


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
    except (OSError, ValueError, SafetensorError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: unreadable checkpoint ({exc})") from None
    set_rng_states({k: optim.pop(k) for k in list(optim) if k.startswith("rng.")}, ctx or DistContext())
    _unflatten_optimizers(optimizers, optim, state.pop("optimizers"))
    return state, best
