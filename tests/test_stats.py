"""ropelite.stats' intervals: Wilson against values computed by hand from the formula (Wilson 1927; the same as
statsmodels' proportion_confint(method='wilson')), the bootstrap's determinism, coverage and narrowing."""

import math

import numpy as np
import pytest

from ropelite.errors import RopeliteError
from ropelite.stats import Interval, bootstrap_mean, compare, standard_error, wilson


@pytest.mark.parametrize("passed, n, low, high", [
    (0, 10, 0.0, 0.2775), (5, 10, 0.2366, 0.7634), (10, 10, 0.7225, 1.0), (3, 21, 0.0498, 0.3464)])
def test_wilson_matches_the_hand_computed_interval(passed, n, low, high):
    i = wilson(passed, n)
    assert i.estimate == passed / n
    assert i.low == pytest.approx(low, abs=5e-5) and i.high == pytest.approx(high, abs=5e-5)
    assert i.low <= i.estimate <= i.high and i.n == n


def test_wilson_below_three_trials_has_no_interval_and_bad_counts_are_errors():
    assert not wilson(1, 2).known and wilson(1, 2).text() == "0.50 (n=2)"
    for bad in ((3, 2), (-1, 4), (0, 0)):
        with pytest.raises(RopeliteError):
            wilson(*bad)


def test_bootstrap_is_identical_under_the_same_seed_and_differs_under_another():
    x = np.random.default_rng(1).normal(size=30)
    a, b, c = bootstrap_mean(x, seed=7), bootstrap_mean(x, seed=7), bootstrap_mean(x, seed=8)
    assert (a.low, a.high) == (b.low, b.high)
    assert (a.low, a.high) != (c.low, c.high)
    assert a.estimate == pytest.approx(x.mean()) and a.low < a.estimate < a.high


def test_bootstrap_interval_narrows_as_n_grows_and_covers_the_known_mean():
    rng = np.random.default_rng(0)
    widths, covered = [], 0
    for n in (10, 100, 1000):
        x = rng.normal(loc=2.0, scale=1.0, size=n)
        i = bootstrap_mean(x, seed=0, resamples=2000)
        widths.append(i.high - i.low)
        covered += i.low <= 2.0 <= i.high
        # normal theory's 95 % half-width of a mean is 1.96 s / sqrt(n): the bootstrap agrees within 20 %
        assert (i.high - i.low) / 2 == pytest.approx(1.96 * x.std() / math.sqrt(n), rel=0.2)
    assert widths[0] > widths[1] > widths[2]
    assert covered >= 2


def test_bootstrap_of_a_perplexity_exponentiates_the_resampled_mean_nll():
    nll = np.array([2.0, 2.5, 3.0, 2.2])
    i = bootstrap_mean(nll, transform=math.exp)
    assert i.estimate == pytest.approx(math.exp(nll.mean()))
    assert math.exp(nll.min()) <= i.low < i.estimate < i.high <= math.exp(nll.max())


def test_two_dimensional_bootstrap_needs_three_seeds_and_holds_the_seed_spread():
    rng = np.random.default_rng(3)
    two_seeds = rng.normal(size=(2, 20))
    assert not bootstrap_mean(two_seeds).known
    # seeds that differ a lot: the interval over seeds and documents is wider than over documents alone
    spread = np.array([0.0, 1.0, 2.0])[:, None] + rng.normal(scale=0.1, size=(3, 20))
    both, docs_only = bootstrap_mean(spread), bootstrap_mean(spread.reshape(-1))
    assert both.high - both.low > 3 * (docs_only.high - docs_only.low)
    assert both.n == 60


def test_fewer_than_three_units_give_no_interval():
    i = bootstrap_mean([1.0, 2.0])
    assert not i.known and i.estimate == 1.5 and i.fields("ppl") == {"ppl": 1.5, "ppl_low": None,
                                                                       "ppl_high": None, "ppl_n": 2}


def test_standard_error_and_compare():
    assert standard_error([1.0, 2.0, 3.0]) == pytest.approx(1.0 / math.sqrt(3))
    assert standard_error([1.0]) is None
    lo, hi, mid = Interval(1, 0.5, 1.5, 5, "x"), Interval(3, 2.0, 4.0, 5, "x"), Interval(1.8, 1.2, 2.5, 5, "x")
    assert compare(lo, hi) == "lower" and compare(hi, lo) == "higher" and compare(lo, mid) == "overlap"
    assert compare(lo, Interval(1, None, None, 2, "x")) == "unknown"
    assert lo.text(".1f") == "1.0 [0.5, 1.5] (n=5)"
