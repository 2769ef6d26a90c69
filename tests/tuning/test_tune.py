"""`masknet tune`: outputs, repeatability, resume after a kill, bad search spaces, and every
registered model's declared search space."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("optuna", reason="masknet tune needs Optuna (pip install 'masknet[tune]')")

from masknet.cli import main  # noqa: E402
from masknet.config import RunConfig, load_config  # noqa: E402
from masknet.models import REGISTRY  # noqa: E402
from masknet.training.metrics import auc, paired_auc_difference  # noqa: E402
from masknet.training.run import load_data  # noqa: E402
from masknet.tuning import Recheck, check_space  # noqa: E402
from masknet.tuning.candidates import best  # noqa: E402

# LR on 3,000 built-in rows, at most 24 steps per trial: a trial takes well under a second
TINY = ["--model", "lr", "--set", "data.synthetic.rows=3000", "--set", "train.threads=1", "--max-steps", "24", "--quiet"]


def trials_of(out: Path) -> list[dict]:
    with open(out / "trials.csv") as fh:
        return list(csv.DictReader(fh))


def finished(rows: list[dict]) -> list[tuple]:
    """(parameters, value) of the trials that finished, in order: what a study decided."""
    keys = [k for k in rows[0] if k.startswith("train.") or k.startswith("model.")]
    return [(tuple(r[k] for k in keys), r["valid_auc"]) for r in rows if r["state"] in ("COMPLETE", "PRUNED")]


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tune") / "study"
    assert main(["tune", *TINY, "--trials", "4", "--seed", "3", "--output", str(out)]) == 0
    return out


def test_outputs(study):
    names = {p.name for p in study.iterdir()}
    assert {"study.db", "best.yaml", "trials.csv", "trials.parquet", "history.png", "importances.png", "summary.json"} <= names
    rows = trials_of(study)
    assert [r["number"] for r in rows] == ["0", "1", "2", "3"]
    assert all(r["state"] in ("COMPLETE", "PRUNED") for r in rows)
    assert len({r["train.lr"] for r in rows}) == 4  # the sampler varied the parameters
    for r in rows:
        assert 0.5 < float(r["valid_auc"]) <= 1 and int(r["steps"]) <= 24  # the per-trial cap held
    for png in ("history.png", "importances.png"):
        assert (study / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((study / "summary.json").read_text())
    assert summary["best_valid_auc"] == max(float(r["valid_auc"]) for r in rows if r["state"] == "COMPLETE")
    import pyarrow.parquet as pq

    assert pq.read_table(study / "trials.parquet").num_rows == 4


def test_pruner_is_fed_every_evaluation(study):
    import optuna

    s = optuna.load_study(study_name="masknet", storage=f"sqlite:///{study / 'study.db'}")
    for t in s.trials:
        assert len(t.intermediate_values) == t.user_attrs["evaluations"] > 1
        values = [t.intermediate_values[k] for k in sorted(t.intermediate_values)]
        assert values == sorted(values)  # the best validation AUC so far, at each evaluation


def test_the_pruner_sees_phase_2_only_of_a_masknet_fitted_lr_first(tmp_path):
    """A small SerMaskNet fits LR first (model.linear_term): phase 1 is LR's run, alike in every
    trial, so only phase 2's evaluations reach the pruner, indexed from phase 2's first."""
    import optuna

    out = tmp_path / "study"
    args = ["tune", "--model", "sermasknet", "--set", "data.synthetic.rows=2000", "--set", "model.block_dim=16",
            "--set", "model.num_blocks=1", "--set", "train.threads=1", "--set", "train.eval_min_steps=2",
            "--max-steps", "40", "--trials", "2", "--seed", "3", "--quiet", "--output", str(out)]
    assert main(args) == 0
    s = optuna.load_study(study_name="masknet", storage=f"sqlite:///{out / 'study.db'}")
    for t in s.trials:
        assert 0 < len(t.intermediate_values) < t.user_attrs["evaluations"], t.number
        assert min(t.intermediate_values) == 1


def test_best_yaml_trains_to_the_best_trials_validation_auc(study, tmp_path):
    cfg = load_config(study / "best.yaml")
    assert cfg.model.name == "lr" and cfg.train.max_steps == 24 and cfg.output is None
    best = max((r for r in trials_of(study) if r["state"] == "COMPLETE"), key=lambda r: float(r["valid_auc"]))
    assert cfg.train.lr == pytest.approx(float(best["train.lr"]))
    run = tmp_path / "run"
    assert main(["train", "--config", str(study / "best.yaml"), "--output", str(run), "--quiet"]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["valid"]["auc"] == pytest.approx(float(best["valid_auc"]), abs=1e-12)


def test_same_seed_same_trials_other_seed_other_trials(study, tmp_path):
    again = tmp_path / "again"
    assert main(["tune", *TINY, "--trials", "4", "--seed", "3", "--output", str(again)]) == 0
    assert finished(trials_of(again)) == finished(trials_of(study))
    other = tmp_path / "other"
    assert main(["tune", *TINY, "--trials", "2", "--seed", "4", "--output", str(other)]) == 0
    assert finished(trials_of(other))[1] != finished(trials_of(study))[1]  # trial 0 is the default in both


def test_more_trials_continue_the_study(study, tmp_path):
    import shutil

    more = tmp_path / "more"
    shutil.copytree(study, more)
    assert main(["tune", *TINY, "--trials", "5", "--seed", "3", "--output", str(more)]) == 0
    rows = trials_of(more)
    assert len(rows) == 5 and finished(rows)[:4] == finished(trials_of(study))


class Killed(BaseException):
    """Stands in for SIGKILL: not an Exception, so Optuna neither records nor fails the trial; the
    trial stays RUNNING in study.db, exactly as a killed process leaves it."""


def test_killed_tune_resumes_to_the_uninterrupted_study(study, tmp_path, monkeypatch):
    from masknet.tuning import study as study_module

    calls, original = [0], study_module.run_trial

    def run_trial(cfg, data, on_eval=None, scores_to=None):
        calls[0] += 1
        if calls[0] != 3:
            return original(cfg, data, on_eval, scores_to)

        def dying(record):  # the third trial dies at its second evaluation, after reporting it
            on_eval(record)
            if record["step"] > 5:
                raise Killed

        return original(cfg, data, dying, scores_to)

    monkeypatch.setattr(study_module, "run_trial", run_trial)
    out = tmp_path / "killed"
    args = ["tune", *TINY, "--trials", "4", "--seed", "3", "--output", str(out)]
    with pytest.raises(Killed):
        main(args)
    assert calls[0] == 3
    before = trials_of(out)
    assert [r["state"] for r in before] == ["COMPLETE", "COMPLETE"]  # the table of the trials that finished
    import optuna

    left = optuna.load_study(study_name="masknet", storage=f"sqlite:///{out / 'study.db'}")
    assert [t.state.name for t in left.trials] == ["COMPLETE", "COMPLETE", "RUNNING"]  # what a SIGKILL leaves
    monkeypatch.setattr(study_module, "run_trial", original)
    assert main(args) == 0  # the same command continues the study
    rows = trials_of(out)
    assert [r["state"] for r in rows].count("FAIL") == 1  # the killed trial, run again as a new one
    retried = next(r for r in rows if r["retry_of"])
    assert rows[int(retried["retry_of"])]["state"] == "FAIL"
    assert finished(rows) == finished(trials_of(study))  # same trials, same results as never killed


def test_bad_search_space_key_is_one_line_exit_2(tmp_path, capsys):
    space = tmp_path / "space.yaml"
    space.write_text("train.lrr: {low: 1.0e-4, high: 1.0e-2, log: true}\n")
    assert main(["tune", *TINY, "--trials", "2", "--space", str(space), "--output", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "train.lrr" in err and "unknown config key" in err
    assert not (tmp_path / "s").exists()  # refused before any study was created


@pytest.mark.parametrize(
    "text, expected",
    [
        ("train.lr: {low: 0.1, high: 0.01}\n", "low < high"),
        ("train.batch_size: {choices: [256, -1]}\n", "train.batch_size"),
        ("model.dnn_hidden: {widths: [0], depths: [1]}\n", "widths and depths"),
        ("train.lr: 0.01\n", "expected a mapping"),
        ("output: {choices: [a, b]}\n", "only model.* and train.*"),
    ],
)
def test_bad_ranges_are_one_line_exit_2(tmp_path, capsys, text, expected):
    space = tmp_path / "space.yaml"
    space.write_text(text)
    assert main(["tune", *TINY, "--trials", "2", "--space", str(space), "--output", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err


def test_unknown_model_is_one_line_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["tune", "--model", "nosuchnet", "--trials", "2"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nosuchnet" in err


@pytest.mark.parametrize("margin", ["-1", "nan"])
def test_a_bad_margin_is_one_line_exit_2(margin, tmp_path, capsys):
    assert main(["tune", *TINY, "--trials", "2", "--margin", margin, "--output", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--margin" in err
    assert not (tmp_path / "s").exists()  # refused before a study is opened


def test_other_study_in_output_is_refused(study, capsys):
    assert main(["tune", *TINY, "--trials", "5", "--seed", "9", "--output", str(study)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "different seed" in err


def test_missing_optuna_says_how_to_install(monkeypatch, tmp_path, capsys):
    import builtins

    real_import = builtins.__import__

    def no_optuna(name, *args, **kwargs):
        if name == "optuna" or name.startswith("optuna."):
            raise ImportError("No module named 'optuna'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_optuna)
    assert main(["tune", *TINY, "--trials", "2", "--output", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert "pip install 'masknet[tune]'" in err


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_models_search_space_is_valid(name):
    cfg = RunConfig()
    cfg.model.name = name
    space = REGISTRY[name].search_space
    check_space(space, cfg)  # every key a config key, every edge of every range a valid value
    assert "train.lr" in space


LAYERED = sorted(n for n, e in REGISTRY.items() if "model.dnn_hidden" in e.search_space)  # a widths x depths key


@pytest.mark.parametrize("name", LAYERED)
def test_a_default_with_a_layers_key_runs_as_trial_0(name, tmp_path):
    """Before: the default trial named its keys by Optuna's flat parameters (`model.dnn_hidden.width`),
    so `masknet tune --model deepfm` (every model with a widths x depths key whose default is in the
    grid) failed on its first trial with a KeyError."""
    out = tmp_path / "s"
    args = ["tune", "--model", name, "--set", "data.synthetic.rows=2000", "--set", "train.threads=1", "--max-steps", "4",
            "--trials", "1", "--quiet", "--output", str(out)]
    assert main(args) == 0
    default = trials_of(out)[0]
    assert default["role"] == "default" and default["state"] == "COMPLETE"
    # the models' default hidden layers, [400, 400, 400], as the grid's parameters
    assert (default["model.dnn_hidden.width"], default["model.dnn_hidden.depth"]) == ("400", "3")


# --- the default is a candidate, and the best is re-checked on more seeds (tuning.candidates) ----------


def test_the_default_is_trial_0_and_trains_what_masknet_train_trains(study, tmp_path):
    rows = trials_of(study)
    assert [r["role"] for r in rows] == ["default", "search", "search", "search"]
    default = rows[0]
    assert float(default["train.lr"]) == 1e-2 and default["train.batch_size"] == "1024"  # LR's defaults
    assert default["train.l2_prior"] == ""  # LR's prior path is not one value of the range: left as the default
    run = tmp_path / "default"
    args = ["train", "--model", "lr", "--set", "data.synthetic.rows=3000", "--set", "train.threads=1",
            "--set", "train.max_steps=24", "--output", str(run), "--quiet"]
    assert main(args) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["valid"]["auc"] == pytest.approx(float(default["valid_auc"]), abs=1e-12)


def test_default_settings_take_the_batch_the_default_trains_at():
    from masknet.tuning.candidates import default_settings

    cfg = RunConfig()
    cfg.model.name = "sermasknet"
    settings = default_settings(cfg, REGISTRY["sermasknet"].search_space, train_rows=8000)
    assert settings["train.batch_size"] == 256  # the batch rule's, on 8,000 rows (a study does not halve)
    assert settings["train.lr"] == 1e-3 and "train.l2_prior" not in settings  # no prior: not in 0.01..100
    assert settings["model.embedding_dim"] == cfg.model.embedding_dim


class FakeTrial:
    def __init__(self, number, value, attrs=None, state="COMPLETE"):
        from types import SimpleNamespace

        self.number, self.value, self.user_attrs = number, value, attrs or {}
        self.params, self.state = {"train.lr": 0.001 * (number + 1)}, SimpleNamespace(name=state)


def test_recheck_picks_the_best_mean_not_the_best_single_seed():
    from masknet.tuning.candidates import Recheck, best, candidates, scored

    trials = [FakeTrial(0, 0.70, {"default": True}), FakeTrial(1, 0.74), FakeTrial(2, 0.72), FakeTrial(3, 0.60),
              FakeTrial(4, 0.75, state="PRUNED")]
    cands = candidates(trials, Recheck(top=2, seeds=2))
    assert [c.number for c in cands] == [1, 2, 0]  # the two best complete trials, then the default
    rechecks = {(1, 8): 0.66, (1, 9): 0.67, (2, 8): 0.71, (2, 9): 0.70, (0, 8): 0.71, (0, 9): 0.69}
    trials += [FakeTrial(5 + i, v, {"recheck_of": c, "seed": s}) for i, ((c, s), v) in enumerate(rechecks.items())]
    cands = scored(cands, trials, base_seed=7)
    assert cands[0].values == {7: 0.74, 8: 0.66, 9: 0.67}
    assert best(cands).number == 2  # mean 0.71: trial 1 was best on seed 7 only (mean 0.69)
    trials[-1].value = 0.80  # the default's seed 9: now the best mean (0.7367)
    assert best(scored(cands, trials, base_seed=7)).default


def test_the_default_is_kept_unless_the_best_beats_it_by_the_margin():
    from masknet.tuning.candidates import Candidate, best

    default = Candidate(0, {}, {1: 0.70, 2: 0.70}, default=True)
    top = Candidate(3, {}, {1: 0.72, 2: 0.72}, default=False, edge_se=0.015)  # edge 0.02
    other = Candidate(5, {}, {1: 0.71, 2: 0.71}, default=False, edge_se=0.001)
    assert best([top, other, default]) is top  # no margin: the best mean
    assert best([top, other, default], margin_se=1.0) is top  # 0.02 > 1 x 0.015
    assert best([top, other, default], margin_se=2.0) is default  # 0.02 < 2 x 0.015: not the runner-up either
    top.edge_se = None  # no saved scores (an older study): the mean alone
    assert best([top, other, default], margin_se=2.0) is top
    assert best([top, other], margin_se=2.0) is top  # no default among the candidates


def test_the_edge_se_is_delongs_on_the_saved_scores_over_the_seeds():
    from masknet.training.metrics import paired_auc_difference
    from masknet.tuning.candidates import Candidate, with_edge_se

    rng = np.random.default_rng(0)
    y = (rng.random(400) < 0.25).astype(float)
    scores = {(n, s): y * (0.3 + 0.2 * n) + rng.normal(0, 1, 400) for n in (0, 4) for s in (8, 9)}
    cands = with_edge_se([Candidate(4, {}, {}, False), Candidate(0, {}, {}, True)], y, [8, 9], lambda n, s: scores.get((n, s)))
    ses = [paired_auc_difference(y, scores[4, s], scores[0, s])[1] for s in (8, 9)]
    assert cands[0].edge_se == pytest.approx(math.sqrt((ses[0] ** 2 + ses[1] ** 2) / 2))  # not averaged down
    assert cands[1].edge_se is None  # the default has no edge over itself
    del scores[0, 9]  # a seed the default has no scores for is left out
    assert with_edge_se([Candidate(4, {}, {}, False), Candidate(0, {}, {}, True)], y, [8, 9],
                        lambda n, s: scores.get((n, s)))[0].edge_se == pytest.approx(ses[0])
    quarter = with_edge_se([Candidate(4, {}, {}, False), Candidate(0, {}, {}, True)], y, [8], lambda n, s: scores.get((n, s)), 0.25)
    assert quarter[0].edge_se == pytest.approx(ses[0] / 2)  # scores of a quarter of the rows: SE for all rows


def base_tiny() -> RunConfig:
    base = RunConfig()
    base.model.name = "lr"
    base.data.synthetic.rows = 3000
    base.train.threads = 1
    return base


def tiny_recheck_study(out: Path):
    """6 trials of the tiny LR study: trial 0 the default, 3 search trials, 2 re-checks (top 1 and the default, 1 seed)."""
    from masknet.tuning import study as study_module
    from masknet.tuning.candidates import Recheck

    return study_module.tune(base_tiny(), 6, out, seed=3, max_steps=24, progress=False, recheck=Recheck(top=1, seeds=1, min_trials=1))


def test_a_study_rechecks_its_best_and_the_default_within_its_trials(tmp_path):
    base = RunConfig()
    out = tmp_path / "rechecked"
    r = tiny_recheck_study(out)
    rows = trials_of(out)
    assert len(rows) == 6 and [row["role"] for row in rows] == ["default"] + ["search"] * 3 + ["recheck"] * 2
    rechecks = rows[4:]
    assert [row["seed"] for row in rechecks] == [str(base.train.seed + 1)] * 2
    assert rechecks[1]["recheck_of"] == "0"  # the default, after the best drawn trial
    means = {c.number: c.mean for c in r.rechecked}
    by_number = {int(row["number"]): float(row["valid_auc"]) for row in rows}
    for row in rechecks:  # mean over the base seed (the search trial) and the re-check seed
        n = int(row["recheck_of"])
        assert means[n] == pytest.approx((by_number[n] + float(row["valid_auc"])) / 2)
    chosen = best(r.rechecked, Recheck().margin_se)
    assert r.best_params == chosen.params
    summary = json.loads((out / "summary.json").read_text())
    assert summary["best_trial"] == chosen.number
    labels = load_data(base_tiny()).splits["valid"].y
    for row in rechecks:  # each re-check saved its validation scores: what the margin is computed on
        saved = np.load(out / "scores" / f"trial{row['recheck_of']}-seed{row['seed']}.npy")
        assert saved.shape == (len(labels),) and saved.dtype == np.float32
        assert auc(labels, saved) == pytest.approx(float(row["valid_auc"]), abs=1e-4)
    drawn = next(c for c in summary["recheck"] if not c["default"])
    scores = [np.load(out / "scores" / f"trial{n}-seed{base.train.seed + 1}.npy") for n in (drawn["trial"], 0)]
    assert drawn["edge_se"] == pytest.approx(paired_auc_difference(labels, *scores)[1], rel=1e-6)


def test_a_study_killed_in_its_recheck_resumes_to_the_same_choice(tmp_path, monkeypatch):
    from masknet.tuning import study as study_module

    reference = tiny_recheck_study(tmp_path / "whole")
    calls, original = [0], study_module.run_trial

    def run_trial(cfg, data, on_eval=None, scores_to=None):
        calls[0] += 1
        if calls[0] != 5:  # the first re-check dies at its second evaluation
            return original(cfg, data, on_eval, scores_to)

        def dying(record):
            on_eval(record)
            if record["step"] > 5:
                raise Killed

        return original(cfg, data, dying, scores_to)

    monkeypatch.setattr(study_module, "run_trial", run_trial)
    out = tmp_path / "killed"
    with pytest.raises(Killed):
        tiny_recheck_study(out)
    monkeypatch.setattr(study_module, "run_trial", original)
    again = tiny_recheck_study(out)
    rows = trials_of(out)
    assert [r["role"] for r in rows if r["state"] == "FAIL"] == ["recheck"]  # run again, as itself
    # the same runs (the retried re-check runs after the one that was queued behind it)
    assert sorted(finished(rows)) == sorted(finished(trials_of(tmp_path / "whole")))
    assert [(c.number, c.values) for c in again.rechecked] == [(c.number, c.values) for c in reference.rechecked]
    assert again.best_params == reference.best_params
