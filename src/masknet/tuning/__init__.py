"""Hyperparameter tuning on Optuna (`masknet tune`, `masknet reproduce --tune`), above training.

Optuna is an optional dependency (`pip install 'masknet[tune]'`): it is imported when a study
runs, so everything else works without it.
"""

from .candidates import Recheck
from .space import SearchSpaceError, check_space, load_space
from .study import TuneResult, TuningError, run_trial, tune

__all__ = ["tune", "Recheck", "TuneResult", "TuningError", "SearchSpaceError", "check_space", "load_space", "run_trial"]
