"""Line searches never return a point worse than the start."""

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st

from gnopt import line_search


def quadratic_along(curvature, slope, loss0=1.0):
    return lambda a: loss0 + slope * a + 0.5 * curvature * a ** 2


@given(curvature=st.floats(-5.0, 50.0), slope=st.floats(-5.0, 5.0),
       search=st.sampled_from([line_search.grid(5), line_search.grid(10), line_search.backtracking()]))
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
