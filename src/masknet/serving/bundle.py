"""A trained run folder as a self-contained, verifiable model bundle.

    RUN/
      model.safetensors   weights (safetensors: no pickle, no code)
      model.json          model name, model config, field names, cardinalities
      encoder.json        the fitted encoder (prepared data only): raw rows -> model inputs
      config.yaml, dataset.json, metrics.json, log.jsonl
      manifest.json       bundle format, versions, SHA-256 and size of every file above

`write_manifest(run)` seals a folder (train_run does it at the end of training);
`verify_and_load(run)` checks every file against the manifest (missing, truncated, modified or
unlisted required file: a UserError naming it) and then loads JSON and safetensors only; nothing
is ever unpickled. Only the top-level files of the folder are part of the bundle (checkpoint
sub-folders are not). Paths in the manifest are relative, so a bundle copied to another
machine verifies and loads there.

    python -m masknet.serving.bundle RUN          seal a run folder (e.g. one trained before manifests)
    python -m masknet.serving.bundle --verify RUN check one
    python -m masknet.serving.bundle --reseal RUN seal one again after changing its files on purpose

Sealing refuses a folder that is already sealed but whose files no longer match its manifest (or
whose manifest is unreadable): sealing it again would bless corrupt weights. Every read checks the
manifest's and model.json's structure first (types, ranges), in one line naming the file and key.
"""

from __future__ import annotations

import hashlib
import json
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..errors import UserError
from ..integrity import sha256_file as _sha256
from ..integrity import write_atomic

MANIFEST = "manifest.json"
BUNDLE_FORMAT = "masknet-bundle"
BUNDLE_VERSION = 1
REQUIRED = ("model.json", "model.safetensors")


def _versions() -> dict[str, str]:
    import numpy
    import safetensors
    import torch

    from .. import __version__ as masknet_version

    return {
        "masknet": masknet_version,
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "safetensors": safetensors.__version__,
        "python": platform.python_version(),
    }


def _bundle_hash(files: dict[str, dict[str, Any]]) -> str:
    """One SHA-256 over the sorted (name, file hash) pairs: identifies the bundle's content."""
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(f"{name}\0{files[name]['sha256']}\n".encode())
    return h.hexdigest()


def write_manifest(run: str | Path, reseal: bool = False) -> dict[str, Any]:
    """Hash every top-level file of `run` (except the manifest) into RUN/manifest.json. A folder
    already sealed must still match its manifest, unless `reseal` (the user changed it on purpose)."""
    from ..training.run import read_model_spec  # lazy: training imports torch

    run = Path(run)
    for name in REQUIRED:
        if not (run / name).is_file():
            raise UserError(f"{run / name}: missing; is {run} a finished run folder?")
    spec = read_model_spec(run / "model.json")  # first: the most precise message for a garbled one
    path = run / MANIFEST
    if path.exists() or path.is_symlink():
        if not path.is_file() or path.is_symlink():
            raise UserError(f"{path}: exists and is not a file; remove it to seal {run}")
        if not reseal:
            try:
                verify_manifest(run)
            except UserError as exc:
                raise UserError(
                    f"{run}: already sealed, and no longer matches its manifest ({exc}); refusing to seal it again, "
                    f"which would bless the change. If you changed it on purpose: python -m masknet.serving.bundle --reseal {run}"
                ) from None
    try:
        files = {
            p.name: {"sha256": _sha256(p), "bytes": p.stat().st_size}
            for p in sorted(run.iterdir())
            if p.is_file() and p.name != MANIFEST and not p.name.startswith(".")
        }
        manifest = {
            "format": BUNDLE_FORMAT,
            "version": BUNDLE_VERSION,
            "model": spec.get("model"),
            "encoder": spec.get("encoder"),
            "versions": _versions(),
            "files": files,
            "bundle_sha256": _bundle_hash(files),
        }
        write_atomic(path, json.dumps(manifest, indent=2).encode())  # last: seals the folder
    except OSError as exc:
        raise UserError(f"{exc.filename or run}: cannot seal {run}: {exc.strerror or exc}") from None
    return manifest


def verify_manifest(run: str | Path) -> dict[str, Any]:
    """Check every file listed in RUN/manifest.json; return the manifest. Raises UserError."""
    run = Path(run)
    if not run.is_dir():
        raise UserError(f"{run}: model bundle folder not found")
    path = run / MANIFEST
    if not path.is_file():
        raise UserError(
            f"{path}: missing; {run} is not a sealed model bundle (train it with this masknet, or seal an "
            f"existing run folder with `python -m masknet.serving.bundle {run}`)"
        )
    try:
        manifest = json.loads(path.read_bytes())
    except OSError as exc:
        raise UserError(f"{path}: cannot read it: {exc.strerror or exc}") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise UserError(f"{path}: not valid JSON ({exc}); the bundle is corrupted") from None
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        raise UserError(f"{path}: not a masknet bundle manifest")
    if manifest.get("version") != BUNDLE_VERSION:
        raise UserError(f"{path}: bundle format version {manifest.get('version')!r}; this masknet reads version {BUNDLE_VERSION}")
    files = _check_structure(path, manifest)
    for name in REQUIRED + ((manifest["encoder"],) if manifest.get("encoder") else ()):
        if name not in files:
            raise UserError(f"{path}: {name} is not listed in the manifest; the bundle was tampered with")
    for name, entry in files.items():
        p = run / name
        if not p.is_file():
            raise UserError(f"{p}: listed in the manifest but missing; the bundle is incomplete")
        size = p.stat().st_size
        if size != entry["bytes"]:
            what = "truncated" if size < entry["bytes"] else "modified"
            raise UserError(f"{p}: {size} bytes, the manifest says {entry['bytes']} ({what}); refusing to load")
        if _sha256(p) != entry["sha256"]:
            raise UserError(f"{p}: SHA-256 does not match the manifest (the file was modified); refusing to load")
    if manifest.get("bundle_sha256") != _bundle_hash(files):
        raise UserError(f"{path}: bundle_sha256 does not match the file list (the manifest was edited)")
    return manifest


def _check_structure(path: Path, manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The manifest's file list, every entry checked for its types (a UserError naming the key)."""

    def bad(key: str, want: str, got: Any) -> UserError:
        return UserError(f"{path}: {key}: expected {want}, got {json.dumps(got)[:60]}; the bundle is corrupted")

    files = manifest.get("files")
    if not isinstance(files, dict):
        raise bad("files", "an object (the file list)", files)
    for name, entry in files.items():
        if "/" in name or "\\" in name or name in ("", ".", ".."):
            raise UserError(f"{path}: bad file name {name!r} in the manifest")
        if not isinstance(entry, dict):
            raise bad(f"files.{name}", 'an object with "sha256" and "bytes"', entry)
        size, digest = entry.get("bytes"), entry.get("sha256")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise bad(f"files.{name}.bytes", "a size in bytes", size)
        if not isinstance(digest, str) or len(digest) != 64:
            raise bad(f"files.{name}.sha256", "a SHA-256 hex digest", digest)
    encoder = manifest.get("encoder")
    if encoder is not None and not isinstance(encoder, str):
        raise bad("encoder", "null or a file name", encoder)
    if not isinstance(manifest.get("bundle_sha256"), str):
        raise bad("bundle_sha256", "a SHA-256 hex digest", manifest.get("bundle_sha256"))
    return files


@dataclass
class Bundle:
    """A verified, loaded bundle. `model` is in eval mode; `encoder` is None for runs on the
    built-in synthetic data (their inputs are already-encoded integer indices)."""

    path: Path
    model: Any  # CTRModel
    encoder: Any  # masknet.data.encoder.Encoder or None
    spec: dict[str, Any]  # model.json
    manifest: dict[str, Any]
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def field_names(self) -> list[str]:
        return list(self.spec["field_names"])

    @property
    def cardinalities(self) -> list[int]:
        return [int(c) for c in self.spec["cardinalities"]]

    @property
    def bundle_hash(self) -> str:
        return self.manifest["bundle_sha256"]

    def __iter__(self):  # model, encoder, spec = verify_and_load(run)
        return iter((self.model, self.encoder, self.spec))


def _read_json(p: Path) -> Any:
    try:
        return json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{p}: not valid JSON ({exc})") from None


def verify_and_load(run: str | Path, threads: Optional[int] = None) -> Bundle:
    """Verify RUN against its manifest, then load the model (safetensors) and encoder (JSON)."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from ..data.encoder import Encoder
    from ..models import build_model

    from ..training.run import model_config_of, read_model_spec

    run = Path(run)
    manifest = verify_manifest(run)
    if threads:
        torch.set_num_threads(threads)
    spec = read_model_spec(run / "model.json")
    model = build_model(model_config_of(run / "model.json", spec), spec["cardinalities"])
    try:
        state = load_file(str(run / "model.safetensors"))
        model.load_state_dict(state)
    except (SafetensorError, RuntimeError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{run / 'model.safetensors'}: weights do not fit model.json ({first})") from None
    model.eval()
    encoder = None
    if spec.get("encoder"):
        encoder = Encoder.load(run / spec["encoder"])
        names = [f.spec.name for f in encoder.fields]
        if names != list(spec["field_names"]) or encoder.cardinalities != [int(c) for c in spec["cardinalities"]]:
            raise UserError(f"{run / spec['encoder']}: its fields do not match model.json's fields and cardinalities")
    metrics_path = run / "metrics.json"
    metrics = _read_json(metrics_path) if metrics_path.is_file() else {}
    return Bundle(run, model, encoder, spec, manifest, metrics)


def main(argv: Optional[list[str]] = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m masknet.serving.bundle", description="Seal or verify a model bundle.")
    p.add_argument("run", help="a run folder")
    p.add_argument("--verify", action="store_true", help="verify instead of sealing")
    p.add_argument("--reseal", action="store_true", help="seal a folder again although its files no longer match its "
                   "manifest (only after changing them on purpose: this blesses the change)")
    args = p.parse_args(argv)
    if args.verify and args.reseal:
        print("error: --verify and --reseal exclude each other", file=sys.stderr)
        return 2
    try:
        m = verify_manifest(args.run) if args.verify else write_manifest(args.run, reseal=args.reseal)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{args.run}: {'verified' if args.verify else 'sealed'}; bundle sha256 {m['bundle_sha256']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
