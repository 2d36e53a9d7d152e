"""Line searches never return a point worse than the start."""

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st

from gnopt import line_search


def quadratic_along(curvature, slope, loss0=1.0):
    return lambda a: loss0 + slope * a + 0.5 * curvature * a ** 2


@given(curvature=st.floats(-5.0, 50.0), slope=st.floats(-5.0, 5.0),
       search=st.sampled_from([line_search.grid(5), line_search.grid(10), line_search.backtracking(),
                               line_search.grid(10, stop_at_rise=True)]))
def test_never_worse_than_start(curvature, slope, search):
    f = quadratic_along(curvature, slope)
    alpha, stats = search.search(f, f(0.0), lambda: slope)
    assert float(f(alpha)) <= 1.0
    assert float(stats["line_search_loss"]) <= 1.0
    np.testing.assert_allclose(stats["line_search_loss"], f(alpha), rtol=1e-6)


def test_grid_picks_the_best_candidate():
    f = quadratic_along(4.0, -1.0)  # minimum at α = 0.25 = 2^(-4/2)
    alpha, _ = line_search.grid(5).search(f, f(0.0), lambda: -1.0)
    assert float(alpha) == pytest.approx(0.25)
    alpha, _ = line_search.grid(3).search(lambda a: jnp.where(a > 0, jnp.nan, 1.0), 1.0, lambda: 0.0)
    assert float(alpha) == 0.0  # non-finite candidates rejected: no step


def test_backtracking_armijo_and_increase_flag():
    f = quadratic_along(10.0, -1.0)
    alpha, stats = line_search.backtracking(c=0.1).search(f, f(0.0), lambda: -1.0)
    assert float(f(alpha)) <= 1.0 - 0.1 * float(alpha)
    assert float(alpha) == pytest.approx(0.125)
    uphill = quadratic_along(1.0, 1.0)
    alpha, _ = line_search.backtracking(max_evals=3).search(uphill, 1.0, lambda: 1.0)
    assert float(alpha) == 0.0
    alpha, _ = line_search.grid(2, allow_increase=True).search(uphill, 1.0, lambda: 1.0)
    assert float(alpha) > 0.0
    with pytest.raises(ValueError, match="shrink"):
        line_search.backtracking(shrink=1.5)


@given(curvature=st.floats(0.05, 50.0), slope=st.floats(-5.0, 5.0), num=st.integers(1, 10))
def test_stop_at_rise_matches_the_full_grid_on_unimodal_losses(curvature, slope, num):
    f = quadratic_along(curvature, slope)  # convex in α: unimodal

    full_alpha, full = line_search.grid(num).search(f, f(0.0), lambda: slope)
    early_alpha, early = line_search.grid(num, stop_at_rise=True).search(f, f(0.0),
                                                                          lambda: slope)
    assert float(early_alpha) == float(full_alpha)
    np.testing.assert_allclose(early["line_search_loss"], full["line_search_loss"], rtol=1e-6)
    # Evaluations: the best candidate k, one more to see the rise, never more than num.
    alphas = np.asarray(line_search.grid(num).candidates())
    k = int(np.argmin([float(f(a)) for a in alphas]))
    assert int(early["line_search_evals"]) == min(k + 2, num)
    assert int(full["line_search_evals"]) == num


def test_stop_at_rise_skips_non_finite_large_steps_and_stops_early():
    f = quadratic_along(4.0, -1.0)  # minimum at α = 0.25 (candidate 4)
    blown_up = lambda a: jnp.where(a > 0.9, jnp.nan, f(a))  # α = 1 diverges
    alpha, stats = line_search.grid(10, stop_at_rise=True).search(blown_up, f(0.0), lambda: -1.0)
    assert float(alpha) == pytest.approx(0.25)
    assert int(stats["line_search_evals"]) == 6
