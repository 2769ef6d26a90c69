"""A trained run folder as a self-contained, verifiable model bundle: what serving loads.

The folder's files, sealing and verifying them, and the one model loader are masknet.runs
(`RunFolder`); this module adds what serving needs on top: the encoder (checked against
model.json) and the score head (calibration.json), in a `Bundle`. `verify_and_load(run)` checks
every file against the manifest first (missing, truncated, modified or unlisted required file: a
UserError naming it) and then loads JSON and safetensors only; nothing is ever unpickled. Only the
top-level files of the folder are part of the bundle (checkpoint sub-folders are not).

    python -m masknet.serving.bundle RUN          seal a run folder (e.g. one trained before manifests)
    python -m masknet.serving.bundle --verify RUN check one
    python -m masknet.serving.bundle --reseal RUN seal one again after changing its files on purpose

Sealing refuses a folder that is already sealed but whose files no longer match its manifest (or
whose manifest is unreadable): sealing it again would bless corrupt weights. Every read checks the
manifest's and model.json's structure first (types, ranges), in one line naming the file and key.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..errors import UserError
from ..runs import BUNDLE_FORMAT, BUNDLE_VERSION, MANIFEST, REQUIRED, RunFolder, multi_valued_fields, verify_manifest, write_manifest

__all__ = [  # the sealing names are masknet.runs'; kept here, where serving users import them
    "BUNDLE_FORMAT", "BUNDLE_VERSION", "MANIFEST", "REQUIRED", "Bundle", "verify_and_load", "verify_manifest", "write_manifest",
]


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
    head: Any = None  # models.scoring.ScoreHead: logits -> (score, uncalibrated score)
    calibration: Optional[dict[str, Any]] = None  # calibration.json, when the bundle has one

    @property
    def tasks(self) -> list[str]:
        """The model's outputs: one task (the first label) unless it is a multi-task model."""
        return list(getattr(self.model, "tasks", None) or self.spec.get("tasks", ["click"])[:1])

    @property
    def multitask(self) -> bool:
        return getattr(self.model, "tasks", None) is not None

    @property
    def head_method(self) -> str:
        """The post-hoc calibration method of the bundle (none without one)."""
        return self.calibration.get("method", "none") if self.calibration else "none"

    @property
    def calibrated(self) -> bool:
        """True when served scores differ from the logits' sigmoids (calibrators or down-sampling)."""
        return self.head is not None and not self.head.identity

    @property
    def field_names(self) -> list[str]:
        return list(self.spec["field_names"])

    @property
    def cardinalities(self) -> list[int]:
        return [int(c) for c in self.spec["cardinalities"]]

    @property
    def multi_valued(self) -> list:
        """data.batch.MultiValuedField per multi-valued field (empty for most models)."""
        return multi_valued_fields(self.spec)

    @property
    def bundle_hash(self) -> str:
        return self.manifest["bundle_sha256"]

    def __iter__(self):  # model, encoder, spec = verify_and_load(run)
        return iter((self.model, self.encoder, self.spec))


def verify_and_load(run: str | Path, threads: Optional[int] = None) -> Bundle:
    """Verify RUN against its manifest, then load the model (safetensors) and encoder (JSON)."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    folder = RunFolder(run)
    loaded = folder.load(verify="required")
    spec = loaded.spec
    bundle = Bundle(folder.path, loaded.model, _encoder(folder, spec), spec, loaded.manifest, folder.read_metrics())
    bundle.head, bundle.calibration = _score_head(folder, bundle)
    return bundle


def _encoder(folder: RunFolder, spec: dict[str, Any]) -> Any:
    """The bundle's encoder (None without one), checked against model.json's fields."""
    from ..data.encoder import Encoder

    if not spec.get("encoder"):
        return None
    path = folder.file(spec["encoder"])
    encoder = Encoder.load(path)
    names = [f.spec.name for f in encoder.fields]
    if names != list(spec["field_names"]) or encoder.cardinalities != [int(c) for c in spec["cardinalities"]]:
        raise UserError(f"{path}: its fields do not match model.json's fields and cardinalities")
    if encoder.multi_valued_fields() != multi_valued_fields(spec):
        raise UserError(f"{path}: its multi-valued fields do not match model.json's")
    return encoder


def _score_head(folder: RunFolder, bundle: Bundle) -> Any:
    """The bundle's ScoreHead from calibration.json (plain sigmoids without one)."""
    from ..models.scoring import CALIBRATION_FILE, CALIBRATION_FORMAT, ScoreHead

    path = folder.calibration
    if not path.is_file():
        return ScoreHead(None, len(bundle.tasks)), None
    if CALIBRATION_FILE not in bundle.manifest.get("files", {}):
        raise UserError(f"{path}: not listed in the manifest; the bundle was tampered with")
    spec = folder.read_json(CALIBRATION_FILE)
    if not isinstance(spec, dict) or spec.get("format") != CALIBRATION_FORMAT:
        raise UserError(f"{path}: not a masknet calibration file")
    if spec.get("tasks") != bundle.tasks:
        raise UserError(f"{path}: its tasks {spec.get('tasks')} are not the model's {bundle.tasks}")
    try:
        return ScoreHead(spec, len(bundle.tasks)), spec
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{path}: malformed ({exc})") from None


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
