"""The MGH least-squares set (gnopt.testing.mgh) and LM-damped GN on a few of its problems."""

import argparse
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gnopt.bench import nls
from gnopt.testing import mgh


@pytest.fixture(autouse=True)
def fast_compile():
    """These graphs are tiny: XLA's optimisation passes cost more than they save."""
    saved = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    try:
        yield
    finally:
        jax.config.update("jax_disable_most_optimizations", saved)


def _f(number, x, **sizes):
    problem = mgh.make(number, **sizes) if sizes else mgh.make(number)
    return float(problem.value(jnp.asarray(x, jnp.float64)))


@functools.cache
def _at_start():
    """``{number: (f(x0), J(x0)·1 finite)}`` for all 35, in one compiled call (float64;
    op-by-op evaluation of 35 problems costs a minute of dispatch on a small CPU)."""
    assert jax.config.read("jax_enable_x64")

    @jax.jit
    def evaluate(points):
        out = []
        for p, x in zip(mgh.PROBLEMS, points):
            r, tangent = jax.jvp(p.residual, (x,), (jnp.ones_like(x),))
            out.append((jnp.sum(r * r), jnp.all(jnp.isfinite(tangent))))
        return out

    values = evaluate([p.initial_params() for p in mgh.PROBLEMS])
    return {p.number: (float(f), bool(ok)) for p, (f, ok) in zip(mgh.PROBLEMS, values)}


def test_the_table_has_the_35_problems_in_the_papers_order(x64):
    assert [p.number for p in mgh.PROBLEMS] == list(range(1, 36))
    for p in mgh.PROBLEMS:
        x0 = p.initial_params()
        assert x0.dtype == jnp.float64 and x0.shape == (p.n,) and p.m >= p.n
        r = jax.eval_shape(p.residual, x0)
        assert r.shape == (p.m,) and r.dtype == jnp.float64
        f0, finite_jacobian = _at_start()[p.number]
        assert finite_jacobian, p.name
        assert 0 <= p.f_star < f0, p.name
        assert p.note


# f(x0) in closed form (hand-computed from the definitions; most are also the
# values printed in MGH-based test tables).
START_VALUES = {
    1: 24.2,                                           # 10²(1 − 1.44)² + 2.2²
    2: 400.5,                                          # 19.5² + 4.5²
    3: 1.0 + (math.exp(-1.0) - 1e-4) ** 2,
    4: (1.0 - 1e6) ** 2 + (1.0 - 2e-6) ** 2 + 1.0,
    5: 1.5 ** 2 + 2.25 ** 2 + 2.625 ** 2,              # x2 = 1: r_i = y_i
    7: 2500.0,                                         # θ = 1/2: r = (−50, 0, 0)
    13: 215.0,                                         # 49 + 5 + 1 + 160
    14: 19192.0,
    20: 30.0,                                          # x0 = 0: 29 residuals −1 and r31 = −1
    21: 5 * 24.2,
    22: 3 * 215.0,
    23: 1e-5 * sum((j - 1) ** 2 for j in range(1, 11)) + (385 - 0.25) ** 2,
    25: 3.85 + 38.5 ** 2 + 38.5 ** 4,                  # Σ j(x_j − 1) = −Σ j²/n = −38.5
    30: 8 * 1.0 + 2.0 ** 2 + 3.0 ** 2,                 # r = (−2, −1, ..., −1, −3)
    31: 10 * 36.0,                                     # r_i = −7 + 1 − 0
    32: 10 * 1.0 + 10 * 4.0,                           # Σx = 10: r = −1 (i ≤ n), −2 (i > n)
    33: sum((55 * i - 1) ** 2 for i in range(1, 21)),  # Σ j x_j = 55
    34: 2 + sum((44 * (i - 1) - 1) ** 2 for i in range(2, 20)),  # Σ_{j=2}^{9} j = 44
}


@pytest.mark.parametrize("number", sorted(START_VALUES))
def test_value_at_the_standard_start(x64, number):
    assert _at_start()[number][0] == pytest.approx(START_VALUES[number], rel=1e-12)


# Points where f is known exactly: the paper's minimisers and other closed forms.
KNOWN_POINTS = [
    (1, [1.0, 1.0], 0.0),
    (2, [5.0, 4.0], 0.0),
    (4, [1e6, 2e-6], 0.0),
    (5, [3.0, 0.5], 0.0),
    (7, [1.0, 0.0, 0.0], 0.0),
    (11, [50.0, 25.0, 1.5], 0.0),
    (12, [1.0, 10.0, 1.0], 0.0),
    (12, [10.0, 1.0, -1.0], 0.0),
    (12, [2.0, 2.0, 0.0], 0.0),
    (13, [0.0, 0.0, 0.0, 0.0], 0.0),
    (14, [1.0] * 4, 0.0),
    (18, [1.0, 10.0, 1.0, 5.0, 4.0, 3.0], 0.0),
    (21, [1.0] * 10, 0.0),
    (22, [0.0] * 12, 0.0),
    (25, [1.0] * 10, 0.0),
    (26, [0.0] * 10, 0.0),
    (27, [0.0] * 9 + [11.0], 1.0),                      # the paper's f = 1 point
    (32, [-1.0] * 10, 10.0),                           # f* = m − n
    (33, [3.0 / 41.0 / 55.0] * 10, 20 * 19 / (2 * 41)),  # Σ j x_j = 3/(2m+1)
    (34, [3.0 / 37.0 / 44.0] * 10, (400 + 60 - 6) / (2 * 37)),  # Σ_{j=2}^{n-1} j x_j = 3/(2m−3)
]


@functools.cache
def _at_known_points():
    assert jax.config.read("jax_enable_x64")
    evaluate = jax.jit(lambda points: [mgh.problem(k).value(x) for (k, _, _), x
                                       in zip(KNOWN_POINTS, points)])
    values = evaluate([jnp.asarray(x, jnp.float64) for _, x, _ in KNOWN_POINTS])
    return [float(v) for v in values]


@pytest.mark.parametrize("index", range(len(KNOWN_POINTS)))
def test_value_at_known_points(x64, index):
    number, x, f = KNOWN_POINTS[index]
    assert _at_known_points()[index] == pytest.approx(f, rel=1e-12, abs=1e-20), (number, x)


def test_published_minima_at_published_minimisers(x64):
    # Jennrich–Sampson: x* = (0.2578, 0.2578) to 4 digits, a stationary point.
    assert _f(6, [0.2578, 0.2578]) == pytest.approx(124.362, rel=1e-5)
    # Brown almost-linear: (a, ..., a, a^(1-n)) with n a^n − (n+1) a^(n−1) + 1 = 0, a ≠ 1.
    n = 10
    roots = np.roots([n, -(n + 1)] + [0] * (n - 2) + [1])
    a = min(r.real for r in roots if abs(r.imag) < 1e-12 and 0 < r.real < 0.999)
    assert _f(27, [a] * (n - 1) + [a ** (1 - n)]) < 1e-20


def test_chebyquad_at_chebyshev_quadrature_nodes(x64):
    # m = n = 2, 3: equal-weight quadrature on [0, 1] exact to degree n makes f = 0.
    for n, half_widths in [(2, [1 / (2 * math.sqrt(3))]), (3, [1 / (2 * math.sqrt(2)), 0.0])]:
        nodes = sorted({0.5 + s * w for w in half_widths for s in (-1, 1)})
        assert _f(35, nodes, n=n, m=n) < 1e-28
        assert mgh.make(35, n=n, m=n).f_star == 0.0


def test_sizes_and_published_minima_follow_n_and_m(x64):
    assert mgh.make(20, n=9).f_star == 1.39976e-6 and mgh.make(20, n=9).m == 31
    assert mgh.make(32, n=5, m=10).f_star == 5.0
    assert math.isnan(mgh.make(6, m=12).f_star)
    with pytest.raises(ValueError):
        mgh.make(1, n=3)
    with pytest.raises(ValueError):
        mgh.make(22, n=10)


def _options(**overrides):
    return argparse.Namespace(**{**nls.FULL, **overrides})


@pytest.mark.parametrize("number, controller", [
    (6, "pi"),       # the repro: Jennrich–Sampson, f* = 124.362
    (8, "nielsen"),  # Bard, f* = 8.21487e-3
    (13, "pi"),      # Powell singular: singular Jacobian at x* = 0
])
def test_lm_damped_gn_reaches_the_published_minimum(x64, number, controller):
    p = mgh.problem(number)
    row = nls.solve(p, controller, _options(max_steps=100))  # raises if a rejected step moved x
    assert row["reached"], row["f"]
    assert abs(row["f"] - p.f_star) <= 1e-5 * p.f_star + 1e-14
    assert not row["rose"] and row["max_rise"] <= 0.0
    kept = [b for a, b in zip(row["f_curve"], row["f_curve"][1:]) if b != a]
    assert all(b < a for a, b in zip(row["f_curve"], row["f_curve"][1:]) if b != a) and kept
    assert row["kept_steps"] + row["rejected_steps"] == row["outer_steps"]
