"""Two-phase fits: LR first, then what the model adds to it (docs/model.md, "FM: LR first" and
"MaskNet: LR first").

An FM contains LR: with every factor at zero its pairwise term is zero, and so is every factor's
gradient (v_i's is Σ_{j≠i} v_j · dL/dlogit), so Adam leaves them there. A MaskNet with a first-order
term (`model.linear_term`) contains LR too: with its prediction layer at zero the deep part adds
nothing, and in phase 1 it is not even run; so does a DeepFM with its embedding and its tower's
output unit at zero (fitted LR first: the same key). Phase 1 therefore holds the second phase's part at
exactly zero (`CTRModel.hold_second_phase`) and runs `train.l2_prior` (LR's path) at
`train.first_phase_lr`: it is the LR run, step for step. When that path runs out (or its step
budget does), the best evaluation so far is restored, the linear tables keep the prior of the stage
that evaluation came from, the second part is released (FM: the factors start from a small random
draw; MaskNet: the deep part joins from its prediction layer at zero, so the logit starts at LR's),
and phase 2 runs `train.factor_prior`, a path of priors on the factor tables alone (a MaskNet's:
[0], none), strong to weak, at `train.lr` with a warm-up and a step budget of its own. The best
evaluation of either phase is kept, so on validation the model is never below its own LR stage.

A model takes part through `CTRModel.factor_tables()` and its phase hooks (FM, the MaskNets with a
first-order term, DeepFM fitted LR first; [] for every other model, which then trains as before); an empty
`train.factor_prior` turns the phases off.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..config import TrainConfig
from ..models.base import CTRModel
from ..models.layers import FieldEmbedding

if TYPE_CHECKING:
    from .trainer import L2Prior, Schedule, TrainState


@dataclass
class FactorPhase:
    tables: list[FieldEmbedding]  # the tables phase 2 brings in (empty: no phases)
    path: list[float]  # train.factor_prior

    @classmethod
    def for_run(cls, model: CTRModel, cfg: TrainConfig) -> "FactorPhase":
        return cls(model.factor_tables(), list(cfg.factor_prior or []))

    @property
    def enabled(self) -> bool:
        return bool(self.tables and self.path)

    def factor_ids(self) -> frozenset[int]:
        return frozenset(id(t) for t in self.tables) if self.enabled else frozenset()

    def hold_at_zero(self, model: CTRModel) -> None:
        """Phase 1 starts with phase 2's part at zero (where it stays: the model is LR)."""
        model.hold_second_phase()

    def set_prior(self, prior: "L2Prior", state: "TrainState", cfg: TrainConfig) -> None:
        """The prior in force: the l2_prior path's value on the linear tables (in phase 2, the stage
        of phase 1's best evaluation), and on the factor tables c_factors."""
        prior.c = cfg.l2_prior[state.prior_stage] if cfg.l2_prior else 0.0
        if self.enabled:
            prior.c_factors = self.c_factors(state)

    def c_factors(self, state: "TrainState") -> float:
        """The prior on the factor tables now: 0 in phase 1 (they are zero), the path's value in phase 2."""
        return self.path[state.factor_stage] if state.factor_stage >= 0 else 0.0

    def pending(self, state: "TrainState") -> bool:
        """Phase 1 has ended and phase 2 has not begun."""
        return self.enabled and state.factor_stage < 0

    def end_step(self, schedule: "Schedule", cfg: TrainConfig, state: "TrainState") -> int:
        """The global step the current phase ends at. Each phase gets the schedule's budget; a hard
        cap (train.max_steps) is the whole run's, and phase 1 takes at most half of it."""
        if not self.enabled:
            return schedule.last_step
        if state.factor_stage < 0:
            return min(schedule.budget_steps, math.ceil(cfg.max_steps / 2)) if cfg.max_steps else schedule.budget_steps
        end = state.phase_start + schedule.budget_steps
        return min(end, cfg.max_steps) if cfg.max_steps else end

    @torch.no_grad()
    def begin(self, model: CTRModel, state: "TrainState", best_weights: dict[str, torch.Tensor], seed: int) -> None:
        """Phase 2: from the best evaluation so far, with the linear tables at that stage's prior and
        phase 2's part released (its draw seeded by the run's seed: a resumed run draws the same)."""
        model.load_state_dict(best_weights)
        model.release_second_phase(torch.Generator().manual_seed(seed))
        state.prior_stage = state.best_prior_stage
        state.factor_stage, state.bad_evals, state.phase_start = 0, 0, state.global_step
