"""retromem.stats: the paired bootstrap used for every reported gain."""

from __future__ import annotations

import numpy as np
import pytest

from retromem.errors import ConfigError
from retromem.stats import BootstrapResult, paired_bootstrap


def test_identical_systems_give_zero_interval():
    a = np.random.default_rng(0).normal(size=500)
    r = paired_bootstrap(a, a.copy())
    assert (r.mean, r.low, r.high) == (0.0, 0.0, 0.0)
    assert r.contains(0.0) and not r.excludes_zero()


def test_interval_contains_mean_and_detects_a_real_shift():
    rng = np.random.default_rng(1)
    b = rng.normal(3.0, 1.0, size=2000)
    a = b - 0.2 + rng.normal(0, 0.5, size=2000)
    r = paired_bootstrap(a, b, n=1000, seed=3)
    assert isinstance(r, BootstrapResult)
    assert r.low <= r.mean <= r.high
    assert r.high < 0 and r.excludes_zero()
    assert r.mean == pytest.approx(float(np.mean(a - b)))
    assert -0.25 < r.mean < -0.15
    # standard error of the mean is 0.5 / sqrt(2000) ~ 0.011: the 95% interval is ~ +-0.022
    assert 0.03 < r.high - r.low < 0.06


def test_no_shift_interval_contains_zero():
    rng = np.random.default_rng(2)
    b = rng.normal(size=1000)
    noise = rng.normal(0, 1, size=1000)
    a = b + noise - noise.mean()  # differences that average exactly 0
    r = paired_bootstrap(a, b, seed=0)
    assert r.mean == pytest.approx(0.0, abs=1e-12)
    assert r.contains(0.0) and not r.excludes_zero()


def test_seed_reproducible_and_level_widens():
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=300), rng.normal(size=300)
    assert paired_bootstrap(a, b, seed=7) == paired_bootstrap(a, b, seed=7)
    assert paired_bootstrap(a, b, seed=7) != paired_bootstrap(a, b, seed=8)
    r90 = paired_bootstrap(a, b, seed=7, level=0.90)
    r99 = paired_bootstrap(a, b, seed=7, level=0.99)
    assert r99.low < r90.low and r99.high > r90.high


def test_groups_resample_whole_documents():
    # Each document has its own offset shared by all its tokens: the tokens are not independent,
    # so resampling tokens gives a falsely narrow interval and resampling documents does not.
    rng = np.random.default_rng(5)
    n_docs, per_doc = 20, 100
    offsets = rng.normal(0, 1.0, size=n_docs)
    d = np.repeat(offsets, per_doc) + rng.normal(0, 0.1, size=n_docs * per_doc)
    docs = np.repeat(np.arange(n_docs), per_doc)
    by_token = paired_bootstrap(d, np.zeros_like(d), seed=0)
    by_doc = paired_bootstrap(d, np.zeros_like(d), groups=docs, seed=0)
    assert by_doc.n_groups == n_docs and by_token.n_groups == n_docs * per_doc
    assert by_doc.mean == pytest.approx(by_token.mean)
    assert (by_doc.high - by_doc.low) > 5 * (by_token.high - by_token.low)
    assert by_doc.low <= by_doc.mean <= by_doc.high


def test_groups_weight_by_item_count_and_accept_strings():
    a = np.array([1.0, 1.0, 1.0, 0.0])
    r = paired_bootstrap(a, np.zeros(4), groups=["x", "x", "x", "y"], n=200)
    assert r.mean == pytest.approx(0.75)
    assert r.n_groups == 2 and r.n_items == 4
    # every resample mixes groups x (mean 1, 3 items) and y (mean 0, 1 item): 0 <= stat <= 1
    assert 0.0 <= r.low <= r.high <= 1.0


def test_as_dict_round_trips():
    r = paired_bootstrap([1.0, 2.0], [0.0, 0.5], n=10)
    assert BootstrapResult(**r.as_dict()) == r


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(a=[1.0, 2.0], b=[1.0]), "same length"),
        (dict(a=[], b=[]), "empty"),
        (dict(a=[1.0, float("nan")], b=[1.0, 2.0]), "finite"),
        (dict(a=[1.0], b=[2.0], n=0), "`n`"),
        (dict(a=[1.0], b=[2.0], level=1.0), "`level`"),
        (dict(a=[1.0, 2.0], b=[2.0, 3.0], groups=[0]), "`groups`"),
    ],
)
def test_bad_arguments_raise_config_error(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        paired_bootstrap(**kwargs)
