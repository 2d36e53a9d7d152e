"""``gnopt.schedules.inner_cosine``: ⌈0.1·N⌉ warm-up steps, values, argument checks."""

import math
from fractions import Fraction

import jax.numpy as jnp
import numpy as np
import pytest

from gnopt.schedules import inner_cosine


def reference(t, peak, n, warmup, init_fraction, final_fraction):
    """Linear warm-up over ``warmup`` steps, then a cosine to ``final_fraction · peak`` at ``n``."""
    if t < warmup:
        return peak * (init_fraction + (1 - init_fraction) * t / warmup)
    progress = min(1.0, (t - warmup) / (n - warmup))
    end = final_fraction * peak
    return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * progress))


def values(schedule, n):
    return np.asarray(schedule(jnp.arange(n + 1)), np.float64)


def warmup_of(schedule, n, peak):
    """The first step at which the schedule reaches ``peak``."""
    return int(np.argmax(np.isclose(values(schedule, n), peak, rtol=1e-6)))


@pytest.mark.parametrize("n, warmup", [(122, 13), (10, 1), (30, 3), (11, 2), (20, 2), (21, 3),
                                       (5, 1), (2, 1)])
def test_inner_cosine_warms_up_for_ceil_of_a_tenth_of_the_steps(n, warmup):
    peak = 3.0
    v = values(inner_cosine(peak, n), n)
    assert v[0] == pytest.approx(0.1 * peak)
    assert v[warmup] == pytest.approx(peak)
    assert np.all(v[:warmup] < peak * (1 - 1e-4))  # not reached earlier
    assert np.all(np.diff(v[:warmup + 1]) > 0)  # rising during the warm-up
    assert v[n] == pytest.approx(0.0, abs=1e-6)


def test_inner_cosine_warmup_is_the_exact_ceiling():
    """Against exact rational arithmetic (no float error): ⌈p/100 · N⌉, at most N − 1."""
    cases = [(percent, n) for percent in (1, 10, 30, 70) for n in (2, 3, 10, 30, 70, 99, 122)]
    cases += [(7, 100), (14, 50), (28, 25)]  # 0.07 · 100 = 7.000000000000001 in floats
    for percent, n in cases:
        expected = min(n - 1, math.ceil(Fraction(percent, 100) * n))
        schedule = inner_cosine(1.0, n, percent / 100)
        before, at = np.asarray(schedule(jnp.array([expected - 1, expected])))
        assert before < 1.0 - 1e-4 and at == pytest.approx(1.0), (percent, n)


@pytest.mark.parametrize("n, init_fraction, final_fraction", [(122, 0.1, 0.0), (30, 0.2, 0.1),
                                                              (10, 0.5, 0.3)])
def test_inner_cosine_matches_an_independent_formula(n, init_fraction, final_fraction):
    peak = 0.02
    warmup = math.ceil(round(0.1 * n, 9))
    v = values(inner_cosine(peak, n, 0.1, init_fraction, final_fraction), n + 5)
    expected = [reference(t, peak, n, warmup, init_fraction, final_fraction) for t in range(n + 6)]
    np.testing.assert_allclose(v, expected, rtol=1e-5, atol=1e-9)


def test_inner_cosine_edge_cases():
    # one step: no warm-up, the single step is at the peak
    assert values(inner_cosine(2.0, 1), 1)[0] == pytest.approx(2.0)
    # no warm-up fraction: starts at the peak
    v = values(inner_cosine(2.0, 10, warmup_fraction=0.0), 10)
    assert v[0] == pytest.approx(2.0) and np.all(np.diff(v) <= 1e-7)
    # a full warm-up fraction is capped at N − 1 steps
    assert warmup_of(inner_cosine(1.0, 10, warmup_fraction=1.0), 10, 1.0) == 9
    # peak 0 is allowed (an all-zero schedule); NumPy scalars are accepted
    assert np.all(values(inner_cosine(0.0, 10), 10) == 0.0)
    assert values(inner_cosine(np.float32(2.0), np.int64(10)), 10)[1] == pytest.approx(2.0)


@pytest.mark.parametrize("kwargs, message", [
    (dict(peak=float("nan")), r"peak must be finite and >= 0, got nan"),
    (dict(peak=float("inf")), r"peak must be finite and >= 0, got inf"),
    (dict(peak=-0.1), r"peak must be finite and >= 0, got -0.1"),
    (dict(num_steps=0), r"num_steps must be an integer >= 1, got 0"),
    (dict(num_steps=2.5), r"num_steps must be an integer >= 1, got 2.5"),
    (dict(warmup_fraction=1.5), r"warmup_fraction must be in \[0, 1\], got 1.5"),
    (dict(warmup_fraction=-0.1), r"warmup_fraction must be in \[0, 1\], got -0.1"),
    (dict(init_fraction=float("nan")), r"init_fraction must be in \[0, 1\], got nan"),
    (dict(final_fraction=2.0), r"final_fraction must be in \[0, 1\], got 2.0"),
])
def test_inner_cosine_rejects_bad_arguments(kwargs, message):
    args = dict(peak=1.0, num_steps=10) | kwargs
    with pytest.raises(ValueError, match=r"^inner_cosine: " + message + "$"):
        inner_cosine(**args)
