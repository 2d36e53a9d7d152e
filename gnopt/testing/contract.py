"""The shared contract every gnopt optimizer passes, and a descent property check.

:func:`check_optimizer_contract` checks what lets a transform chain with any
optax transform (Gauss-Newton pieces pass ``batch=...`` to every transform of a
chain) and compile once:

(a) ``update`` accepts and ignores unknown keyword arguments
    (optax's ``GradientTransformationExtraArgs`` convention);
(b) a jitted step traces once across several steps;
(c) updates have the params' shapes and dtypes (float32 and bfloat16 params);
(d) the state's tree structure, shapes and dtypes are the same after every step;
(e) with ``hyperparams``, (a)–(d) and (f) hold under ``optax.inject_hyperparams``
    and the first update matches the plain transform's (rtol 1e-3). This runs
    with float32 params only: ``inject_hyperparams`` stores hyperparameters in
    the params' dtype, and in bfloat16 Adam's ``b2 = 0.999`` rounds to 1;
(f) updates and state are finite.

:func:`check_preconditioner` drives a transform on a
:class:`~gnopt.testing.problems.AbstractProblem` the way a training loop does
(``tx.update(grads, state, params, batch=problem.batch)``) and checks that the
loss decreases, and optionally reaches the exact minimum within ``tol``.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gnopt.testing.problems import AbstractProblem

MakeTx = Callable[..., optax.GradientTransformation]
UNKNOWN_KWARG = "gnopt_contract_unknown_kwarg"


def _leaf_types(tree) -> dict[str, tuple]:
    """``{path: (shape, dtype, weak_type)}`` of every array leaf."""
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    return {jax.tree_util.keystr(path): (jnp.shape(x), jnp.result_type(x),
                                         getattr(jax.typeof(x), "weak_type", False))
            for path, x in leaves}


def _differences(before: dict, after: dict, fields: slice) -> str:
    """``"path: old -> new"`` for every leaf whose ``fields`` of :func:`_leaf_types` differ."""
    def show(types, key):
        return types[key][fields] if key in types else "missing"
    return "; ".join(f"{k}: {show(before, k)} -> {show(after, k)}"
                     for k in sorted(set(before) | set(after)) if show(before, k) != show(after, k))


def _check_finite(tree, what: str, label: str) -> None:
    for path, x in jax.tree_util.tree_leaves_with_path(tree):
        x = np.asarray(x)
        if jnp.issubdtype(x.dtype, jnp.inexact) and not np.isfinite(x.astype(np.float32)).all():
            raise AssertionError(f"{label}: (f) {what}{jax.tree_util.keystr(path)} is not finite")


def _run_steps(tx, params, grads_per_step: Sequence[Any], kwargs: dict, label: str):
    """Checks (a)–(d), (f) on ``tx``; returns the first step's updates."""
    state = tx.init(params)

    @jax.jit
    def with_and_without_unknown_kwarg(grads, state, params, kwargs):
        return (tx.update(grads, state, params, **kwargs)[0],
                tx.update(grads, state, params, **kwargs, **{UNKNOWN_KWARG: 1.0})[0])

    try:
        first, ignored = with_and_without_unknown_kwarg(grads_per_step[0], state, params, kwargs)
    except TypeError as err:
        if "unexpected keyword argument" not in str(err):
            raise
        raise AssertionError(
            f"{label}: (a) update() rejects a keyword argument "
            f"({err}); build it as an optax.GradientTransformationExtraArgs, or wrap it: "
            "optax.with_extra_args_support(tx)") from err

    def same(a, b):
        return all(np.array_equal(x, y, equal_nan=True)
                   for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))

    if not same(first, ignored):
        # the same call twice, eagerly and without the unknown argument: an impure update
        # (state kept outside its returned state) differs too, and is named as such
        if not same(tx.update(grads_per_step[0], state, params, **kwargs)[0],
                    tx.update(grads_per_step[0], state, params, **kwargs)[0]):
            raise AssertionError(
                f"{label}: (a) update() is not pure: the same inputs twice gave different "
                "updates (state kept outside the returned state: a Python dict, a closure)")
        raise AssertionError(f"{label}: (a) an unknown keyword argument changed the updates")

    traces = []

    @jax.jit
    def step(params, state, grads, kwargs):
        traces.append(1)
        updates, state = tx.update(grads, state, params, **kwargs)
        return optax.apply_updates(params, updates), updates, state

    state_tree, state_types = jax.tree.structure(state), _leaf_types(state)
    param_types = _leaf_types(params)
    kwargs = {**kwargs, UNKNOWN_KWARG: jnp.ones((), jnp.float32)}
    for t, grads in enumerate(grads_per_step):
        params, updates, state = step(params, state, grads, kwargs)
        if jax.tree.structure(updates) != jax.tree.structure(params):
            raise AssertionError(
                f"{label}: (c) step {t}: updates have tree structure "
                f"{jax.tree.structure(updates)}, params {jax.tree.structure(params)}")
        if changed := _differences(param_types, _leaf_types(updates), slice(0, 2)):
            raise AssertionError(f"{label}: (c) step {t}: updates differ from params: {changed}")
        if jax.tree.structure(state) != state_tree:
            raise AssertionError(f"{label}: (d) step {t}: the state's tree structure changed from "
                                 f"{state_tree} to {jax.tree.structure(state)}")
        if changed := _differences(state_types, _leaf_types(state), slice(0, 2)):
            raise AssertionError(f"{label}: (d) step {t}: state leaves changed: {changed}")
        _check_finite(updates, "updates", label)
        _check_finite(state, "state", label)
    if len(traces) != 1:
        weak = _differences(state_types, _leaf_types(state), slice(2, 3))
        raise AssertionError(
            f"{label}: (b) the jitted step traced {len(traces)} times over {len(grads_per_step)} "
            f"steps, expected 1" + (f"; state leaves changed weak_type: {weak}" if weak else ""))
    return first


def check_optimizer_contract(
    make_tx: MakeTx,
    params,
    *,
    batch=None,
    extra_args: Mapping[str, Any] | None = None,
    hyperparams: Mapping[str, Any] | None = None,
    dtypes: Sequence[Any] = (jnp.float32, jnp.bfloat16),
    steps: int = 5,
    seed: int = 0,
) -> None:
    """Checks the optimizer contract (a)–(f) of this module's docstring.

    Args:
      make_tx: ``make_tx(**hyperparams) -> GradientTransformation``.
      params: a pytree of floating arrays; it is cast to each of ``dtypes``.
      batch: passed to every update as ``batch=...`` if not None.
      extra_args: further keyword arguments passed to every update.
      hyperparams: keyword arguments of ``make_tx``; if given, (e) is checked with
        ``optax.inject_hyperparams(make_tx)(**hyperparams)``.
      dtypes: parameter dtypes to run the checks with.
      steps: number of jitted steps, each with fresh standard-normal gradients.
      seed: seed of the gradients.

    Raises:
      AssertionError: naming the failed property, the step and the leaf.
    """
    hyperparams = dict(hyperparams or {})
    kwargs = dict(extra_args or {}) | ({} if batch is None else {"batch": batch})

    def run(tx, dtype, label):
        rng = np.random.default_rng(seed)
        cast = jax.tree.map(lambda p: jnp.asarray(p, dtype), params)
        grads = [jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), dtype), cast)
                 for _ in range(steps)]
        return _run_steps(tx, cast, grads, kwargs, label)

    first = {jnp.dtype(d): run(make_tx(**hyperparams), d, f"{jnp.dtype(d).name} params")
             for d in dtypes}
    if not hyperparams:
        return
    label = "float32 params under optax.inject_hyperparams"
    f32 = jnp.dtype(jnp.float32)
    plain = first[f32] if f32 in first else run(make_tx(**hyperparams), f32, "float32 params")
    try:
        injected = run(optax.inject_hyperparams(make_tx)(**hyperparams), jnp.float32, label)
    except AssertionError:
        raise
    except Exception as err:
        raise AssertionError(f"{label}: (e) {type(err).__name__}: {err}") from err
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(plain), jax.tree.leaves(injected)):
        a, b = np.asarray(a), np.asarray(b)
        if not np.allclose(a, b, rtol=1e-3, atol=1e-3 * np.max(np.abs(a), initial=0.0)):
            raise AssertionError(
                f"{label}: (e) first update{jax.tree_util.keystr(path)} differs from the plain "
                f"transform's by up to {np.max(np.abs(a - b))}")


class DescentReport(NamedTuple):
    """Losses seen by :func:`check_preconditioner`."""

    initial_loss: float  # L(θ_0)
    final_loss: float  # L(θ_steps)
    optimal_loss: float | None  # L(θ*) when the problem has an exact solution


def check_preconditioner(
    make_tx: MakeTx,
    problem: AbstractProblem,
    *,
    steps: int = 100,
    tol: float | None = None,
    hyperparams: Mapping[str, Any] | None = None,
) -> DescentReport:
    """Descent property: ``steps`` updates on ``problem`` lower its loss.

    ``make_tx`` builds a whole optimizer: its updates are added to the
    parameters, so the sign and the learning rate are its own (``optax.sgd(0.1)``,
    not ``optax.identity()``). For a preconditioner alone, and for every other
    check at once, use :func:`gnopt.testing.check_all` (``mode="preconditioner"``).
    A bare ``optax.GradientTransformation`` is wrapped in
    ``optax.with_extra_args_support`` here (it gets ``batch=...``);
    :func:`check_optimizer_contract` reports that it needs the wrap.

    Each step is ``grads = jax.grad(problem.loss)(params)``;
    ``updates, state = tx.update(grads, state, params, batch=problem.batch)``;
    ``params = optax.apply_updates(params, updates)`` (all steps in one ``lax.scan``).

    Args:
      make_tx: ``make_tx(**hyperparams) -> GradientTransformation``.
      problem: the problem (see :mod:`gnopt.testing.problems`).
      steps: number of updates.
      tol: if given, also require ``L(θ_steps) − L(θ*) ≤ tol`` (needs ``problem.solution``).
      hyperparams: keyword arguments of ``make_tx``.

    Returns:
      The :class:`DescentReport`.

    Raises:
      AssertionError: the loss is not finite, did not decrease, or is not within
        ``tol``; or the transform failed under ``jit``/``lax.scan`` (one line).
      ValueError: ``tol`` is given but the problem has no exact solution.
    """
    if tol is not None and problem.solution is None:
        raise ValueError(f"check_preconditioner: tol={tol} needs an exact solution, and "
                         f"{type(problem).__name__} has none")
    tx = optax.with_extra_args_support(make_tx(**(hyperparams or {})))

    solution = None if problem.solution is None else jax.tree.map(
        lambda s, p: jnp.asarray(s, p.dtype), problem.solution, problem.params)

    @jax.jit
    def run(params, solution):
        def body(carry, _):
            params, state = carry
            grads = jax.grad(problem.loss)(params)
            updates, state = tx.update(grads, state, params, batch=problem.batch)
            return (optax.apply_updates(params, updates), state), None

        (final, _), _ = jax.lax.scan(body, (params, tx.init(params)), length=steps)
        optimal = None if solution is None else problem.loss(solution)
        return problem.loss(params), problem.loss(final), optimal

    name = type(problem).__name__
    try:
        initial, final, optimal = jax.tree.map(float, run(problem.params, solution))
    except Exception as err:  # one line, never a raw traceback from inside lax.scan
        lines = str(err).strip().splitlines()
        raise AssertionError(
            f"{name}: the transform failed inside a jitted lax.scan of {steps} steps: "
            f"{type(err).__name__}: {lines[0][:300] if lines else ''} (an update that keeps state "
            "outside its returned state, or a state whose structure or dtypes change between "
            "steps, fails here; gnopt.testing.check_all names which)") from err
    if not final < initial:
        raise AssertionError(
            f"{name}: loss did not decrease over {steps} steps: {initial} -> {final}")
    if tol is not None and not final - optimal <= tol:
        raise AssertionError(
            f"{name}: after {steps} steps the loss {final} is {final - optimal:.3g} above the "
            f"minimum {optimal}, more than tol={tol}")
    return DescentReport(initial, final, optimal)
