"""The statistics behind every verdict: intervals that cover what they should, and the one verdict rule."""
import math

import numpy as np
import pytest

from nanopeft.course.stats import FAILS, HOLDS, UNSETTLED, Interval, exact, first_crossing, paired_bootstrap, verdict


def simulated(rng, seeds, tickets, p_a, p_b, seed_sd=0.03):
    """Correct/incorrect per (seed, ticket) for two methods: tickets have their own difficulty (shared by both
    methods, which is what pairing exploits), seeds shift a method's accuracy a little."""
    difficulty = rng.normal(0, 1.0, tickets)
    out = []
    for p in (p_a, p_b):
        base = math.log(p / (1 - p))
        shift = rng.normal(0, seed_sd * 4, (seeds, 1))
        prob = 1 / (1 + np.exp(-(base + shift - difficulty)))
        out.append((rng.random((seeds, tickets)) < prob).astype(float))
    return out


def true_difference(p_a, p_b, draws=400_000, seed=1):
    """The population difference of accuracies under `simulated`'s model (tickets and seeds averaged out)."""
    rng = np.random.default_rng(seed)
    d = rng.normal(0, 1.0, draws)
    acc = lambda p: (1 / (1 + np.exp(-(math.log(p / (1 - p)) + rng.normal(0, 0.12, draws) - d)))).mean()  # noqa
    return acc(p_a) - acc(p_b)


def test_the_interval_covers_a_known_difference_about_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    truth = true_difference(0.6, 0.5)
    trials, covered, widths = 150, 0, []
    for i in range(trials):
        a, b = simulated(rng, seeds=5, tickets=300, p_a=0.6, p_b=0.5)
        iv = paired_bootstrap(a, b, resamples=1000, seed=i)
        covered += iv.low <= truth <= iv.high
        widths.append(iv.high - iv.low)
    # 95% nominal; with 150 trials the binomial standard error is 1.8 points, and a bootstrap over only 5 seeds
    # runs a little narrow, so accept 88%..99%
    assert 0.88 <= covered / trials <= 0.99, covered / trials
    assert 0.02 < np.mean(widths) < 0.15


def test_pairing_makes_the_interval_narrower_than_ignoring_shared_ticket_difficulty():
    rng = np.random.default_rng(3)
    a, b = simulated(rng, seeds=5, tickets=300, p_a=0.55, p_b=0.5)
    paired = paired_bootstrap(a, b, seed=0)
    unpaired_b = b[:, rng.permutation(b.shape[1])]  # break the ticket pairing
    unpaired = paired_bootstrap(a, unpaired_b, seed=0)
    assert paired.high - paired.low < unpaired.high - unpaired.low


def test_a_ratio_interval_and_a_single_mean():
    rng = np.random.default_rng(0)
    slow = 1.4 + 0.02 * rng.standard_normal((5, 39))
    fast = 1.0 + 0.02 * rng.standard_normal((5, 39))
    iv = paired_bootstrap(slow, fast, kind="ratio")
    assert 1.38 < iv.low < iv.estimate < iv.high < 1.42
    mean = paired_bootstrap(fast)
    assert mean.low < 1.0 < mean.high


@pytest.mark.parametrize("interval, claim, expected", [
    (Interval(0.05, 0.02, 0.08), (0, 1), HOLDS),  # wholly above zero
    (Interval(0.01, -0.02, 0.04), (0, 1), UNSETTLED),  # crosses the claim's edge
    (Interval(-0.05, -0.08, -0.02), (0, 1), FAILS),  # wholly below
    (Interval(1.4, 1.35, 1.45), (1.3, 1.5), HOLDS),
    (Interval(1.45, 1.4, 1.55), (1.3, 1.5), UNSETTLED),
    (Interval(1.06, 1.04, 1.08), (1.3, 1.5), FAILS),
])
def test_the_verdict_rule(interval, claim, expected):
    assert verdict(interval, *claim) == expected


def test_a_verdict_flips_to_not_settled_when_the_interval_crosses_the_claim():
    rng = np.random.default_rng(5)
    a, b = simulated(rng, seeds=5, tickets=300, p_a=0.7, p_b=0.5)
    assert verdict(paired_bootstrap(a, b), 0, 1) == HOLDS
    few = paired_bootstrap(a[:2, :20], b[:2, :20])  # the same methods, far less evidence: a wide interval
    assert few.low < 0 < few.high and verdict(few, 0, 1) == UNSETTLED


def test_exact_quantities_have_zero_width():
    assert verdict(exact(0.04), -math.inf, 0.05) == HOLDS and verdict(exact(0.06), -math.inf, 0.05) == FAILS


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="same"):
        paired_bootstrap(np.ones((2, 3)), np.ones((2, 4)))
    with pytest.raises(ValueError, match="seeds, items"):
        paired_bootstrap(np.ones(3))


def test_first_crossing_reads_json_keys_too():
    assert first_crossing({"10": 0.2, "20": 0.5, "30": 0.6}, 0.5) == 20
    assert first_crossing({10: 0.2, 20: 0.3}, 0.5) is None
