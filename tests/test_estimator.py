"""masknet.MaskNetClassifier / CTRClassifier / load: the scikit-learn API over prepare + train_run.

Tiny models throughout (block width 8, one block, one thread): these tests check the plumbing
(same encoder and trainer as the CLI, scikit-learn's contract, bundles), not model quality.
"""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import warnings

import numpy as np
import pandas as pd
import polars as pl
import pyarrow as pa
import pytest
from sklearn.compose import ColumnTransformer
from sklearn.exceptions import NotFittedError
from sklearn.model_selection import GridSearchCV, cross_val_score
from sklearn.pipeline import Pipeline
from sklearn.utils.estimator_checks import check_classifiers_train, parametrize_with_checks

import masknet
from masknet.estimator import SKLEARN_EXPECTED_FAILED_CHECKS, EstimatorInputError
from masknet.errors import UserError

from serving_helpers import need

TINY = {"model.block_dim": 8, "model.num_blocks": 1, "model.dnn_hidden": [8], "model.top_mlp": [8], "train.threads": 1}


def tiny(cls=masknet.MaskNetClassifier, **kw):
    params = dict(epochs=2, batch_size=64, learning_rate=0.01, config=dict(TINY))
    params.update(kw)
    return cls(**params)


def toy_frame(n: int = 400, seed: int = 0) -> tuple[pd.DataFrame, np.ndarray]:
    """Two categorical and two numeric columns; the click depends on `ad` and `age`."""
    rng = np.random.default_rng(seed)
    ad = rng.choice(["a", "b", "c", "d"], n)
    city = rng.choice(["x", "y", "z"], n)
    age = rng.integers(18, 70, n).astype(float)
    age[rng.random(n) < 0.1] = np.nan
    price = rng.exponential(10, n)
    logit = np.where(ad == "a", 1.5, -1.0) + np.where(np.nan_to_num(age, nan=40) > 45, 1.0, -0.5)
    y = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(int)
    return pd.DataFrame({"ad": ad, "city": city, "age": age, "price": price}), y


# ---------------------------------------------------------------------------
# scikit-learn's own checks


@parametrize_with_checks(
    [tiny(), tiny(masknet.CTRClassifier, model="deepfm")],
    expected_failed_checks=lambda est: SKLEARN_EXPECTED_FAILED_CHECKS,
)
def test_sklearn_checks(estimator, check):
    check(estimator)


def test_learns_the_checks_toy_problem_with_small_settings():
    """The estimator's tag says poor_score (the defaults take ~10 steps on the checks' 300 rows);
    with small settings it clears scikit-learn's accuracy bar (> 0.83) on that same problem."""
    est = tiny(epochs=20, batch_size=32)
    est.__sklearn_tags__ = lambda: _tags_without_poor_score(est)
    check_classifiers_train("MaskNetClassifier", est)


def test_epochs_is_an_exact_cap_as_on_the_cli():
    """epochs=2 trains at most 2 epochs (the 2,000-step minimum budget does not raise it), as
    `masknet train --epochs 2`; without it the budget applies."""
    X, y = toy_frame()
    capped = tiny(masknet.CTRClassifier, model="lr").fit(X, y)  # about 6 steps per epoch
    assert max(r["epoch"] for r in capped.history_ if "epoch" in r) <= 2
    budget = tiny(masknet.CTRClassifier, model="lr", epochs=None, config={**TINY, "train.min_steps": 40, "train.lr_warmup_steps": 0}).fit(X, y)
    assert max(r["epoch"] for r in budget.history_ if "epoch" in r) > 2  # 10 epochs, raised toward 40 steps


def _tags_without_poor_score(est):
    tags = type(est).__sklearn_tags__(est)
    tags.classifier_tags.poor_score = False
    return tags


def test_import_masknet_stays_light():
    code = "import sys, masknet; print('torch' in sys.modules, 'sklearn' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]
    assert masknet.MaskNetClassifier.__module__ == "masknet.estimator"


# ---------------------------------------------------------------------------
# Frames, schema, validation split


def test_pandas_polars_and_arrow_give_the_same_model():
    X, y = toy_frame()
    probs = []
    for frame in (X, pl.from_pandas(X), pa.Table.from_pandas(X, preserve_index=False)):
        clf = tiny().fit(frame, y)
        assert clf.schema_ == {"ad": "categorical", "city": "categorical", "age": "numeric", "price": "numeric"}
        probs.append(clf.predict_proba(frame)[:, 1])
    np.testing.assert_array_equal(probs[0], probs[1])
    np.testing.assert_array_equal(probs[0], probs[2])
    assert roc(y, probs[0]) > 0.7  # it learned the planted signal


def roc(y, p):
    from sklearn.metrics import roc_auc_score

    return roc_auc_score(y, p)


def test_holdout_is_stratified_and_eval_set_replaces_it(tmp_path):
    X, y = toy_frame(500)
    clf = tiny(validation_fraction=0.2, work_dir=str(tmp_path)).fit(X, y)
    (work,) = tmp_path.iterdir()  # a fresh sub-folder of work_dir, kept
    meta = json.loads((work / "data" / "meta.json").read_text())
    pos, n = int(y.sum()), len(y)
    assert meta["splits"]["valid"]["rows"] == round(0.2 * pos) + round(0.2 * (n - pos))
    assert meta["splits"]["valid"]["positives"] == round(0.2 * pos)
    assert meta["splits"]["train"]["rows"] == n - meta["splits"]["valid"]["rows"]
    assert clf.metrics_["valid"]["auc"] == max(r["valid_auc"] for r in clf.history_)

    Xv, yv = toy_frame(120, seed=1)
    clf2 = tiny().fit(X, y, eval_set=[(Xv, yv)])
    # the best epoch's validation AUC is the eval set's AUC
    assert clf2.metrics_["valid"]["auc"] == pytest.approx(clf2.score(Xv, yv), abs=1e-6)


def test_string_labels_explicit_kinds_and_extra_columns():
    X, y = toy_frame()
    labels = np.where(y == 1, "click", "skip")
    clf = tiny(categorical=["age"], numeric=["price"]).fit(X, labels)
    assert list(clf.classes_) == ["click", "skip"]  # sorted, like scikit-learn; P(skip) is column 1
    assert clf.schema_["age"] == "categorical"
    pred = clf.predict(X.assign(extra=1))  # columns are matched by name; others are ignored
    assert set(pred) <= {"click", "skip"}
    proba = clf.predict_proba(X[["price", "age", "city", "ad"]])  # any order
    np.testing.assert_allclose(proba[:, 1], clf.predict_proba(X)[:, 1])


def test_bad_input_is_one_clear_error():
    X, y = toy_frame(100)
    bad = X.astype({"price": object})
    bad.loc[37, "price"] = "cheap"
    with pytest.raises(EstimatorInputError, match=r"X row \d+: field 'price': not a number: 'cheap'"):
        tiny(numeric=["price"], validation_fraction=0.5).fit(bad, y, eval_set=(X, y))
    clf = tiny(numeric=["price"]).fit(X, y)
    with pytest.raises(EstimatorInputError, match=r"X row 37: field 'price': not a number"):
        clf.predict_proba(bad)
    with pytest.raises(EstimatorInputError):
        clf.fit(bad, y)
    with pytest.raises(NotFittedError):  # a failed fit leaves no half-fitted (or stale) model behind
        clf.predict(X)
    with pytest.raises(EstimatorInputError, match="multi-valued"):
        tiny().fit(pl.from_pandas(X).with_columns(tags=pl.lit(["a", "b"])), y)
    with pytest.raises(EstimatorInputError, match="lacks column 'city'"):
        tiny().fit(X, y).predict(X.drop(columns="city"))
    with pytest.raises(EstimatorInputError, match="Only binary"):
        tiny().fit(X, np.arange(100) % 3)
    with pytest.raises(EstimatorInputError, match="MaskNetClassifier takes sermasknet or paramasknet"):
        masknet.MaskNetClassifier(model="fm").fit(X, y)
    with pytest.raises(EstimatorInputError, match="also set as a parameter"):
        tiny(config={"train.epochs": 3}).fit(X, y)
    assert issubclass(EstimatorInputError, UserError) and issubclass(EstimatorInputError, ValueError)


# ---------------------------------------------------------------------------
# Bundles


def test_save_load_and_the_cli_read_the_same_bundle(tmp_path):
    from masknet.serving.bundle import verify_and_load
    from masknet.serving.predict import predict_file

    X, y = toy_frame()
    clf = tiny(masknet.CTRClassifier, model="dcn").fit(X, np.where(y == 1, 1, -1))
    out = clf.save(tmp_path / "bundle")
    with pytest.raises(EstimatorInputError, match="exists and is not empty"):
        clf.save(out)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    with pytest.raises(EstimatorInputError, match="not a masknet bundle"):
        clf.save(tmp_path / "notes", overwrite=True)
    assert (tmp_path / "notes" / "keep.txt").read_text() == "mine"
    clf.save(out, overwrite=True)

    back = masknet.load(out)
    assert type(back) is masknet.CTRClassifier and back.model == "dcn"
    assert list(back.classes_) == [-1, 1]
    np.testing.assert_array_equal(back.predict_proba(X), clf.predict_proba(X))
    # `masknet predict` on the same rows as a Parquet file gives the same click probabilities
    X.to_parquet(tmp_path / "rows.parquet")
    predict_file(verify_and_load(out), tmp_path / "rows.parquet", tmp_path / "scores.parquet")
    cli = pd.read_parquet(tmp_path / "scores.parquet")["score"].to_numpy()
    np.testing.assert_allclose(cli, clf.predict_proba(X)[:, 1], rtol=1e-6)
    # pickling carries safetensors + JSON bytes, never a torch object
    again = pickle.loads(pickle.dumps(clf))
    np.testing.assert_array_equal(again.predict_proba(X), clf.predict_proba(X))
    assert b"torch" not in pickle.dumps(clf).split(b"model.safetensors")[0]


def test_load_reads_a_bundle_trained_by_the_cli(tmp_path):
    from masknet.cli import main

    d = need("criteo-8k")
    assert main(["prepare", "--format", "criteo", "--train", str(d / "train.txt"), "--valid", str(d / "valid.txt"),
                 "--test", str(d / "test.txt"), "--output", str(tmp_path / "data")]) == 0
    assert main(["train", "--data", str(tmp_path / "data"), "--epochs", "1", "--quiet", "--output", str(tmp_path / "run"),
                 "--set", "model.block_dim=8", "--set", "model.num_blocks=1", "--set", "train.threads=1"]) == 0
    clf = masknet.load(tmp_path / "run")
    assert clf.model == "sermasknet" and list(clf.classes_) == [0, 1] and clf.n_features_in_ == 39
    test = read_criteo(d / "test.txt")
    auc = clf.score(test.drop("label"), test["label"])
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert auc == pytest.approx(metrics["test"]["auc"], abs=1e-6)  # same rows, same encoder, same model


def read_criteo(path):
    from masknet.data.formats import CRITEO_COLUMNS

    return pl.read_csv(path, separator="\t", has_header=False, new_columns=CRITEO_COLUMNS,
                       schema_overrides={f"C{i}": pl.String for i in range(1, 27)})


# ---------------------------------------------------------------------------
# Model selection


def test_cross_val_score_pipeline_and_grid_search():
    X, y = toy_frame(300)
    scores = cross_val_score(tiny(), pl.from_pandas(X), y, cv=3)
    assert scores.shape == (3,) and np.all((scores > 0.5) & (scores <= 1.0))
    pipe = Pipeline([
        ("columns", ColumnTransformer([("keep", "passthrough", ["ad", "age"])], verbose_feature_names_out=False).set_output(transform="pandas")),
        ("clf", tiny(masknet.CTRClassifier, model="fm")),
    ])
    pipe.fit(X, y)
    assert list(pipe[-1].feature_names_in_) == ["ad", "age"]
    assert 0.5 < pipe.score(X, y) <= 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        grid = GridSearchCV(tiny(), {"learning_rate": [0.003, 0.01]}, cv=2).fit(X, y)
    assert grid.best_params_["learning_rate"] in (0.003, 0.01)


def test_load_a_synthetic_data_bundle_takes_integer_indices(tmp_path):
    import torch

    from masknet.cli import main
    from masknet.data.synthetic import generate
    from masknet.training.run import load_model

    assert main(["train", "--epochs", "1", "--quiet", "--output", str(tmp_path / "run"), "--set", "data.synthetic.rows=1000",
                 "--set", "model.block_dim=8", "--set", "model.num_blocks=1", "--set", "train.threads=1"]) == 0
    clf = masknet.load(tmp_path / "run")
    x = generate(1000, seed=7).splits["test"].x[:50].astype(np.int64)
    frame = pd.DataFrame(x, columns=list(clf.feature_names_in_))
    with torch.inference_mode():
        expected = torch.sigmoid(load_model(tmp_path / "run")(torch.from_numpy(x))).double().numpy()
    np.testing.assert_allclose(clf.predict_proba(frame)[:, 1], expected, rtol=1e-6)
    bad = frame.copy()
    bad.iloc[0, 0] = 10**6
    with pytest.raises(EstimatorInputError, match="indices must lie in"):
        clf.predict(bad)
