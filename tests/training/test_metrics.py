"""AUC, log loss and RelaImp (Eq. 20) against scikit-learn and by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import log_loss, roc_auc_score

from masknet.training.metrics import auc, logloss, midranks, paired_auc_difference, relaimp


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("decimals", [0, 1, 2, 6])
def test_auc_equals_sklearn_with_ties(seed, decimals):
    rng = np.random.default_rng(seed)
    n = 2000
    y = rng.random(n) < 0.3
    s = np.round(rng.random(n) + 0.4 * y, decimals)  # decimals=0,1: very many ties
    assert len(np.unique(s)) < n or decimals == 6
    assert abs(auc(y, s) - roc_auc_score(y, s)) < 1e-9


def test_auc_known_values():
    assert auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75, abs=1e-12)
    assert auc([0, 1], [0.2, 0.9]) == 1.0
    assert auc([0, 1], [0.9, 0.2]) == 0.0
    # one tie between a positive and a negative counts one half
    assert auc([0, 1, 1], [0.5, 0.5, 0.9]) == pytest.approx(0.75, abs=1e-12)


def test_auc_edge_cases():
    y = np.array([0, 1, 0, 1, 1, 0, 0])
    assert auc(y, np.full(len(y), 0.3)) == 0.5  # all scores equal
    assert auc(y, np.where(y == 1, 0.7, 0.2)) == 1.0
    assert math.isnan(auc(np.ones(5), np.arange(5)))  # one class only
    assert math.isnan(auc(np.zeros(5), np.arange(5)))
    # order of rows and float32 inputs do not matter
    rng = np.random.default_rng(0)
    yy, ss = rng.random(300) < 0.5, rng.random(300).astype(np.float32)
    perm = rng.permutation(300)
    assert auc(yy, ss) == pytest.approx(auc(yy[perm], ss[perm]), abs=1e-12)
    assert abs(auc(yy, ss) - roc_auc_score(yy, ss)) < 1e-9
    with pytest.raises(ValueError):
        auc(np.zeros(3), np.zeros(4))


def test_auc_is_rank_based():
    rng = np.random.default_rng(1)
    y, s = rng.random(500) < 0.4, rng.normal(size=500)
    assert auc(y, s) == pytest.approx(auc(y, np.exp(3 * s)), abs=1e-12)
    assert auc(y, -s) == pytest.approx(1 - auc(y, s), abs=1e-12)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(st.booleans(), st.integers(min_value=0, max_value=6)),
        min_size=2,
        max_size=60,
    ).filter(lambda rows: len({r[0] for r in rows}) == 2)
)
def test_auc_property_equals_sklearn(rows):
    y = np.array([r[0] for r in rows])
    s = np.array([r[1] for r in rows], dtype=np.float64) / 3.0  # few distinct values: many ties
    assert abs(auc(y, s) - roc_auc_score(y, s)) < 1e-9


@pytest.mark.parametrize("seed", range(3))
def test_logloss_equals_sklearn(seed):
    rng = np.random.default_rng(seed)
    y = (rng.random(1000) < 0.25).astype(np.float64)
    p = rng.uniform(0.01, 0.99, 1000)
    assert logloss(y, p) == pytest.approx(log_loss(y, p), rel=1e-12, abs=1e-12)
    by_hand = -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))  # Eq. 18, both terms
    assert logloss(y, p) == pytest.approx(by_hand, rel=1e-12)


def test_logloss_known_value_and_clipping():
    # -(log 0.8 + log 0.6) / 2
    assert logloss([1, 0], [0.8, 0.4]) == pytest.approx(-(math.log(0.8) + math.log(0.6)) / 2, rel=1e-12)
    # the (1 - y) term counts: a confident wrong negative costs
    assert logloss([0], [0.9]) == pytest.approx(-math.log(0.1), rel=1e-12)
    # p = 0 or 1 is clipped, not infinite
    v = logloss([1, 0], [0.0, 1.0])
    assert math.isfinite(v) and v > 10


def test_relaimp_eq20():
    # paper Table 2, Criteo: FM 0.7895, SerMaskNet 0.8119 -> +7.74%
    assert relaimp(0.8119, 0.7895) == pytest.approx((0.8119 - 0.5) / (0.7895 - 0.5) - 1)
    assert round(relaimp(0.8119, 0.7895) * 100, 2) == 7.74
    assert relaimp(0.8, 0.7) == pytest.approx(0.5, abs=1e-12)  # 0.3 / 0.2 - 1
    assert relaimp(0.75, 0.75) == 0.0
    assert relaimp(0.6, 0.7) == pytest.approx(-0.5)
    with pytest.raises(ValueError):
        relaimp(0.8, 0.5)


def _delong_by_pairs(y, a, b):
    """DeLong's variance of AUC(a) - AUC(b) from its definition: every positive-negative pair."""
    y = y.astype(bool)
    comps = []
    for s in (a, b):
        psi = (s[y][:, None] > s[~y][None, :]) + 0.5 * (s[y][:, None] == s[~y][None, :])
        comps.append((psi.mean(axis=1), psi.mean(axis=0)))  # V10 per positive, V01 per negative
    d10, d01 = comps[0][0] - comps[1][0], comps[0][1] - comps[1][1]
    return d10.mean(), math.sqrt(d10.var(ddof=1) / y.sum() + d01.var(ddof=1) / (~y).sum())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_paired_auc_difference_is_delongs_by_its_definition(seed):
    rng = np.random.default_rng(seed)
    y = (rng.random(300) < 0.3).astype(float)
    a = np.round(y + rng.normal(0, 1, 300), 1)  # rounded: ties within and across classes
    b = np.round(0.5 * y + rng.normal(0, 1, 300), 1)
    diff, se = paired_auc_difference(y, a, b)
    ref_diff, ref_se = _delong_by_pairs(y, a, b)
    assert diff == pytest.approx(auc(y, a) - auc(y, b), abs=1e-12)
    assert diff == pytest.approx(ref_diff, abs=1e-12)
    assert se == pytest.approx(ref_se, rel=1e-9)
    assert se > 0


def test_paired_auc_difference_of_a_model_with_itself_is_zero_and_one_class_is_nan():
    rng = np.random.default_rng(3)
    y, s = (rng.random(100) < 0.5).astype(float), rng.random(100)
    assert paired_auc_difference(y, s, 2 * s + 1) == (0.0, 0.0)  # the same ranking
    assert all(math.isnan(v) for v in paired_auc_difference(np.ones(10), s[:10], s[:10]))


def test_midranks_average_ties():
    assert midranks(np.array([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]
