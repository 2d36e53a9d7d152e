"""The Moré–Garbow–Hillstrom nonlinear least-squares test set, as JAX residuals.

J. J. Moré, B. S. Garbow and K. E. Hillstrom, "Testing unconstrained
optimization software", ACM Trans. Math. Software 7(1):17–41, 1981. The paper
defines 35 problems ``min_x f(x) = Σ_i r_i(x)²`` by their residuals
``r: Rⁿ → Rᵐ``, a standard starting point ``x0`` and the minima known at the
time. Each :class:`MGHProblem` here carries the paper's number and name, its
``n`` and ``m``, ``x0``, the residual as a JAX function of a 1-D array, and the
published minimum ``f*`` **in the paper's convention** ``f = Σ r²`` (a loss
``½‖r‖²`` is ``f / 2``).

Dimensions. The paper leaves ``n`` and/or ``m`` free for 18 of the problems;
:data:`PROBLEMS` fixes them as follows (:func:`make` builds other sizes):

* ``m`` free, ``n`` fixed: Jennrich–Sampson ``m = 10``, Gulf R&D ``m = 99``
  (the largest ``m ≤ 100`` whose abscissae avoid ``t = 1``, where
  ``|y − x2|^x3`` vanishes at ``x*`` and its derivative in ``x3`` is ``0·log 0``
  to autodiff), Box 3-D ``m = 10``, Brown–Dennis ``m = 20``,
  Biggs EXP6 ``m = 13`` — the values for which the paper (or MINPACK's test
  drivers) lists ``f*``;
* ``n`` free: ``n = 10`` for problems 21 and 23–31, ``n = 12`` for the extended
  Powell function (a multiple of 4), Watson ``n = 6`` (``m = 31``), Chebyquad
  ``n = m = 10``; the linear functions 32–34 ``n = 10, m = 20``.

Published minima are given to 6 significant digits; where the paper lists
other (local or at-infinity) minima they are in ``other_minima`` and ``note``.
Problems whose ``f*`` depends on the size use the paper's value for the chosen
size, or a closed form (the linear functions); :func:`make` returns ``nan`` for
``f_star`` where the paper gives no value.

Two transcriptions of the paper are easy to get wrong and are written here as
the paper means them: Gulf R&D's ``|y_i − x_2|`` (printed ``|y_i m i x_2|`` in
some copies) and the extended Powell function's ``(x_{4i−2} − 2x_{4i−1})²``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from gnopt.losses import AbstractLoss

Array = jax.Array

__all__ = ["HalfSumOfSquares", "MGHProblem", "PROBLEMS", "half_sum_of_squares", "make",
           "problem"]


@dataclasses.dataclass(frozen=True)
class MGHProblem:
    """One MGH problem at a fixed size.

    Attributes:
      number: the paper's number, 1–35.
      name: the paper's name.
      n: number of variables.
      m: number of residuals.
      x0: the standard starting point (paper's ``x0``).
      residual: ``residual(x) -> r`` (shape ``[m]``) for ``x`` of shape ``[n]``.
      f_star: the published minimum of ``f = Σ r²`` (the lowest listed one).
      other_minima: other minima the paper lists (local ones, or at infinity).
      note: how exact ``f_star`` is, and anything else worth knowing.
    """

    number: int
    name: str
    n: int
    m: int
    x0: tuple[float, ...]
    residual: Callable[[Array], Array] = dataclasses.field(repr=False)
    f_star: float
    other_minima: tuple[float, ...] = ()
    note: str = ""

    def initial_params(self) -> Array:
        """``x0`` as an array (float64 when ``jax_enable_x64`` is on)."""
        return jnp.asarray(self.x0, dtype=jnp.result_type(float))

    def value(self, x) -> Array:
        """``f(x) = Σ r_i(x)²``, the paper's objective."""
        r = self.residual(jnp.asarray(x))
        return jnp.sum(r * r)

    def apply_fn(self, params, inputs) -> Array:
        """gnopt's ``apply_fn(params, inputs)``: the residual vector (``inputs`` unused)."""
        del inputs
        return self.residual(params)

    def batch(self) -> tuple[Array, Array]:
        """gnopt's ``batch = (inputs, targets)``: a dummy input and zero targets."""
        dtype = jnp.result_type(float)
        return jnp.zeros((1,), dtype), jnp.zeros((self.m,), dtype)


class HalfSumOfSquares(AbstractLoss):
    """``ℓ(z, y) = ½ Σ (z − y)²`` (a sum, not a mean); ``H = I``."""

    def __call__(self, outputs, targets):
        d = outputs - jnp.asarray(targets, outputs.dtype)
        return 0.5 * jnp.sum(d * d)

    def grad(self, outputs, targets):
        return outputs - jnp.asarray(targets, outputs.dtype)

    def hvp(self, outputs, targets, u):
        return u


half_sum_of_squares = HalfSumOfSquares()
"""The loss ``½‖r‖²`` that makes an MGH problem a gnopt problem (``loss = f / 2``)."""


# --------------------------------------------------------------------- data
def _index(m: int) -> np.ndarray:
    return np.arange(1, m + 1, dtype=np.float64)


_BARD_Y = np.array([0.14, 0.18, 0.22, 0.25, 0.29, 0.32, 0.35, 0.39, 0.37, 0.58, 0.73, 0.96,
                    1.34, 2.10, 4.39])
_GAUSSIAN_Y = np.array([0.0009, 0.0044, 0.0175, 0.0540, 0.1295, 0.2420, 0.3521, 0.3989,
                        0.3521, 0.2420, 0.1295, 0.0540, 0.0175, 0.0044, 0.0009])
_MEYER_Y = np.array([34780.0, 28610.0, 23650.0, 19630.0, 16370.0, 13720.0, 11540.0, 9744.0,
                     8261.0, 7030.0, 6005.0, 5147.0, 4427.0, 3820.0, 3307.0, 2872.0])
_KOWALIK_Y = np.array([0.1957, 0.1947, 0.1735, 0.1600, 0.0844, 0.0627, 0.0456, 0.0342,
                       0.0323, 0.0235, 0.0246])
_KOWALIK_U = np.array([4.0, 2.0, 1.0, 0.5, 0.25, 0.167, 0.125, 0.1, 0.0833, 0.0714, 0.0625])
_OSBORNE1_Y = np.array([
    0.844, 0.908, 0.932, 0.936, 0.925, 0.908, 0.881, 0.850, 0.818, 0.784, 0.751, 0.718,
    0.685, 0.658, 0.628, 0.603, 0.580, 0.558, 0.538, 0.522, 0.506, 0.490, 0.478, 0.467,
    0.457, 0.448, 0.438, 0.431, 0.424, 0.420, 0.414, 0.411, 0.406])
_OSBORNE2_Y = np.array([
    1.366, 1.191, 1.112, 1.013, 0.991, 0.885, 0.831, 0.847, 0.786, 0.725, 0.746, 0.679,
    0.608, 0.655, 0.616, 0.606, 0.602, 0.626, 0.651, 0.724, 0.649, 0.649, 0.694, 0.644,
    0.624, 0.661, 0.612, 0.558, 0.533, 0.495, 0.500, 0.423, 0.395, 0.375, 0.372, 0.391,
    0.396, 0.405, 0.428, 0.429, 0.523, 0.562, 0.607, 0.653, 0.672, 0.708, 0.633, 0.668,
    0.645, 0.632, 0.591, 0.559, 0.597, 0.625, 0.739, 0.710, 0.729, 0.720, 0.636, 0.581,
    0.428, 0.292, 0.162, 0.098, 0.054])


# ---------------------------------------------------------------- residuals
# Each builder takes the sizes and returns (residual, x0). Notation as in the paper:
# x1..xn are x[0]..x[n-1], i runs over 1..m.

def _rosenbrock(n, m):
    def r(x):
        return jnp.stack([10.0 * (x[1] - x[0] ** 2), 1.0 - x[0]])
    return r, (-1.2, 1.0)


def _freudenstein_roth(n, m):
    def r(x):
        x1, x2 = x[0], x[1]
        return jnp.stack([-13.0 + x1 + ((5.0 - x2) * x2 - 2.0) * x2,
                          -29.0 + x1 + ((x2 + 1.0) * x2 - 14.0) * x2])
    return r, (0.5, -2.0)


def _powell_badly_scaled(n, m):
    def r(x):
        return jnp.stack([1e4 * x[0] * x[1] - 1.0,
                          jnp.exp(-x[0]) + jnp.exp(-x[1]) - 1.0001])
    return r, (0.0, 1.0)


def _brown_badly_scaled(n, m):
    def r(x):
        return jnp.stack([x[0] - 1e6, x[1] - 2e-6, x[0] * x[1] - 2.0])
    return r, (1.0, 1.0)


def _beale(n, m):
    y = np.array([1.5, 2.25, 2.625])
    i = _index(3)

    def r(x):
        return y - x[0] * (1.0 - x[1] ** i)
    return r, (1.0, 1.0)


def _jennrich_sampson(n, m):
    i = _index(m)

    def r(x):
        return 2.0 + 2.0 * i - (jnp.exp(i * x[0]) + jnp.exp(i * x[1]))
    return r, (0.3, 0.4)


def _helical_valley(n, m):
    def r(x):
        x1, x2, x3 = x[0], x[1], x[2]
        safe = jnp.where(x1 == 0, 1.0, x1)
        angle = jnp.arctan(x2 / safe) / (2.0 * math.pi) + jnp.where(x1 < 0, 0.5, 0.0)
        theta = jnp.where(x1 == 0, 0.25 * jnp.sign(x2), angle)  # the limit as x1 -> 0+
        return jnp.stack([10.0 * (x3 - 10.0 * theta),
                          10.0 * (jnp.sqrt(x1 ** 2 + x2 ** 2) - 1.0), x3])
    return r, (-1.0, 0.0, 0.0)


def _bard(n, m):
    u = _index(15)
    v = 16.0 - u
    w = np.minimum(u, v)

    def r(x):
        return _BARD_Y - (x[0] + u / (v * x[1] + w * x[2]))
    return r, (1.0, 1.0, 1.0)


def _gaussian(n, m):
    t = (8.0 - _index(15)) / 2.0

    def r(x):
        return x[0] * jnp.exp(-x[1] * (t - x[2]) ** 2 / 2.0) - _GAUSSIAN_Y
    return r, (0.4, 1.0, 0.0)


def _meyer(n, m):
    t = 45.0 + 5.0 * _index(16)

    def r(x):
        return x[0] * jnp.exp(x[1] / (t + x[2])) - _MEYER_Y
    return r, (0.02, 4000.0, 250.0)


def _gulf(n, m):
    t = _index(m) / 100.0
    y = 25.0 + (-50.0 * np.log(t)) ** (2.0 / 3.0)

    def r(x):
        return jnp.exp(-jnp.abs(y - x[1]) ** x[2] / x[0]) - t
    return r, (5.0, 2.5, 0.15)


def _box3d(n, m):
    t = 0.1 * _index(m)
    c = np.exp(-t) - np.exp(-10.0 * t)

    def r(x):
        return jnp.exp(-t * x[0]) - jnp.exp(-t * x[1]) - x[2] * c
    return r, (0.0, 10.0, 20.0)


def _powell_singular_block(x1, x2, x3, x4):
    return [x1 + 10.0 * x2, math.sqrt(5.0) * (x3 - x4), (x2 - 2.0 * x3) ** 2,
            math.sqrt(10.0) * (x1 - x4) ** 2]


def _powell_singular(n, m):
    def r(x):
        return jnp.stack(_powell_singular_block(x[0], x[1], x[2], x[3]))
    return r, (3.0, -1.0, 0.0, 1.0)


def _wood(n, m):
    def r(x):
        x1, x2, x3, x4 = x[0], x[1], x[2], x[3]
        return jnp.stack([10.0 * (x2 - x1 ** 2), 1.0 - x1, math.sqrt(90.0) * (x4 - x3 ** 2),
                          1.0 - x3, math.sqrt(10.0) * (x2 + x4 - 2.0),
                          (x2 - x4) / math.sqrt(10.0)])
    return r, (-3.0, -1.0, -3.0, -1.0)


def _kowalik_osborne(n, m):
    u = _KOWALIK_U

    def r(x):
        return _KOWALIK_Y - x[0] * (u ** 2 + u * x[1]) / (u ** 2 + u * x[2] + x[3])
    return r, (0.25, 0.39, 0.415, 0.39)


def _brown_dennis(n, m):
    t = _index(m) / 5.0

    def r(x):
        return ((x[0] + t * x[1] - np.exp(t)) ** 2
                + (x[2] + x[3] * np.sin(t) - np.cos(t)) ** 2)
    return r, (25.0, 5.0, -5.0, -1.0)


def _osborne1(n, m):
    t = 10.0 * (_index(33) - 1.0)

    def r(x):
        return _OSBORNE1_Y - (x[0] + x[1] * jnp.exp(-t * x[3]) + x[2] * jnp.exp(-t * x[4]))
    return r, (0.5, 1.5, -1.0, 0.01, 0.02)


def _biggs_exp6(n, m):
    t = 0.1 * _index(m)
    y = np.exp(-t) - 5.0 * np.exp(-10.0 * t) + 3.0 * np.exp(-4.0 * t)

    def r(x):
        return (x[2] * jnp.exp(-t * x[0]) - x[3] * jnp.exp(-t * x[1])
                + x[5] * jnp.exp(-t * x[4]) - y)
    return r, (1.0, 2.0, 1.0, 1.0, 1.0, 1.0)


def _osborne2(n, m):
    t = (_index(65) - 1.0) / 10.0

    def r(x):
        model = (x[0] * jnp.exp(-t * x[4]) + x[1] * jnp.exp(-(t - x[8]) ** 2 * x[5])
                 + x[2] * jnp.exp(-(t - x[9]) ** 2 * x[6])
                 + x[3] * jnp.exp(-(t - x[10]) ** 2 * x[7]))
        return _OSBORNE2_Y - model
    return r, (1.3, 0.65, 0.65, 0.7, 0.6, 3.0, 5.0, 7.0, 2.0, 4.5, 5.5)


def _watson(n, m):
    t = _index(29) / 29.0
    j = np.arange(1, n + 1, dtype=np.float64)
    powers = t[:, None] ** (j[None, :] - 1.0)                 # t^(j-1), [29, n]
    slopes = np.zeros((29, n))
    slopes[:, 1:] = (j[1:] - 1.0) * t[:, None] ** (j[1:] - 2.0)  # (j-1) t^(j-2), j >= 2

    def r(x):
        fit = slopes @ x - (powers @ x) ** 2 - 1.0
        return jnp.concatenate([fit, jnp.stack([x[0], x[1] - x[0] ** 2 - 1.0])])
    return r, (0.0,) * n


def _extended_rosenbrock(n, m):
    def r(x):
        odd, even = x[0::2], x[1::2]
        return jnp.stack([10.0 * (even - odd ** 2), 1.0 - odd], axis=1).reshape(-1)
    return r, (-1.2, 1.0) * (n // 2)


def _extended_powell(n, m):
    def r(x):
        q = x.reshape(-1, 4)
        return jnp.stack(_powell_singular_block(q[:, 0], q[:, 1], q[:, 2], q[:, 3]),
                         axis=1).reshape(-1)
    return r, (3.0, -1.0, 0.0, 1.0) * (n // 4)


def _penalty1(n, m):
    a = math.sqrt(1e-5)

    def r(x):
        return jnp.concatenate([a * (x - 1.0), jnp.sum(x * x)[None] - 0.25])
    return r, tuple(float(j) for j in range(1, n + 1))


def _penalty2(n, m):
    a = math.sqrt(1e-5)
    i = _index(n)[1:]
    y = np.exp(i / 10.0) + np.exp((i - 1.0) / 10.0)
    weights = n - _index(n) + 1.0

    def r(x):
        e = jnp.exp(x / 10.0)
        return jnp.concatenate([
            (x[0] - 0.2)[None],
            a * (e[1:] + e[:-1] - y),
            a * (e[1:] - math.exp(-0.1)),
            (jnp.sum(weights * x * x) - 1.0)[None]])
    return r, (0.5,) * n


def _variably_dimensioned(n, m):
    j = _index(n)

    def r(x):
        s = jnp.sum(j * (x - 1.0))
        return jnp.concatenate([x - 1.0, jnp.stack([s, s ** 2])])
    return r, tuple(float(v) for v in 1.0 - j / n)


def _trigonometric(n, m):
    i = _index(n)

    def r(x):
        c = jnp.cos(x)
        return n - jnp.sum(c) + i * (1.0 - c) - jnp.sin(x)
    return r, (1.0 / n,) * n


def _brown_almost_linear(n, m):
    def r(x):
        return jnp.concatenate([x[:-1] + jnp.sum(x) - (n + 1.0), (jnp.prod(x) - 1.0)[None]])
    return r, (0.5,) * n


def _grid(n):
    h = 1.0 / (n + 1)
    t = h * _index(n)
    return h, t, tuple(float(v) for v in t * (t - 1.0))


def _discrete_boundary_value(n, m):
    h, t, x0 = _grid(n)

    def r(x):
        padded = jnp.pad(x, 1)  # x_0 = x_{n+1} = 0
        return 2.0 * x - padded[:-2] - padded[2:] + h ** 2 * (x + t + 1.0) ** 3 / 2.0
    return r, x0


def _discrete_integral_equation(n, m):
    h, t, x0 = _grid(n)
    lower = np.tril(np.ones((n, n)))          # j <= i
    upper = 1.0 - lower                       # j > i
    # r_i = x_i + h/2 [(1 - t_i) Σ_{j≤i} t_j c_j + t_i Σ_{j>i} (1 - t_j) c_j],
    # c_j = (x_j + t_j + 1)³
    kernel = (h / 2.0) * ((1.0 - t)[:, None] * lower * t[None, :]
                          + t[:, None] * upper * (1.0 - t)[None, :])

    def r(x):
        return x + kernel @ (x + t + 1.0) ** 3
    return r, x0


def _broyden_tridiagonal(n, m):
    def r(x):
        padded = jnp.pad(x, 1)
        return (3.0 - 2.0 * x) * x - padded[:-2] - 2.0 * padded[2:] + 1.0
    return r, (-1.0,) * n


def _broyden_banded(n, m, lower=5, upper=1):
    i, j = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    band = ((j != i) & (j >= i - lower) & (j <= i + upper)).astype(np.float64)

    def r(x):
        return x * (2.0 + 5.0 * x * x) + 1.0 - band @ (x * (1.0 + x))
    return r, (-1.0,) * n


def _linear_full_rank(n, m):
    def r(x):
        s = 2.0 / m * jnp.sum(x)
        return jnp.concatenate([x - s - 1.0, jnp.full((m - n,), -s - 1.0, x.dtype)])
    return r, (1.0,) * n


def _linear_rank1(n, m):
    i, j = _index(m), _index(n)

    def r(x):
        return i * jnp.sum(j * x) - 1.0
    return r, (1.0,) * n


def _linear_rank1_zero(n, m):
    i = _index(m)[1:-1]
    j = np.zeros(n)
    j[1:-1] = _index(n)[1:-1]  # columns 1 and n are zero

    def r(x):
        one = jnp.ones((1,), x.dtype)
        return jnp.concatenate([-one, (i - 1.0) * jnp.sum(j * x) - 1.0, -one])
    return r, (1.0,) * n


def _chebyquad(n, m):
    i = _index(m)
    even = i % 2 == 0
    integral = np.zeros(m)
    integral[even] = -1.0 / (i[even] ** 2 - 1.0)  # ∫_0^1 T_i(2x - 1) dx (0 for odd i)

    def r(x):
        z = 2.0 * x - 1.0
        previous, current = jnp.ones_like(z), z
        rows = [current]
        for _ in range(m - 1):  # T_{k+1} = 2 z T_k − T_{k−1}
            previous, current = current, 2.0 * z * current - previous
            rows.append(current)
        return jnp.mean(jnp.stack(rows), axis=1) - integral
    return r, tuple(float(v) for v in _index(n) / (n + 1.0))


# ------------------------------------------------------------- the table
@dataclasses.dataclass(frozen=True)
class _Spec:
    name: str
    build: Callable
    n: int
    m: int | Callable[[int], int]  # fixed m, or m as a function of n
    f_star: float | Callable[[int, int], float]
    other_minima: tuple[float, ...] = ()
    note: str = ""
    free: str = ""  # "n", "m" or "nm": which sizes the paper leaves free


def _table(values: dict, default=math.nan):
    return lambda n, m: values.get((n, m), default)


_SPECS: dict[int, _Spec] = {
    1: _Spec("Rosenbrock", _rosenbrock, 2, 2, 0.0, note="f* = 0 at (1, 1)."),
    2: _Spec("Freudenstein and Roth", _freudenstein_roth, 2, 2, 0.0, (48.9842,),
             "f* = 0 at (5, 4); a local minimum f = 48.9842 at (11.41, -0.8968)."),
    3: _Spec("Powell badly scaled", _powell_badly_scaled, 2, 2, 0.0,
             note="f* = 0 at (1.098e-5, 9.106)."),
    4: _Spec("Brown badly scaled", _brown_badly_scaled, 2, 3, 0.0,
             note="f* = 0 at (1e6, 2e-6)."),
    5: _Spec("Beale", _beale, 2, 3, 0.0, note="f* = 0 at (3, 0.5)."),
    6: _Spec("Jennrich and Sampson", _jennrich_sampson, 2, 10,
             _table({(2, 10): 124.362}),
             note="f* = 124.362 (6 digits) at x1 = x2 = 0.2578, for m = 10.", free="m"),
    7: _Spec("Helical valley", _helical_valley, 3, 3, 0.0, note="f* = 0 at (1, 0, 0)."),
    8: _Spec("Bard", _bard, 3, 15, 8.21487e-3, (17.4286,),
             "f* = 8.21487e-3 (6 digits); also f = 17.4286 at (0.8406, -inf, -inf)."),
    9: _Spec("Gaussian", _gaussian, 3, 15, 1.12793e-8, note="f* = 1.12793e-8 (6 digits)."),
    10: _Spec("Meyer", _meyer, 3, 16, 87.9458, note="f* = 87.9458 (6 digits)."),
    11: _Spec("Gulf research and development", _gulf, 3, 99, 0.0,
              note="f* = 0 at (50, 25, 1.5) for every 3 <= m <= 100; m = 99 here.", free="m"),
    12: _Spec("Box three-dimensional", _box3d, 3, 10, 0.0,
              note="f* = 0 at (1, 10, 1), (10, 1, -1) and wherever x1 = x2, x3 = 0.",
              free="m"),
    13: _Spec("Powell singular", _powell_singular, 4, 4, 0.0,
              note="f* = 0 at the origin, where the Jacobian is singular."),
    14: _Spec("Wood", _wood, 4, 6, 0.0, note="f* = 0 at (1, 1, 1, 1)."),
    15: _Spec("Kowalik and Osborne", _kowalik_osborne, 4, 11, 3.07505e-4, (1.02734e-3,),
              "f* = 3.07505e-4 (6 digits); also f = 1.02734e-3 at (+inf, -14.07, -inf, -inf)."),
    16: _Spec("Brown and Dennis", _brown_dennis, 4, 20, _table({(4, 20): 85822.2}),
              note="f* = 85822.2 (6 digits) for m = 20.", free="m"),
    17: _Spec("Osborne 1", _osborne1, 5, 33, 5.46489e-5, note="f* = 5.46489e-5 (6 digits)."),
    18: _Spec("Biggs EXP6", _biggs_exp6, 6, 13, 0.0, (5.65565e-3,),
              "f* = 0 at (1, 10, 1, 5, 4, 3); a local minimum f = 5.65565e-3 for m = 13.",
              free="m"),
    19: _Spec("Osborne 2", _osborne2, 11, 65, 4.01377e-2, note="f* = 4.01377e-2 (6 digits)."),
    20: _Spec("Watson", _watson, 6, 31,
              _table({(6, 31): 2.28767e-3, (9, 31): 1.39976e-6, (12, 31): 4.72238e-10}),
              note="f* = 2.28767e-3 (6 digits) for n = 6 (1.39976e-6 for n = 9, "
                   "4.72238e-10 for n = 12).", free="n"),
    21: _Spec("Extended Rosenbrock", _extended_rosenbrock, 10, lambda n: n, 0.0,
              note="f* = 0 at (1, ..., 1); n even.", free="n"),
    22: _Spec("Extended Powell singular", _extended_powell, 12, lambda n: n, 0.0,
              note="f* = 0 at the origin (singular Jacobian); n a multiple of 4.", free="n"),
    23: _Spec("Penalty I", _penalty1, 10, lambda n: n + 1,
              _table({(4, 5): 2.24997e-5, (10, 11): 7.08765e-5}),
              note="f* = 7.08765e-5 (6 digits) for n = 10 (2.24997e-5 for n = 4).", free="n"),
    24: _Spec("Penalty II", _penalty2, 10, lambda n: 2 * n,
              _table({(4, 8): 9.37629e-6, (10, 20): 2.93660e-4}),
              note="f* = 2.93660e-4 (6 digits) for n = 10 (9.37629e-6 for n = 4).", free="n"),
    25: _Spec("Variably dimensioned", _variably_dimensioned, 10, lambda n: n + 2, 0.0,
              note="f* = 0 at (1, ..., 1).", free="n"),
    26: _Spec("Trigonometric", _trigonometric, 10, lambda n: n, 0.0,
              note="f* = 0 (e.g. at the origin); other local minima exist.", free="n"),
    27: _Spec("Brown almost-linear", _brown_almost_linear, 10, lambda n: n, 0.0, (1.0,),
              "f* = 0 at (a, ..., a, a^(1-n)) with n a^n - (n+1) a^(n-1) + 1 = 0; "
              "also f = 1 at (0, ..., 0, n+1).", free="n"),
    28: _Spec("Discrete boundary value", _discrete_boundary_value, 10, lambda n: n, 0.0,
              note="f* = 0.", free="n"),
    29: _Spec("Discrete integral equation", _discrete_integral_equation, 10, lambda n: n, 0.0,
              note="f* = 0.", free="n"),
    30: _Spec("Broyden tridiagonal", _broyden_tridiagonal, 10, lambda n: n, 0.0,
              note="f* = 0.", free="n"),
    31: _Spec("Broyden banded", _broyden_banded, 10, lambda n: n, 0.0,
              note="f* = 0 (bandwidths ml = 5, mu = 1).", free="n"),
    32: _Spec("Linear function - full rank", _linear_full_rank, 10, 20,
              lambda n, m: float(m - n),
              note="f* = m - n (exact) at (-1, ..., -1).", free="nm"),
    33: _Spec("Linear function - rank 1", _linear_rank1, 10, 20,
              lambda n, m: m * (m - 1) / (2.0 * (2 * m + 1)),
              note="f* = m(m-1) / (2(2m+1)) (exact) wherever sum_j j x_j = 3 / (2m+1).",
              free="nm"),
    34: _Spec("Linear function - rank 1 with zero columns and rows", _linear_rank1_zero, 10, 20,
              lambda n, m: (m * m + 3 * m - 6) / (2.0 * (2 * m - 3)),
              note="f* = (m^2 + 3m - 6) / (2(2m-3)) (exact) wherever "
                   "sum_{j=2}^{n-1} j x_j = 3 / (2m-3).", free="nm"),
    35: _Spec("Chebyquad", _chebyquad, 10, 10,
              lambda n, m: (0.0 if m == n and (n <= 7 or n == 9)
                            else {(8, 8): 3.51687e-3, (10, 10): 6.50395e-3}.get((n, m), math.nan)),
              note="f* = 6.50395e-3 (6 digits) for m = n = 10 (0 for m = n <= 7 and n = 9, "
                   "3.51687e-3 for m = n = 8).", free="nm"),
}


def make(number: int, n: int | None = None, m: int | None = None) -> MGHProblem:
    """Problem ``number`` (1–35), at the standard size or at ``n``/``m`` where the
    paper leaves them free (``f_star`` is ``nan`` where the paper lists none)."""
    if number not in _SPECS:
        raise ValueError(f"MGH problems are numbered 1-35, got {number}")
    spec = _SPECS[number]
    if n is not None and n != spec.n and "n" not in spec.free:
        raise ValueError(f"MGH {number} ({spec.name}) has n = {spec.n} fixed")
    n = spec.n if n is None else n
    default_m = spec.m(n) if callable(spec.m) else spec.m
    if m is not None and m != default_m and "m" not in spec.free:
        raise ValueError(f"MGH {number} ({spec.name}) has m = {default_m} for n = {n}")
    m = default_m if m is None else m
    if number == 21 and n % 2 or number == 22 and n % 4 or m < n:
        raise ValueError(f"MGH {number}: invalid sizes n = {n}, m = {m}")
    residual, x0 = spec.build(n, m)
    f_star = spec.f_star(n, m) if callable(spec.f_star) else spec.f_star
    return MGHProblem(number, spec.name, n, m, tuple(float(v) for v in x0), residual,
                      float(f_star), spec.other_minima, spec.note)


PROBLEMS: tuple[MGHProblem, ...] = tuple(make(k) for k in sorted(_SPECS))
"""The 35 problems at the sizes listed in the module docstring, in the paper's order."""


def problem(number: int) -> MGHProblem:
    """The standard-size problem with the paper's ``number``."""
    return PROBLEMS[number - 1]
