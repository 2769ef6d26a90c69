"""`masknet tune`: an Optuna study over a model's search space, resumable, with its outputs.

OUTPUT/study.db        the study (Optuna RDB storage in SQLite): every trial, its parameters, its
                       validation AUC at each evaluation. A killed `masknet tune` rerun with the
                       same OUTPUT continues it: the trial that was running is run again.
OUTPUT/best.yaml       the best trial's full config: `masknet train --config OUTPUT/best.yaml`
OUTPUT/trials.csv, trials.parquet   one row per trial (state, validation AUC, parameters, steps)
OUTPUT/history.png, importances.png the optimisation history and the parameters' importances
OUTPUT/summary.json    best value and parameters, trial counts, the space, the seed, the re-check
OUTPUT/scores/         each re-check's validation scores (float32 .npy), for the re-check's margin

Protocol. Each trial trains on the train split and is scored on the valid split only (the test
split is never read). The sampler is TPE; the pruner (median) is fed, at each evaluation, the best
validation AUC so far, and stops a trial below the median of earlier trials at the same evaluation.
Repeatability: trial i draws from a TPE sampler seeded by (seed, i), so a study with the same seed
and data draws the same trials, and a resumed study the same ones as an uninterrupted one.
Robustness (tuning.candidates): trial 0 is the model's default; a study of 20 trials or more ends
with re-checks of its best trials and the default on more seeds, and best.yaml is the best mean,
if it beats the default's by more than one standard error of the paired AUC difference.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
from tqdm import tqdm

from ..config import TRAIN_BOOKKEEPING, RunConfig
from ..data.dataset import CTRDataset
from ..errors import UserError
from ..models import REGISTRY, build_model, with_size_defaults
from ..models.search import Layers, SearchSpace
from ..training.distributed import DistContext, resolve_device
from ..training.run import load_data
from ..training.trainer import FitResult, TrainingDiverged, fit, predict, seed_everything
from .candidates import (
    CARRIED, DEFAULT, KEYS, RECHECK_OF, SEED, Candidate, Recheck, best, candidates, default_settings, optuna_params,
    recheck_seeds, scored, trial_keys, with_edge_se,
)
from .outputs import write_outputs, write_tables
from .space import apply_params, check_space, space_to_yaml, suggest

STUDY_NAME = "masknet"
INSTALL_HINT = "pip install 'masknet[tune]' (or: pip install 'optuna>=5,<6')"
PRUNER_STARTUP_TRIALS = 5  # trials that always run to the end: the median needs something to compare with
PRUNER_WARMUP_EVALS = 2  # evaluations before a trial can be pruned (the first ones are noisy)
SCORED_ROWS = 1_000_000  # a re-check saves the scores of at most this many validation rows (a fixed sample)


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
    rechecked: list[Candidate] = dataclasses.field(default_factory=list)  # with their values by seed
    is_default: bool = False  # best.yaml is the model's default setting (trial 0 won, or kept by the margin)


def run_trial(cfg: RunConfig, data: CTRDataset, on_eval: Optional[Callable[[dict], None]] = None,
              scores_to: Optional[Path] = None) -> FitResult:
    """Train `cfg` as `masknet train` does (same seed, same model, same loop) without a run folder:
    its validation AUC is the one `masknet train --config` with this config reaches. With
    `scores_to`, the trained model's validation scores (first task) are saved there (.npy)."""
    seed_everything(cfg.train.seed)
    model = build_model(with_size_defaults(cfg.model, len(data.splits["train"])), data.cardinalities)  # as train_run fills it
    ctx = DistContext(device=resolve_device(cfg.train.device))
    result = fit(model, data, cfg.train, on_eval, ctx=ctx)
    if scores_to is not None:
        first_task = predict(model, data.splits["valid"], ctx=ctx).reshape(len(data.splits["valid"]), -1)[:, 0]
        rows = _scored_rows(len(first_task))
        scores_to.parent.mkdir(parents=True, exist_ok=True)
        partial = scores_to.with_suffix(".partial.npy")  # a killed write leaves no file the re-check would read
        np.save(partial, (first_task if rows is None else first_task[rows]).astype(np.float32))
        partial.replace(scores_to)
    return result


def _scored_rows(n: int) -> Optional[np.ndarray]:
    """The validation rows a re-check's scores are kept for: all, or a fixed sample of SCORED_ROWS."""
    return None if n <= SCORED_ROWS else np.sort(np.random.default_rng(0).choice(n, SCORED_ROWS, replace=False))


def _scores_path(output: Path, trial: int, seed: int) -> Path:
    return output / "scores" / f"trial{trial}-seed{seed}.npy"


def _identity(base: RunConfig, space: SearchSpace, seed: int) -> dict[str, Any]:
    """What makes a study the same study (resume only into the same one)."""
    cfg = json.loads(json.dumps(base.to_dict()))
    cfg.pop("output", None)
    for key in TRAIN_BOOKKEEPING:
        cfg["train"].pop(key, None)
    return {"base_config": cfg, "space": space_to_yaml(space), "seed": seed}


def _sampler_seed(seed: int, finished: int) -> int:
    return int(np.random.SeedSequence([seed, finished]).generate_state(1)[0])


def _open_study(optuna, output: Path, identity: dict[str, Any], default: dict[str, Any], default_keys: list[str]):
    output.mkdir(parents=True, exist_ok=True)
    storage = optuna.storages.RDBStorage(f"sqlite:///{(output / 'study.db').resolve()}")
    pruner = optuna.pruners.MedianPruner(n_startup_trials=PRUNER_STARTUP_TRIALS, n_warmup_steps=PRUNER_WARMUP_EVALS)
    study = optuna.create_study(study_name=STUDY_NAME, storage=storage, direction="maximize", pruner=pruner, load_if_exists=True)
    saved = study.user_attrs.get("identity")
    if saved is None:
        study.set_user_attr("identity", identity)
        # trial 0: the default setting (its keys only: the rest stay as the base config has them)
        study.enqueue_trial(default, user_attrs={DEFAULT: True, KEYS: default_keys})
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
        if t.params or KEYS in t.user_attrs:
            kept = {k: t.user_attrs[k] for k in CARRIED if k in t.user_attrs}
            params = t.params or t.system_attrs.get("fixed_params", {})
            study.enqueue_trial(params, user_attrs={**kept, "retry_of": t.number}, skip_if_exists=False)


def _finished(optuna, study, search_only: bool = False) -> int:
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    done = study.get_trials(deepcopy=False, states=states)
    return len([t for t in done if RECHECK_OF not in t.user_attrs]) if search_only else len(done)


def _objective(optuna, base: RunConfig, space: SearchSpace, data: CTRDataset, output: Path):
    def objective(trial) -> float:
        keys = trial.user_attrs.get(KEYS)  # a fixed trial (the default, a re-check): only these keys
        if keys is not None:  # config keys; a study begun before they were, Optuna's (`<key>.width`) names
            keys = trial_keys(dict.fromkeys(keys), space)
        cfg = apply_params(base, suggest(trial, space if keys is None else {k: space[k] for k in keys}))
        if SEED in trial.user_attrs:
            cfg.train.seed = trial.user_attrs[SEED]
        rechecking = RECHECK_OF in trial.user_attrs  # runs to its end: its value is compared at the end
        evals: list[float] = []
        pruned_on: list[float] = []  # the evaluations the pruner sees

        def on_eval(record: dict) -> None:
            evals.append(record["valid_auc"])
            if record.get("phase") == 1:  # LR first (training.factor_phase): LR's run, alike in every trial
                return
            pruned_on.append(record["valid_auc"])
            trial.report(max(evals), step=len(pruned_on))
            if not rechecking and trial.should_prune():
                raise optuna.TrialPruned()

        t0 = time.perf_counter()
        try:
            scores_to = _scores_path(output, trial.user_attrs[RECHECK_OF], cfg.train.seed) if rechecking else None
            result = run_trial(cfg, data, on_eval, scores_to)
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
    recheck: Recheck = Recheck(),
) -> TuneResult:
    """Run (or continue) a study of `trials` trials of `base.model.name` on `base.data`; write
    OUTPUT's files. `max_steps` caps every trial's training steps (the same budget for each);
    `timeout` (seconds) stops starting new trials after that long. Trial 0 is the default; the
    last `recheck.runs(trials)` trials re-check the best and the default on more seeds (candidates)."""
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
    data = data if data is not None else load_data(base)
    default = optuna_params(default_settings(base, space, len(data.splits["train"])), space)
    if "train.batch_size" in space:  # a trial trains at the batch it drew, not one halved for small data
        base.train.min_batches_per_epoch = pristine.train.min_batches_per_epoch = 0
    base.train.progress, base.train.checkpoints = False, False
    output = Path(output)
    study = _open_study(optuna, output, _identity(base, space, seed), default, trial_keys(default, space))
    objective = _objective(optuna, base, space, data, output)
    runner = _Runner(optuna, study, objective, output, seed, timeout, log)
    runner.bar = tqdm(total=trials, initial=min(_finished(optuna, study), trials), desc=f"tune {base.model.name}",
                      unit="trial", disable=not progress, file=sys.stderr)
    searched = runner.run_until(lambda: _finished(optuna, study, search_only=True) >= trials - recheck.runs(trials), trials)
    if not _completed(optuna, study):
        runner.bar.close()
        raise TuningError(f"{output}: no trial finished without pruning; run more --trials")
    chosen = _recheck(runner, study, space, base.train.seed, recheck, trials, data) if searched and recheck.runs(trials) else []
    runner.bar.close()
    pick = best(chosen, recheck.margin_se)
    _log_margin(chosen, pick, recheck, log)
    number, params = (pick.number, pick.params) if pick else (study.best_trial.number, study.best_trial.params)
    value = study.trials[number].value
    settings = _config_params(params, space)
    best_cfg = apply_params(pristine, settings)
    best_cfg.output = None
    write_outputs(study, output, best_cfg, space, seed, trials, number, [c.to_dict() for c in chosen])
    return TuneResult(output, value, params, best_cfg, settings, _finished(optuna, study), runner.ran, chosen,
                      bool(study.trials[number].user_attrs.get(DEFAULT)))


class _Runner:
    """Runs a study's trials one at a time (each from its own seeded sampler), with the progress
    bar, the timeout and the trials table kept up to date."""

    def __init__(self, optuna, study, objective, output: Path, seed: int, timeout: Optional[float], log):
        self.optuna, self.study, self.objective, self.output, self.seed, self.timeout, self.log = (
            optuna, study, objective, output, seed, timeout, log)
        self.start, self.ran, self.bar = time.perf_counter(), 0, None

    def run_until(self, done: Callable[[], bool], trials: int) -> bool:
        """Run trials until `done()`; False when the timeout stopped it first."""
        optuna, study = self.optuna, self.study
        while not done():
            finished = _finished(optuna, study)
            if self.timeout is not None and time.perf_counter() - self.start > self.timeout:
                self.log(f"masknet tune: --timeout {self.timeout:g} s reached after {self.ran} trials this run "
                         f"({finished} of {trials} finished)")
                return False
            study.sampler = optuna.samplers.TPESampler(seed=_sampler_seed(self.seed, finished))
            study.optimize(self.objective, n_trials=1, gc_after_trial=True)
            self.ran += 1
            self.bar.update(min(_finished(optuna, study), trials) - min(finished, trials))
            if _completed(optuna, study):
                self.bar.set_postfix(best=f"{study.best_value:.4f}", trial=study.best_trial.number)
            write_tables(study, self.output)
        return True


def _recheck(runner: _Runner, study, space: SearchSpace, base_seed: int, recheck: Recheck, trials: int,
             data: CTRDataset) -> list[Candidate]:
    """Train the best trials and the default on more seeds (re-check trials, queued once: a resumed
    study reuses the ones it has); returns the candidates with their values by seed and their
    edge's SE over the default."""
    cands = candidates(study.trials, recheck)
    have = {(t.user_attrs.get(RECHECK_OF), t.user_attrs.get(SEED)) for t in study.trials
            if t.state.name in ("COMPLETE", "PRUNED", "WAITING")}
    for c in cands:
        for s in recheck_seeds(base_seed, recheck):
            if (c.number, s) not in have:
                attrs = {KEYS: trial_keys(c.params, space), SEED: s, RECHECK_OF: c.number}
                study.enqueue_trial(c.params, user_attrs=attrs, skip_if_exists=False)
    waiting = lambda: not study.get_trials(deepcopy=False, states=(runner.optuna.trial.TrialState.WAITING,))  # noqa: E731
    if not runner.run_until(waiting, trials):
        return []
    cands = scored(cands, study.trials, base_seed)
    labels = data.splits["valid"].label_matrix()[:, 0]
    rows = _scored_rows(len(labels))

    def saved(trial: int, seed: int) -> Optional[np.ndarray]:
        path = _scores_path(runner.output, trial, seed)
        return np.load(path, allow_pickle=False) if path.exists() else None

    cands = with_edge_se(cands, labels if rows is None else labels[rows], recheck_seeds(base_seed, recheck), saved,
                         1.0 if rows is None else len(rows) / len(labels))
    runner.log("masknet tune: re-check (mean validation AUC over seeds " + ", ".join(map(str, [base_seed, *recheck_seeds(base_seed, recheck)]))
               + "): " + "; ".join(f"trial {c.number}{' (default)' if c.default else ''} {c.mean:.4f}" for c in cands))
    return cands


def _log_margin(cands: list[Candidate], pick: Optional[Candidate], recheck: Recheck, log) -> None:
    """Say why the default was kept over a better mean, or that the margin could not be checked."""
    top = max(cands, key=lambda c: (c.mean, -c.number), default=None)
    default = next((c for c in cands if c.default), None)
    if top is None or default is None or top is default:
        return
    edge = top.mean - default.mean
    if top.edge_se is None:
        log(f"masknet tune: trial {top.number} has no saved validation scores (a re-check from an older masknet): "
            f"chosen on its mean alone, {edge:+.4f} over the default")
    elif pick is default:
        log(f"masknet tune: trial {top.number}'s edge over the default, {edge:+.4f} (SE {top.edge_se:.4f}), is within "
            f"{recheck.margin_se:g} SE: best.yaml is the default")
    else:
        log(f"masknet tune: trial {top.number} beats the default by {edge:+.4f} (SE {top.edge_se:.4f})")


def _completed(optuna, study) -> bool:
    return bool(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))


def _config_params(params: dict[str, Any], space: SearchSpace) -> dict[str, Any]:
    """Optuna's flat parameters back to config values (a Layers key is two parameters)."""
    out = {}
    for key in trial_keys(params, space):  # a default trial sets only the keys its ranges can express
        if isinstance(space[key], Layers):
            out[key] = [params[f"{key}.width"]] * params[f"{key}.depth"]
        else:
            out[key] = params[key]
    return out
