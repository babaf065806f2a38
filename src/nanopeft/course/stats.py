"""Uncertainty done right: paired bootstrap intervals, and one rule that turns an interval into a verdict.

A comparison of two methods rests on two kinds of luck: which tickets happened to be in the test set, and which
seed (the initial A, the order of the batches) each run got. The bootstrap estimates both at once: resample the
seeds with replacement, then the tickets with replacement, recompute the statistic, thousands of times; the middle
95% of the recomputed values is the interval. It is *paired*: both methods are resampled with the same seeds and
the same tickets, so what they share (an easy ticket, a lucky batch order) cancels out of their difference.

The verdict for a claim that an effect lies in [low, high] (e.g. "DoRA beats LoRA": the accuracy difference lies in
(0, 1]; "DoRA is 1.3-1.5x slower": the time ratio lies in [1.3, 1.5]):

    holds            the whole 95% interval lies inside [low, high]
    does not hold    the whole interval lies outside it
    not settled      otherwise; the interval is quoted, so the reader sees how far from settled
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

HOLDS, FAILS, UNSETTLED = "holds", "does not hold", "not settled"
LEVEL = 0.95  # the usual 95% interval
RESAMPLES = 4000  # enough that the interval's ends move by well under a tenth of their width between seeds


@dataclass(frozen=True)
class Interval:
    estimate: float  # the statistic on the data as measured
    low: float
    high: float
    level: float = LEVEL

    def format(self, scale: float = 1.0, unit: str = "", digits: int = 1) -> str:
        f = f"{{:+.{digits}f}}" if self.low < 0 < self.high or self.estimate < 0 else f"{{:.{digits}f}}"
        return (f"{f.format(self.estimate * scale)}{unit} [{f.format(self.low * scale)}, "
                f"{f.format(self.high * scale)}]{unit}")


def exact(value: float) -> Interval:
    """A quantity with no sampling noise (a parameter count, bytes of a tensor): an interval of width zero."""
    return Interval(value, value, value)


def paired_bootstrap(a, b=None, kind: str = "difference", resamples: int = RESAMPLES, seed: int = 0,
                     level: float = LEVEL) -> Interval:
    """A bootstrap interval for mean(a) - mean(b) (kind="difference"), mean(a) / mean(b) ("ratio"), or mean(a)
    alone (b=None).

    a, b: arrays of shape (seeds, items): per seed, one number per ticket (1 if answered right, 0 if not) or per
    step (seconds). Row i of a and row i of b come from the same seed, column j from the same ticket or step. Both
    the rows and the columns are resampled, together for a and b (paired)."""
    a = np.asarray(a, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] < 1 or a.shape[1] < 1:
        raise ValueError(f"a must be (seeds, items), got shape {a.shape}.")
    if b is not None:
        b = np.asarray(b, dtype=np.float64)
        if b.shape != a.shape:
            raise ValueError(f"a and b must have the same (seeds, items) shape, got {a.shape} and {b.shape}.")
    if kind not in ("difference", "ratio"):
        raise ValueError(f"kind must be 'difference' or 'ratio', got {kind!r}.")
    seeds, items = a.shape
    rng = np.random.default_rng(seed)
    # resampling with replacement = drawing how often each seed and each item is taken
    w_seeds = rng.multinomial(seeds, np.full(seeds, 1 / seeds), size=resamples)  # (R, seeds)
    w_items = rng.multinomial(items, np.full(items, 1 / items), size=resamples)  # (R, items)

    def mean(x):  # the weighted mean of x under each resample: (R,)
        return np.einsum("rs,si,ri->r", w_seeds, x, w_items) / (seeds * items)

    if b is None:
        estimate, values = a.mean(), mean(a)
    elif kind == "difference":
        estimate, values = a.mean() - b.mean(), mean(a - b)
    else:
        estimate, values = a.mean() / b.mean(), mean(a) / mean(b)
    tail = (1 - level) / 2
    low, high = np.quantile(values, [tail, 1 - tail])
    return Interval(float(estimate), float(low), float(high), level)


def verdict(interval: Interval, low: float = -math.inf, high: float = math.inf) -> str:
    """The rule of the module docstring, for a claim that the effect lies in [low, high]."""
    if low <= interval.low and interval.high <= high:
        return HOLDS
    if interval.high < low or interval.low > high:
        return FAILS
    return UNSETTLED


def first_crossing(curve: dict, target: float):
    """The first step at which a curve {step: accuracy} reaches `target`; None if it never does."""
    steps = sorted(int(s) for s in curve)
    hit = [s for s in steps if curve_at(curve, s) >= target]
    return hit[0] if hit else None


def curve_at(curve: dict, step: int) -> float:
    """The accuracy at `step` of a curve {step: accuracy} (loaded from JSON, its keys are strings)."""
    return curve[step] if step in curve else curve[str(step)]  # JSON turns the keys into strings
