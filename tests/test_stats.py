"""The paired statistics against hand-worked examples."""

from __future__ import annotations

import numpy as np
import pytest

from mnq_search.stats import holm, pack, paired_comparison, unpack


def test_mcnemar_and_difference_by_hand():
    # 10 images: a alone right on 3 (images 0-2), b alone right on 0, both right on 4, both wrong on 3
    a = np.array([1, 1, 1, 1, 1, 1, 1, 0, 0, 0], bool)
    b = np.array([0, 0, 0, 1, 1, 1, 1, 0, 0, 0], bool)
    r = paired_comparison(a, b)
    assert r["diff"] == pytest.approx(30.0) and (r["a_only"], r["b_only"]) == (3, 0)
    assert r["p"] == pytest.approx(0.25)  # two-sided binomial: 2 * 0.5**3
    # 6 discordant images split 5 / 1: p = 2 * (C(6,0) + C(6,1)) / 2**6 = 14 / 64
    a = np.array([1] * 5 + [0] + [1] * 4, bool)
    b = np.array([0] * 5 + [1] + [1] * 4, bool)
    assert paired_comparison(a, b)["p"] == pytest.approx(14 / 64)
    same = paired_comparison(a, a)
    assert same["diff"] == 0 and same["p"] == 1.0 and same["lo"] == same["hi"] == 0


def test_bootstrap_interval_matches_resampling_images():
    rng = np.random.default_rng(3)
    a = rng.random(400) < 0.8
    b = np.where(rng.random(400) < 0.9, a, ~a)
    r = paired_comparison(a, b, n_boot=20000, seed=1)
    idx = rng.integers(0, 400, size=(20000, 400))  # the textbook bootstrap over image indices
    boot = 100 * (a[idx].mean(1) - b[idx].mean(1))
    lo, hi = np.quantile(boot, [0.025, 0.975])
    assert r["lo"] == pytest.approx(lo, abs=0.3) and r["hi"] == pytest.approx(hi, abs=0.3)
    assert r["lo"] < r["diff"] < r["hi"]
    assert paired_comparison(a, b, seed=1) == paired_comparison(a, b, seed=1)  # seeded


def test_holm_by_hand():
    assert holm([0.01, 0.04, 0.03, 0.20]) == pytest.approx([0.04, 0.09, 0.09, 0.20])
    assert holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])


def test_pack_round_trip():
    c = np.random.default_rng(0).random(10_001) < 0.5
    assert np.array_equal(unpack(pack(c), c.size), c) and pack(c).nbytes == 1251
