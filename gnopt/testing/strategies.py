"""Hypothesis strategies drawing the problems of :mod:`gnopt.testing.problems`.

Each strategy draws a seed and a few sizes, then builds the problem with a
seeded numpy generator (cheap to draw and to shrink). Every size argument is an
``int`` (fixed) or a hypothesis strategy (drawn).

Example::

    @hypothesis.given(gnopt.testing.quadratics(dim=4, condition=st.floats(1, 50)))
    def test_my_preconditioner(problem):
        gnopt.testing.check_preconditioner(my_tx, problem, steps=50)
"""

from __future__ import annotations

from typing import TypeVar

from hypothesis import strategies as st

from gnopt.testing.problems import LeastSquares, Logistic, Quadratic, SmallMLP

T = TypeVar("T")
IntOr = int | st.SearchStrategy[int]
seeds = st.integers(0, 2**32 - 1)


def _drawn(draw, value: T | st.SearchStrategy[T]) -> T:
    return draw(value) if isinstance(value, st.SearchStrategy) else value


@st.composite
def quadratics(draw, dim: IntOr = st.integers(2, 8),
               condition: float | st.SearchStrategy[float] = st.floats(1.0, 100.0)) -> Quadratic:
    """:class:`Quadratic` problems with curvature in ``[1/condition, 1]``."""
    return Quadratic.random(draw(seeds), _drawn(draw, dim), _drawn(draw, condition))


@st.composite
def least_squares(draw, num_features: IntOr = st.integers(2, 8),
                  num_outputs: IntOr = st.integers(1, 3),
                  extra_examples: IntOr = st.integers(1, 8)) -> LeastSquares:
    """:class:`LeastSquares` problems with ``num_features + 1 + extra_examples`` examples."""
    d = _drawn(draw, num_features)
    return LeastSquares.random(draw(seeds), d, _drawn(draw, num_outputs),
                               num_examples=d + 1 + _drawn(draw, extra_examples))


@st.composite
def logistic_problems(draw, num_features: IntOr = st.integers(2, 8),
                      num_classes: IntOr = st.integers(2, 4),
                      num_examples: IntOr = st.integers(4, 16)) -> Logistic:
    """:class:`Logistic` problems (softmax cross-entropy, linear model)."""
    return Logistic.random(draw(seeds), _drawn(draw, num_features), _drawn(draw, num_classes),
                           _drawn(draw, num_examples))


@st.composite
def mlp_problems(draw, num_features: IntOr = st.integers(2, 8), hidden: IntOr = st.integers(2, 8),
                 num_outputs: IntOr = st.integers(2, 4), num_examples: IntOr = st.integers(4, 16),
                 loss: str | st.SearchStrategy[str] = st.sampled_from(["mse", "ce"])) -> SmallMLP:
    """One-hidden-layer :class:`SmallMLP` problems (MSE regression or CE classification)."""
    return SmallMLP.random(draw(seeds), _drawn(draw, num_features), (_drawn(draw, hidden),),
                           _drawn(draw, num_outputs), _drawn(draw, num_examples),
                           _drawn(draw, loss))
