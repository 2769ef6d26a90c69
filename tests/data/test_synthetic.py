"""The built-in synthetic data: deterministic, chunk-invariant, Criteo-like, and it needs interactions."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from masknet.data import synthetic
from masknet.data.synthetic import generate, write_synthetic
from masknet.training.metrics import auc

SPLITS = ("train", "valid", "test")


@pytest.fixture(scope="module")
def big():
    return generate(125_000, seed=7)  # 100k train / 12.5k valid / 12.5k test


def assert_same(a, b):
    for s in SPLITS:
        np.testing.assert_array_equal(np.asarray(a.splits[s].x), np.asarray(b.splits[s].x))
        np.testing.assert_array_equal(np.asarray(a.splits[s].y), np.asarray(b.splits[s].y))
        np.testing.assert_array_equal(np.asarray(a.splits[s].p), np.asarray(b.splits[s].p))
    assert a.cardinalities == b.cardinalities and a.field_names == b.field_names


def test_deterministic_per_seed():
    a, b, c = generate(2000, 3), generate(2000, 3), generate(2000, 4)
    assert_same(a, b)
    assert not np.array_equal(a.splits["train"].x, c.splits["train"].x)
    assert not np.array_equal(a.splits["test"].p, c.splits["test"].p)
    assert [len(a.splits[s]) for s in SPLITS] == [1600, 200, 200]


def test_chunked_write_equals_in_memory(tmp_path, monkeypatch):
    # small chunks, so that chunks straddle the train/valid (4000) and valid/test (4500) boundaries
    monkeypatch.setattr(synthetic, "CHUNK_ROWS", 700)
    rows, seed = 5000, 5
    seen = []
    on_disk = write_synthetic(tmp_path / "syn", rows, seed, progress=seen.append)
    assert sum(seen) == rows and len(seen) == 8
    assert_same(on_disk, generate(rows, seed))
    assert isinstance(on_disk.splits["train"].x, np.memmap)
    meta_rows = {s: on_disk.meta["splits"][s]["rows"] for s in SPLITS}
    assert meta_rows == {"train": 4000, "valid": 500, "test": 500}


def test_single_chunk_write_equals_in_memory(tmp_path):
    assert_same(write_synthetic(tmp_path / "syn", 1000, 9), generate(1000, 9))


def test_indices_within_cardinalities(big):
    cards = np.asarray(big.cardinalities)
    for s in SPLITS:
        x = np.asarray(big.splits[s].x)
        assert x.shape[1] == len(cards) == 39
        assert x.min() >= 0
        assert (x.max(axis=0) < cards).all()


def test_criteo_like_fields(big):
    kinds = [f["kind"] for f in big.meta["fields"]]
    assert kinds.count("categorical") == 26 and kinds.count("numeric") == 13
    cat_cards = [c for c, k in zip(big.cardinalities, kinds) if k == "categorical"]
    assert min(cat_cards) < 100  # from tens ...
    assert max(cat_cards) >= 100_000  # ... to over 100k
    assert sum(c >= 10_000 for c in cat_cards) >= 3


def test_positive_rate_and_probabilities(big):
    for s in SPLITS:
        y, p = np.asarray(big.splits[s].y), np.asarray(big.splits[s].p)
        assert set(np.unique(y)) == {0, 1}
        assert 0.18 <= y.mean() <= 0.32, (s, y.mean())
        assert ((p > 0) & (p < 1)).all()
        assert abs(y.mean() - p.mean()) < 0.02  # labels are drawn from p


def test_oracle_auc(big):
    test = big.splits["test"]
    assert auc(test.y, test.p) > 0.8


def test_first_order_model_stays_below_oracle(big):
    """The interactions matter: logistic regression on one-hot fields is >= 0.03 AUC below the oracle."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import OneHotEncoder

    train, test = big.splits["train"], big.splits["test"]
    assert len(train) == 100_000
    enc = OneHotEncoder(handle_unknown="ignore")
    x_train = enc.fit_transform(np.asarray(train.x)).tocsr()
    x_test = enc.transform(np.asarray(test.x)).tocsr()
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)  # a non-converged fit would understate LR: fail instead
        lr = LogisticRegression(C=0.1, solver="saga", tol=1e-3, max_iter=200).fit(x_train, train.y)
    lr_auc = auc(test.y, lr.predict_proba(x_test)[:, 1])
    oracle = auc(test.y, test.p)
    assert lr_auc > 0.6  # LR did learn the first-order part
    assert oracle - lr_auc >= 0.03, (oracle, lr_auc)


def test_quick_profile_fields_carry_the_planted_structure():
    """The `reproduce --profile quick` field subset must keep the gate and most planted pairs of
    the default data seed, or its tables would measure a data set without interactions."""
    from masknet.config import SyntheticConfig
    from masknet.experiments.plan import PRESETS

    names = synthetic.field_names()
    keep = set(PRESETS["quick"]["synthetic_fields"])
    planted = synthetic.PlantedModel.draw(SyntheticConfig().seed)
    assert {names[i] for i in synthetic.GATE_FIELDS} <= keep
    kept_pairs = [(a, b) for a, b in planted.pairs if names[a] in keep and names[b] in keep]
    assert len(planted.pairs) == synthetic.NUM_PAIRS
    assert len(kept_pairs) >= synthetic.NUM_PAIRS - 1, [(names[a], names[b]) for a, b in planted.pairs]
