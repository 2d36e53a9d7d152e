"""Tests of gnopt.testing: problems, strategies, and that the checks pass and fail honestly."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, strategies as st

import gnopt.testing as gt

PARAMS = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
BATCH = (jnp.ones((4, 3)), jnp.ones((4, 2)))


@pytest.mark.parametrize("make_tx", [optax.adamw, optax.sgd, optax.lion])
def test_contract_passes_for_optax(make_tx):
    gt.check_optimizer_contract(make_tx, PARAMS, batch=BATCH, hyperparams={"learning_rate": 1e-2})


def _transform(update, init=lambda params: {"count": jnp.zeros((), jnp.int32)}):
    return lambda: optax.GradientTransformationExtraArgs(init, update)


def _casts_to_float32(updates, state, params=None, **_):
    return jax.tree.map(lambda u: u.astype(jnp.float32), updates), state


def _state_grows(updates, state, params=None, **_):
    count = jnp.atleast_1d(state["count"])
    return updates, {"count": jnp.concatenate([count, jnp.zeros(1, jnp.int32)])}


def _weak_state_turns_strong(updates, state, params=None, **_):
    return updates, {"count": state["count"].astype(jnp.int32) + 1}


def _divides_by_zero(updates, state, params=None, **_):
    return jax.tree.map(lambda u: u / 0, updates), state


def _reads_unknown_kwargs(updates, state, params=None, **kwargs):
    return jax.tree.map(lambda u: u * (1 + len(kwargs)), updates), state


def _no_extra_args():
    return optax.GradientTransformation(lambda params: optax.EmptyState(),
                                        lambda updates, state, params=None: (updates, state))


@pytest.mark.parametrize("make_tx, failed", [
    (_no_extra_args, r"\(a\) update\(\) rejects"),
    (_transform(_reads_unknown_kwargs), r"\(a\) an unknown keyword argument changed"),
    (_transform(_weak_state_turns_strong, lambda p: {"count": jnp.asarray(0)}),
     r"\(b\) the jitted step traced 2 times .* weak_type: \['count'\]"),
    (_transform(_casts_to_float32), r"bfloat16 params: \(c\) step 0: .*\['b'\].*bfloat16.*float32"),
    (_transform(_state_grows), r"\(d\) step 0: state leaves changed: \['count'\]: \(\(\),"),
    (_transform(_divides_by_zero), r"\(f\) updates\['b'\] is not finite"),
])
def test_contract_fails_for_broken_transforms(make_tx, failed):
    with pytest.raises(AssertionError, match=failed):
        gt.check_optimizer_contract(make_tx, PARAMS)


def test_contract_fails_when_hyperparams_cannot_be_injected():
    def sgd_with_python_float(learning_rate):
        return optax.sgd(float(learning_rate))

    gt.check_optimizer_contract(lambda: sgd_with_python_float(0.1), PARAMS)  # fine uninjected
    with pytest.raises(AssertionError, match=r"inject_hyperparams: \(e\)"):
        gt.check_optimizer_contract(sgd_with_python_float, PARAMS,
                                    hyperparams={"learning_rate": 0.1})


def test_contract_passes_batch_and_extra_args():
    seen = []

    def update(updates, state, params=None, *, batch, scale, **_):
        seen.append((batch, scale))
        return jax.tree.map(lambda u: (u * scale).astype(u.dtype), updates), state

    gt.check_optimizer_contract(_transform(update), PARAMS, batch=BATCH, extra_args={"scale": 2.0},
                                dtypes=(jnp.float32,))
    assert seen and all(b is not None for b, _ in seen)


@given(gt.quadratics())
def test_gradient_descent_meets_its_rate_on_quadratics(problem):
    """GD with lr = 1/L = 1: gap_T ≤ (1 − 1/κ)^(2T) gap_0 (A's spectrum is [1/κ, 1])."""
    steps = 30
    eigenvalues = np.linalg.eigvalsh(np.asarray(problem.hessian(), np.float64))
    contraction = 1 - eigenvalues.min() / eigenvalues.max()
    solution = jnp.asarray(problem.solution, jnp.float32)
    gap0 = float(problem.loss(problem.params) - problem.loss(solution))
    tol = contraction ** (2 * steps) * gap0 + 1e-5
    report = gt.check_preconditioner(lambda: optax.sgd(1.0), problem, steps=steps, tol=tol)
    assert report.final_loss < report.initial_loss and report.optimal_loss is not None


@given(gt.quadratics())
def test_newton_step_needing_batch_reaches_the_minimum(problem):
    """A transform that needs ``batch`` (like GN) gets it from check_preconditioner."""
    def newton(updates, state, params, *, batch, **_):
        loss = lambda x: problem.loss_fn(problem.apply_fn(x, batch[0]), batch[1])
        return -jnp.linalg.solve(jax.hessian(loss)(params), updates), state

    gt.check_preconditioner(_transform(newton), problem, steps=1, tol=1e-4)


@given(gt.least_squares() | gt.logistic_problems() | gt.mlp_problems())
def test_adam_and_sgd_descend_on_drawn_problems(problem):
    gt.check_preconditioner(lambda: optax.adam(1e-2), problem, steps=20)
    gt.check_preconditioner(optax.sgd, problem, steps=20, hyperparams={"learning_rate": 1e-2})


def test_check_preconditioner_fails_honestly():
    problem = gt.Quadratic.random(0, dim=4, condition=10.0)
    with pytest.raises(AssertionError, match="did not decrease"):
        gt.check_preconditioner(lambda: optax.sgd(-0.1), problem, steps=5)
    with pytest.raises(AssertionError, match="above the minimum"):
        gt.check_preconditioner(lambda: optax.sgd(1e-3), problem, steps=5, tol=1e-6)
    with pytest.raises(ValueError, match="Logistic has none"):
        gt.check_preconditioner(optax.sgd, gt.Logistic.random(0), steps=5, tol=1e-3,
                                hyperparams={"learning_rate": 0.1})


@given(gt.quadratics() | gt.least_squares())
def test_exact_solutions_are_minimisers_in_float64(x64, problem):
    grads = jax.jit(lambda p: (jax.grad(p.loss)(p.solution), jax.grad(p.loss)(p.params)))
    at_solution, at_start = grads(jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), problem))
    assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(at_solution)) < 1e-9
    assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(at_start)) > 1e-4


@given(st.integers(2, 8), st.floats(1.0, 1e3), st.data())
def test_quadratic_spectrum_matches_request(dim, condition, data):
    problem = data.draw(gt.quadratics(dim=dim, condition=condition))
    eigenvalues = np.linalg.eigvalsh(np.asarray(problem.hessian(), np.float64))
    assert problem.params.shape == (dim,)
    np.testing.assert_allclose([eigenvalues.min(), eigenvalues.max()], [1 / condition, 1.0],
                               rtol=1e-4)


@given(gt.least_squares(num_features=3, num_outputs=2) | gt.logistic_problems(num_features=3)
       | gt.mlp_problems(num_features=3))
def test_problems_are_float32_pytrees_with_finite_loss(problem):
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(problem.params))
    assert problem.inputs.shape[-1] == 3
    assert np.isfinite(float(jax.jit(lambda p: p.loss(p.params))(problem)))


def test_bad_problem_configs_raise():
    with pytest.raises(ValueError, match="num_examples=3"):
        gt.LeastSquares.random(0, num_features=4, num_examples=3)
    with pytest.raises(ValueError, match="loss must be one of"):
        gt.SmallMLP.random(0, loss="hinge")
    with pytest.raises(ValueError, match="condition"):
        gt.Quadratic.random(0, condition=0.5)


def test_matrix_and_dense_quadratics_match_the_vector_one():
    problem = gt.Quadratic.random(0, dim=5, condition=30.0, outputs=3)
    dense = gt.DenseQuadratic.from_quadratic(problem)
    eigenvalues = np.linalg.eigvalsh(np.asarray(problem.hessian(), np.float64))
    np.testing.assert_allclose([eigenvalues.min(), eigenvalues.max()], [1 / 30, 1.0], rtol=1e-4)
    np.testing.assert_allclose(dense.hessian(), problem.hessian(), rtol=1e-6)
    assert problem.params.shape == dense.params.weight.shape == (5, 3)
    assert float(problem.loss(problem.params)) == float(dense.loss(dense.params))
    hessian = jax.hessian(lambda x: problem.loss(x.reshape(5, 3)))(problem.params.reshape(-1))
    np.testing.assert_allclose(hessian, np.kron(problem.hessian(), np.eye(3)), atol=1e-6)


_SEEN = {}


def _impure(updates, state, params=None, **_):
    _SEEN["last"] = _SEEN.get("last", 0) + 1
    return jax.tree.map(lambda u: -0.1 * u * _SEEN["last"], updates), state


def test_impure_updates_are_named_not_misdiagnosed():
    with pytest.raises(AssertionError, match=r"\(a\) update\(\) is not pure: the same inputs"):
        gt.check_optimizer_contract(_transform(_impure), PARAMS, dtypes=(jnp.float32,))

    class Counted(eqx.Module):
        count: int = eqx.field(static=True)

    def static_counter(updates, state, params=None, **_):
        return jax.tree.map(lambda u: -0.1 * u, updates), Counted(state.count + 1)

    with pytest.raises(AssertionError, match=r"^Quadratic: the transform failed inside a jitted "
                                             r"lax.scan .*TypeError.*check_all names which\)$"):
        gt.check_preconditioner(_transform(static_counter, lambda p: Counted(0)),
                                gt.Quadratic.random(0), steps=3)
