"""`masknet tune`: an Optuna study over a model's search space, resumable, with its outputs.

OUTPUT/study.db        the study (Optuna RDB storage in SQLite): every trial, its parameters, its
                       validation AUC at each evaluation. A killed `masknet tune` rerun with the
                       same OUTPUT continues it: the trial that was running is run again.
OUTPUT/best.yaml       the best trial's full config: `masknet train --config OUTPUT/best.yaml`
OUTPUT/trials.csv, trials.parquet   one row per trial (state, validation AUC, parameters, steps)
OUTPUT/history.png, importances.png the optimisation history and the parameters' importances
OUTPUT/summary.json    best value and parameters, trial counts, the space, the seed

Protocol. Each trial trains on the train split and is scored on the valid split only (the test
split is never read). The sampler is TPE; the pruner (median) is fed, at each evaluation, the best
validation AUC so far, and stops a trial below the median of earlier trials at the same evaluation.
Repeatability: trial i draws from a TPE sampler seeded by (seed, i), so a study with the same seed
and data draws the same trials, and a resumed study the same ones as an uninterrupted one.
"""

from __future__ import annotations

import copy
import json
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
from tqdm import tqdm

from ..config import RunConfig
from ..data.dataset import CTRDataset
from ..errors import UserError
from ..models import REGISTRY, build_model, with_size_defaults
from ..models.search import Layers, SearchSpace
from ..training.distributed import DistContext, resolve_device
from ..training.run import load_data
from ..training.trainer import FitResult, TrainingDiverged, fit, seed_everything
from .outputs import write_outputs, write_tables
from .space import apply_params, check_space, space_to_yaml, suggest

STUDY_NAME = "masknet"
INSTALL_HINT = "pip install 'masknet[tune]' (or: pip install 'optuna>=5,<6')"
PRUNER_STARTUP_TRIALS = 5  # trials that always run to the end: the median needs something to compare with
PRUNER_WARMUP_EVALS = 2  # evaluations before a trial can be pruned (the first ones are noisy)


class TuningError(UserError):
    """A study cannot run: Optuna is missing, or OUTPUT holds a different study."""


def require_optuna():
    try:
        import optuna
    except ImportError:
        raise TuningError(f"masknet tune needs Optuna, which is not installed: {INSTALL_HINT}") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna


@dataclass
class TuneResult:
    output: Path
    best_value: float
    best_params: dict[str, Any]
    best_config: RunConfig
    best_settings: dict[str, Any]  # the best trial's values by config key (what best.yaml changes)
    finished: int  # trials complete or pruned
    ran: int  # trials this invocation ran


def run_trial(cfg: RunConfig, data: CTRDataset, on_eval: Optional[Callable[[dict], None]] = None) -> FitResult:
    """Train `cfg` as `masknet train` does (same seed, same model, same loop) without a run folder:
    its validation AUC is the one `masknet train --config` with this config reaches."""
    seed_everything(cfg.train.seed)
    model = build_model(with_size_defaults(cfg.model, len(data.splits["train"])), data.cardinalities)  # as train_run fills it
    return fit(model, data, cfg.train, on_eval, ctx=DistContext(device=resolve_device(cfg.train.device)))


def _identity(base: RunConfig, space: SearchSpace, seed: int) -> dict[str, Any]:
    """What makes a study the same study (resume only into the same one)."""
    cfg = json.loads(json.dumps(base.to_dict()))
    cfg.pop("output", None)
    for key in ("threads", "progress", "checkpoints", "checkpoint_every_steps", "keep_checkpoints"):
        cfg["train"].pop(key, None)  # bookkeeping, not results
    return {"base_config": cfg, "space": space_to_yaml(space), "seed": seed}


def _sampler_seed(seed: int, finished: int) -> int:
    return int(np.random.SeedSequence([seed, finished]).generate_state(1)[0])


def _open_study(optuna, output: Path, identity: dict[str, Any]):
    output.mkdir(parents=True, exist_ok=True)
    storage = optuna.storages.RDBStorage(f"sqlite:///{(output / 'study.db').resolve()}")
    pruner = optuna.pruners.MedianPruner(n_startup_trials=PRUNER_STARTUP_TRIALS, n_warmup_steps=PRUNER_WARMUP_EVALS)
    study = optuna.create_study(study_name=STUDY_NAME, storage=storage, direction="maximize", pruner=pruner, load_if_exists=True)
    saved = study.user_attrs.get("identity")
    if saved is None:
        study.set_user_attr("identity", identity)
    elif saved != json.loads(json.dumps(identity)):
        differs = [k for k in identity if saved.get(k) != json.loads(json.dumps(identity[k]))]
        raise TuningError(
            f"{output}: holds a study with a different {' and '.join(differs)} "
            f"(model {saved['base_config']['model']['name']}); use another --output, or the same settings to continue it"
        )
    _retry_interrupted(optuna, study)
    return study


def _retry_interrupted(optuna, study) -> None:
    """A trial left RUNNING was killed with its process: mark it failed and queue its parameters
    again, so the resumed study runs the same trials as an uninterrupted one."""
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study._storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
        if t.params:
            study.enqueue_trial(t.params, user_attrs={"retry_of": t.number}, skip_if_exists=False)


def _finished(optuna, study) -> int:
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return len(study.get_trials(deepcopy=False, states=states))


def _objective(optuna, base: RunConfig, space: SearchSpace, data: CTRDataset):
    def objective(trial) -> float:
        cfg = apply_params(base, suggest(trial, space))
        evals: list[float] = []

        def on_eval(record: dict) -> None:
            evals.append(record["valid_auc"])
            trial.report(max(evals), step=len(evals))
            if trial.should_prune():
                raise optuna.TrialPruned()

        t0 = time.perf_counter()
        try:
            result = run_trial(cfg, data, on_eval)
        except TrainingDiverged as exc:  # a rate too large for this model: a (pruned) result, not a crash
            trial.set_user_attr("diverged", str(exc).split(";")[0])
            raise optuna.TrialPruned() from None
        finally:
            trial.set_user_attr("evaluations", len(evals))
            trial.set_user_attr("seconds", time.perf_counter() - t0)
        trial.set_user_attr("steps", result.steps)
        trial.set_user_attr("best_step", result.best_step)
        return result.best_valid["auc"]

    return objective


def tune(
    base: RunConfig,
    trials: int,
    output: str | Path,
    space: Optional[SearchSpace] = None,
    seed: int = 0,
    timeout: Optional[float] = None,
    max_steps: Optional[int] = None,
    data: Optional[CTRDataset] = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> TuneResult:
    """Run (or continue) a study of `trials` trials of `base.model.name` on `base.data`; write
    OUTPUT's files. `max_steps` caps every trial's training steps (the same budget for each);
    `timeout` (seconds) stops starting new trials after that long."""
    optuna = require_optuna()
    if trials < 1:
        raise TuningError(f"--trials: must be >= 1, got {trials}")
    base = copy.deepcopy(base).validate()
    pristine = copy.deepcopy(base)  # what best.yaml starts from (the user's bookkeeping settings)
    if max_steps is not None:
        if max_steps < 1:
            raise TuningError(f"--max-steps: must be >= 1, got {max_steps}")
        base.train.max_steps = pristine.train.max_steps = max_steps
    space = dict(space if space is not None else REGISTRY[base.model.name].search_space)
    check_space(space, base)
    if "train.batch_size" in space:  # a trial trains at the batch it drew, not one halved for small data
        base.train.min_batches_per_epoch = pristine.train.min_batches_per_epoch = 0
    base.train.progress, base.train.checkpoints = False, False
    output = Path(output)
    study = _open_study(optuna, output, _identity(base, space, seed))
    data = data if data is not None else load_data(base)
    objective = _objective(optuna, base, space, data)
    start, ran = time.perf_counter(), 0
    bar = tqdm(total=trials, initial=min(_finished(optuna, study), trials), desc=f"tune {base.model.name}", unit="trial",
               disable=not progress, file=sys.stderr)
    while (done := _finished(optuna, study)) < trials:
        if timeout is not None and time.perf_counter() - start > timeout:
            log(f"masknet tune: --timeout {timeout:g} s reached after {ran} trials this run ({done} of {trials} finished)")
            break
        study.sampler = optuna.samplers.TPESampler(seed=_sampler_seed(seed, done))
        study.optimize(objective, n_trials=1, gc_after_trial=True)
        ran += 1
        bar.update(_finished(optuna, study) - done)
        if _completed(optuna, study):
            bar.set_postfix(best=f"{study.best_value:.4f}", trial=study.best_trial.number)
        write_tables(study, output)
    bar.close()
    if not _completed(optuna, study):
        raise TuningError(f"{output}: no trial finished without pruning; run more --trials")
    settings = _config_params(study.best_trial.params, space)
    best_cfg = apply_params(pristine, settings)
    best_cfg.output = None
    write_outputs(study, output, best_cfg, space, seed, trials)
    return TuneResult(output, study.best_value, study.best_trial.params, best_cfg, settings, _finished(optuna, study), ran)


def _completed(optuna, study) -> bool:
    return bool(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))


def _config_params(params: dict[str, Any], space: SearchSpace) -> dict[str, Any]:
    """Optuna's flat parameters back to config values (a Layers key is two parameters)."""
    out = {}
    for key, r in space.items():
        if isinstance(r, Layers):
            out[key] = [params[f"{key}.width"]] * params[f"{key}.depth"]
        else:
            out[key] = params[key]
    return out
