"""The run folder: the one module that knows a run's files, seals and verifies them, and loads
the model they hold.

    RUN/
      config.yaml         the resolved RunConfig (training/runfolder.py writes it)
      model.json          model name, model config, field names, cardinalities, multi-valued fields, tasks
      model.safetensors   the best evaluation's weights (safetensors: no pickle, no code)
      dataset.json        the dataset's meta
      encoder.json        the fitted encoder (prepared data only): raw rows -> model inputs
      calibration.json    (optional) down-sampling correction and calibrators: logits -> scores
      metrics.json        the run's results; log.jsonl: one line per evaluation
      reliability.png     reliability diagram of every task on the test split
      manifest.json       bundle format, versions, SHA-256 and size of every file above, written last
      checkpoints/        what --resume continues from (training/checkpoint.py writes them)
      tensorboard/        train.tensorboard's event files

Training writes through `RunFolder` (write_model, write_metrics, ..., then `seal`); serving,
experiments, bench and the estimator read through it (`load_model`, `verify`, `read_metrics`).
`RunFolder.load` is the one model loader: model.json checked key by key, the model rebuilt from
it, the safetensors weights loaded. `seal` hashes every top-level file into manifest.json;
`verify` checks every file against it (missing, truncated, modified or unlisted required file: a
UserError naming it). Paths in the manifest are relative, so a bundle copied to another machine
verifies and loads there. Which folder a run may use and which checkpoint it may resume:
training/runfolder.py and training/checkpoint.py.

Layer: above models (it builds them), below training, serving, experiments and bench.
"""

from __future__ import annotations

import hashlib
import json
import platform
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

from .config import ModelConfig, from_dict
from .data.batch import MultiValuedField, check_multi_valued
from .data.dataset import MAX_CARDINALITY
from .errors import ConfigError, UserError
from .integrity import sha256_file, write_atomic
from .registry import model_names

CONFIG = "config.yaml"
MODEL_CONFIG = "model.json"
WEIGHTS = "model.safetensors"
DATASET = "dataset.json"
ENCODER = "encoder.json"
CALIBRATION = "calibration.json"  # = models.scoring.CALIBRATION_FILE (tests/test_runs.py)
METRICS = "metrics.json"
LOG = "log.jsonl"
RELIABILITY = "reliability.png"
MANIFEST = "manifest.json"
CHECKPOINTS = "checkpoints"
TENSORBOARD = "tensorboard"
LOCK = ".masknet-lock"  # a dot file: never part of the bundle's manifest
# Everything a run writes at the top of its folder (`--overwrite` deletes these and nothing else)
RUN_FILES = (
    CONFIG, LOG, MODEL_CONFIG, WEIGHTS, DATASET, METRICS, ENCODER, MANIFEST, CHECKPOINTS, TENSORBOARD, CALIBRATION, RELIABILITY,
)
REQUIRED = (MODEL_CONFIG, WEIGHTS)  # a bundle without these is no bundle
BUNDLE_FORMAT = "masknet-bundle"
BUNDLE_VERSION = 1


@dataclass(frozen=True)
class LoadedRun:
    """What `RunFolder.load` returns: the model (eval mode), its checked model.json, and the
    verified manifest (None when loaded without verification)."""

    model: Any  # models.CTRModel
    spec: dict[str, Any]
    manifest: Optional[dict[str, Any]]


def parse_log(data: bytes) -> list[dict[str, Any]]:
    """log.jsonl's records from its bytes (a run folder's, or a bundle held in memory)."""
    return [json.loads(line) for line in data.decode().splitlines() if line]


@dataclass(frozen=True)
class RunFolder:
    """One run's folder; every path of a run's file comes from here."""

    path: Path

    def __init__(self, path: str | Path):
        object.__setattr__(self, "path", Path(path))

    def file(self, name: str) -> Path:
        return self.path / name

    @property
    def config(self) -> Path:
        return self.path / CONFIG

    @property
    def model_config(self) -> Path:
        return self.path / MODEL_CONFIG

    @property
    def weights(self) -> Path:
        return self.path / WEIGHTS

    @property
    def encoder(self) -> Path:
        return self.path / ENCODER

    @property
    def metrics(self) -> Path:
        return self.path / METRICS

    @property
    def log(self) -> Path:
        return self.path / LOG

    @property
    def calibration(self) -> Path:
        return self.path / CALIBRATION

    @property
    def manifest(self) -> Path:
        return self.path / MANIFEST

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def lock(self) -> Path:
        return self.path / LOCK

    # --- writing (training) ------------------------------------------------------------

    def unseal(self) -> None:
        """Remove the manifest: the folder is unsealed until every bundle file is rewritten."""
        self.manifest.unlink(missing_ok=True)

    def write_model(self, model: Any, model_cfg: ModelConfig, data: Any, data_path: Optional[str | Path] = None) -> None:
        """Write model.safetensors, model.json, dataset.json and, when the data is a prepared folder
        with an encoder, a copy of its encoder.json (so the run folder alone can encode raw rows).
        Each file atomically (a full disk leaves the old file or none, never a part). Raises OSError."""
        from safetensors.torch import save

        encoder = Path(data_path) / ENCODER if data_path else None
        spec = {
            "model": model_cfg.name,
            "model_config": asdict(model_cfg),
            "field_names": data.field_names,
            "cardinalities": data.cardinalities,
            "encoder": ENCODER if encoder is not None and encoder.is_file() else None,
            "tasks": data.task_names if data.splits["valid"].labels is not None else data.task_names[:1],
        }
        if data.multi_valued:  # pooled fields after the single-valued ones (data.batch.MultiValuedField)
            spec["multi_valued"] = [m.to_dict() for m in data.multi_valued]
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        write_atomic(self.weights, save(state))
        if spec["encoder"]:
            write_atomic(self.encoder, encoder.read_bytes())
        write_atomic(self.model_config, json.dumps(spec, indent=2).encode())
        write_atomic(self.path / DATASET, json.dumps(data.meta, indent=2, default=str).encode())

    def write_json(self, name: str, obj: Any) -> None:
        write_atomic(self.path / name, json.dumps(obj, indent=2).encode())

    def write_metrics(self, metrics: dict[str, Any]) -> None:
        self.write_json(METRICS, metrics)

    def write_bytes(self, name: str, data: bytes) -> None:
        write_atomic(self.path / name, data)

    def seal(self, reseal: bool = False) -> dict[str, Any]:
        """Hash every top-level file (except the manifest and dot files) into manifest.json. A folder
        already sealed must still match its manifest, unless `reseal` (the user changed it on purpose)."""
        for name in REQUIRED:
            if not (self.path / name).is_file():
                raise UserError(f"{self.path / name}: missing; is {self.path} a finished run folder?")
        spec = self.read_model_spec()  # first: the most precise message for a garbled one
        path = self.manifest
        if path.exists() or path.is_symlink():
            if not path.is_file() or path.is_symlink():
                raise UserError(f"{path}: exists and is not a file; remove it to seal {self.path}")
            if not reseal:
                try:
                    self.verify()
                except UserError as exc:
                    raise UserError(
                        f"{self.path}: already sealed, and no longer matches its manifest ({exc}); refusing to seal it again, "
                        f"which would bless the change. If you changed it on purpose: python -m masknet.serving.bundle --reseal {self.path}"
                    ) from None
        try:
            files = {
                p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
                for p in sorted(self.path.iterdir())
                if p.is_file() and p.name != MANIFEST and not p.name.startswith(".")
            }
            manifest = {
                "format": BUNDLE_FORMAT, "version": BUNDLE_VERSION, "model": spec.get("model"), "encoder": spec.get("encoder"),
                "versions": _versions(), "files": files, "bundle_sha256": bundle_hash(files),
            }
            write_atomic(path, json.dumps(manifest, indent=2).encode())  # last: seals the folder
        except OSError as exc:
            raise UserError(f"{exc.filename or self.path}: cannot seal {self.path}: {exc.strerror or exc}") from None
        return manifest

    # --- reading (serving, experiments, bench, estimator) -------------------------------

    def verify(self) -> dict[str, Any]:
        """Check every file listed in manifest.json; return the manifest. Raises UserError."""
        run, path = self.path, self.manifest
        if not run.is_dir():
            raise UserError(f"{run}: model bundle folder not found")
        if not path.is_file():
            raise UserError(
                f"{path}: missing; {run} is not a sealed model bundle (train it with this masknet, or seal an "
                f"existing run folder with `python -m masknet.serving.bundle {run}`)"
            )
        manifest = self._read_manifest()
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
            if sha256_file(p) != entry["sha256"]:
                raise UserError(f"{p}: SHA-256 does not match the manifest (the file was modified); refusing to load")
        if manifest.get("bundle_sha256") != bundle_hash(files):
            raise UserError(f"{path}: bundle_sha256 does not match the file list (the manifest was edited)")
        return manifest

    def _read_manifest(self) -> dict[str, Any]:
        path = self.manifest
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
        return manifest

    def read_model_spec(self) -> dict[str, Any]:
        return read_model_spec(self.model_config)

    def read_json(self, name: str) -> Any:
        p = self.path / name
        try:
            return json.loads(p.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UserError(f"{p}: not valid JSON ({exc})") from None

    def read_log(self) -> list[dict[str, Any]]:
        """log.jsonl's records in order ([] for a folder without one)."""
        return parse_log(self.log.read_bytes()) if self.log.is_file() else []

    def bundle_files(self) -> dict[str, bytes]:
        """The sealed bundle's bytes: every file its manifest lists, and the manifest (verify() first)."""
        names = list(self._read_manifest()["files"]) + [MANIFEST]
        return {name: self.file(name).read_bytes() for name in names}

    def is_bundle(self) -> bool:
        """Whether the folder holds a bundle manifest (a sealed run folder or a saved estimator)."""
        return self.manifest.is_file()

    def read_metrics(self) -> dict[str, Any]:
        """metrics.json ({} for a folder without one)."""
        return self.read_json(METRICS) if self.metrics.is_file() else {}

    def load(self, verify: str = "if-sealed") -> LoadedRun:
        """The one model loader. `verify`: "required" (a sealed bundle, every file checked first:
        serving), "if-sealed" (checked when the folder has a manifest) or "no"."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        from .models import build_model

        if verify not in ("required", "if-sealed", "no"):
            raise ValueError(f"verify: 'required', 'if-sealed' or 'no', got {verify!r}")
        manifest = None
        if verify == "required" or (verify == "if-sealed" and self.manifest.is_file()):
            manifest = self.verify()
        for p in REQUIRED:
            if not (self.path / p).is_file():
                raise UserError(f"{self.path / p}: missing; is {self.path} a finished run folder?")
        spec = self.read_model_spec()
        model = build_model(model_config_of(self.model_config, spec), spec["cardinalities"], multi_valued_fields(spec), tasks=spec.get("tasks"))
        try:
            model.load_state_dict(load_file(str(self.weights)))
        except (SafetensorError, RuntimeError, OSError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"{self.weights}: weights do not fit model.json ({first})") from None
        model.eval()
        return LoadedRun(model, spec, manifest)


def load_model(run: str | Path, verify: bool = True) -> Any:
    """Rebuild a trained model from a run folder (model.json + model.safetensors), in eval mode.
    With `verify` (default) and a manifest.json in the folder, every file's SHA-256 is checked first."""
    return RunFolder(run).load("if-sealed" if verify else "no").model


def write_manifest(run: str | Path, reseal: bool = False) -> dict[str, Any]:
    """Seal `run` (RunFolder.seal)."""
    return RunFolder(run).seal(reseal)


def verify_manifest(run: str | Path) -> dict[str, Any]:
    """Verify `run` against its manifest (RunFolder.verify); return the manifest."""
    return RunFolder(run).verify()


def multi_valued_fields(spec: dict[str, Any]) -> list[MultiValuedField]:
    """model.json's multi-valued fields (none for a model without them)."""
    return [MultiValuedField.from_dict(m) for m in spec.get("multi_valued", [])]


def read_model_spec(path: Path) -> dict[str, Any]:
    """model.json, checked key by key (a UserError naming the file and key): sealing, loading and
    serving all read it through here, so a garbled one is refused before it builds anything."""
    try:
        spec = json.loads(Path(path).read_bytes())
    except IsADirectoryError:
        raise UserError(f"{path}: is a folder, not model.json") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read it: {exc.strerror or exc}") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise UserError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(spec, dict):
        raise UserError(f"{path}: not a JSON object")
    _check_spec_fields(path, spec)
    model_config_of(path, spec)
    return spec


def _check_spec_fields(path: Path, spec: dict[str, Any]) -> None:
    def bad(key: str, want: str) -> UserError:
        got = f"got {json.dumps(spec.get(key))[:60]}" if key in spec else "missing"
        return UserError(f"{path}: {key}: expected {want}, {got}")

    if spec.get("model") not in model_names():
        raise bad("model", f"one of {', '.join(model_names())}")
    if not isinstance(spec.get("model_config"), dict):
        raise bad("model_config", "an object")
    names, cards = spec.get("field_names"), spec.get("cardinalities")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise bad("field_names", "a non-empty list of names")
    if not isinstance(cards, list) or len(cards) != len(names) or not all(
        isinstance(c, int) and not isinstance(c, bool) and 1 <= c <= MAX_CARDINALITY for c in cards
    ):
        raise bad("cardinalities", f"{len(names)} integers in 1..{MAX_CARDINALITY:,} (one per field name)")
    encoder = spec.get("encoder")
    if encoder is not None and not (isinstance(encoder, str) and encoder and "/" not in encoder and "\\" not in encoder
                                    and encoder not in (".", "..")):
        raise bad("encoder", "null or a file name in the bundle")
    if "multi_valued" in spec:
        try:
            check_multi_valued(spec["multi_valued"])
        except ValueError as exc:
            raise UserError(f"{path}: multi_valued{exc}") from None
    tasks = spec.get("tasks")
    if tasks is not None and not (isinstance(tasks, list) and tasks and all(isinstance(t, str) and t for t in tasks)
                                  and len(set(tasks)) == len(tasks)):
        raise bad("tasks", "a non-empty list of distinct task names")
    if tasks is None and spec["model_config"].get("multitask", "none") != "none":
        raise bad("tasks", "the task names of a multi-task model")


# model config keys whose default changed after model.json files were written without them: such a model
# had the old value (no task blocks; every task's gradient into the shared parts)
_ABSENT_MEANS = {"task_blocks": 0, "shared_gradient": "all"}


def model_config_of(path: Path, spec: dict[str, Any]) -> ModelConfig:
    """model.json's model_config as a validated ModelConfig (a UserError naming the file)."""
    try:
        model_cfg = from_dict(ModelConfig, _ABSENT_MEANS | spec["model_config"], prefix="model_config.")
        model_cfg.validate()
    except ConfigError as exc:
        raise UserError(f"{path}: {str(exc).replace('model.', 'model_config.', 1)}") from None
    return model_cfg


def _versions() -> dict[str, str]:
    import numpy
    import safetensors
    import torch

    from . import __version__ as masknet_version

    return {
        "masknet": masknet_version, "torch": torch.__version__, "numpy": numpy.__version__,
        "safetensors": safetensors.__version__, "python": platform.python_version(),
    }


def bundle_hash(files: dict[str, dict[str, Any]]) -> str:
    """One SHA-256 over the sorted (name, file hash) pairs: identifies the bundle's content."""
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(f"{name}\0{files[name]['sha256']}\n".encode())
    return h.hexdigest()


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
