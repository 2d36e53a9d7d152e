"""One entry point, :func:`check_all`, that runs every property check on a new
optimizer or preconditioner and says, per check, pass / fail / not applicable
with a one-line reason. ``docs/testing.md`` lists what each check proves and
what it cannot.

Checks (names as in :attr:`KitReport.results`):

* ``purity``: the state is a pytree of arrays; the same inputs twice give the
  same outputs; the state's tree structure never changes; jit equals eager; a
  jitted step traces once. Runs first: if it fails, the other checks are
  skipped (an impure update makes them fail for the wrong reason);
* ``contract``: :func:`~gnopt.testing.check_optimizer_contract` (extra keyword
  arguments, float32 and bfloat16, stable state, ``inject_hyperparams``);
* ``descent``: ``⟨g, u⟩ < 0`` at every step on random quadratics (or on the
  first ``descent_steps`` non-zero steps, for methods with momentum, which may
  overshoot), and the loss falls. A zero update is allowed only with
  ``allow_zero_steps=True`` (methods that reject a step, like Gauss-Newton with
  a controller or PI-Muon, or skip their first one, like SOAP);
* ``psd`` (``linear=True``): ``⟨v, u(v)⟩ < 0`` for every coordinate direction
  and random directions ``v`` fed as the gradient, at the initial state and
  after a few steps: the symmetric part of a linear map ``u = −η P g`` is
  positive definite along each probe;
* ``reference``: steps to reach ``tol`` of the initial gap on the same
  quadratics, at most ``reference_factor`` times the reference's (plus 2); when
  the reference does not reach ``tol`` either, the final gap at most
  ``reference_factor`` times the reference's;
* ``edge_cases``: constant gradient sequences that are exactly zero, one-hot,
  half zero, a dead input feature, tiny (1e-20) and huge (1e15), in float32
  and bfloat16: updates finite, and descent wherever the gradient is not
  tiny. Not applicable to methods that compute their own gradient from the
  batch (Gauss-Newton, PI-Muon: detected by feeding two different gradients);
* ``invariance:<name>`` for each of ``invariances``:
  ``gradient_scale`` (Adam-like: the gradient times 1e-3 or 1e3 gives the same
  trajectory), ``rotation`` (Newton / Gauss-Newton, Muon: the problem in
  rotated coordinates, ``X → QᵀXP``, gives the same losses), ``permutation``
  (diagonal methods: the same with permutation matrices), ``condition``
  (curvature methods: steps to ``tol`` at condition 1e4 at most twice those
  at condition 10, plus 2).

All runs use :class:`~gnopt.testing.problems.Quadratic` problems with a
``(6, 3)`` matrix parameter (``params="dense"``: a
:class:`~gnopt.testing.problems.DenseQuadratic`, for optimizers such as K-FAC
that look for dense layers), every problem of one shape, so each check
compiles once.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import time
from typing import Any, Callable, Mapping, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.tree_utils as otu
from hypothesis import HealthCheck, settings
from jax.flatten_util import ravel_pytree

from gnopt.testing.contract import check_optimizer_contract
from gnopt.testing.problems import AbstractProblem, DenseQuadratic, Quadratic

CHECKS = ("purity", "contract", "descent", "psd", "reference", "edge_cases", "invariance")
INVARIANCES = ("gradient_scale", "rotation", "permutation", "condition")
PROFILE_ENV = "GNOPT_TESTING_PROFILE"
# problems per check and steps per run; "ci" keeps one user optimizer under a minute on 2 CPU cores
PROFILES = {"ci": {"problems": 3, "steps": 100}, "thorough": {"problems": 20, "steps": 200}}
_HEALTH = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture]
# Hypothesis settings for your own @given tests: every example compiles, so no deadline.
ci_settings = settings(max_examples=8, deadline=None, derandomize=True,
                       suppress_health_check=_HEALTH)
thorough_settings = settings(max_examples=100, deadline=None, suppress_health_check=_HEALTH)
TINY, HUGE = 1e-20, 1e15
SHAPE = (6, 3)  # (inputs, outputs) of every kit quadratic


def register_profiles() -> None:
    """Registers :data:`ci_settings` and :data:`thorough_settings` as hypothesis
    profiles ``"gnopt-ci"`` and ``"gnopt-thorough"`` (``settings.load_profile``)."""
    settings.register_profile("gnopt-ci", ci_settings)
    settings.register_profile("gnopt-thorough", thorough_settings)


@dataclasses.dataclass(frozen=True)
class CheckResult:
    """One check's verdict: ``status`` is ``"pass"``, ``"fail"`` or ``"n/a"``."""

    name: str
    status: str
    reason: str = ""
    seconds: float = 0.0  # wall time of the check (compilation included)

    def __str__(self) -> str:
        return f"{self.name}: {self.status}" + (f" — {self.reason}" if self.reason else "")


class KitFailure(AssertionError):
    """Raised by :func:`check_all` with one line per failed check; ``.report`` holds all."""

    def __init__(self, report: KitReport):
        super().__init__("\n".join(str(r) for r in report.failures))
        self.report = report


@dataclasses.dataclass(frozen=True)
class KitReport:
    """Every check's :class:`CheckResult`, in the order they ran."""

    results: tuple[CheckResult, ...]

    def __getitem__(self, name: str) -> CheckResult:
        for result in self.results:
            if result.name == name:
                return result
        raise KeyError(name)

    @property
    def failures(self) -> tuple[CheckResult, ...]:
        return tuple(r for r in self.results if r.status == "fail")

    @property
    def statuses(self) -> dict[str, str]:
        return {r.name: r.status for r in self.results}

    def __str__(self) -> str:
        return "\n".join(str(r) for r in self.results)


class _Failed(Exception):
    """A check's one-line reason for failing."""


class _NotApplicable(Exception):
    """A check's one-line reason for not applying."""


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:300] if text else ''}"


def _build(make_tx: Callable, problem, hyperparams: Mapping[str, Any]):
    """``make_tx(problem=..., **hyperparams)`` if it has a ``problem`` parameter, else without."""
    try:
        takes_problem = "problem" in inspect.signature(make_tx).parameters
    except (TypeError, ValueError):
        takes_problem = False
    return make_tx(problem, **hyperparams) if takes_problem else make_tx(**hyperparams)


def _vdot(a, b) -> jax.Array:
    return sum(jnp.vdot(x.astype(jnp.float32), y.astype(jnp.float32))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _norm(tree) -> jax.Array:
    return jnp.sqrt(_vdot(tree, tree))


def _finite(tree) -> jax.Array:
    return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x.astype(jnp.float32)))
                                for x in jax.tree.leaves(tree)]))


def _transformed(problem: AbstractProblem, left: np.ndarray, right: np.ndarray):
    """The problem in coordinates ``X' = leftᵀ X right`` (``R' = R left``, ``C' = C right``)."""
    left32, right32 = (jnp.asarray(m, jnp.float32) for m in (left, right))

    def weights(tree, f):
        return eqx.tree_at(lambda m: m.weight, tree, f(tree.weight)) if isinstance(
            problem, DenseQuadratic) else f(tree)

    return type(problem)(
        params=weights(problem.params, lambda x: left32.T @ x @ right32),
        inputs=problem.inputs @ left32, targets=problem.targets @ right32,
        solution=weights(problem.solution, lambda x: left.T @ np.asarray(x) @ right))


class _Kit:
    """The transform under test, its problems and its compiled runs."""

    def __init__(self, make_tx, mode, learning_rate, hyperparams, params, problems, steps, seed):
        self.seed, self.steps, self.mode, self.lr = seed, steps, mode, learning_rate
        self.params_kind = params
        self.conditions = np.geomspace(3.0, 100.0, problems) if problems > 1 else np.array([10.0])
        self.problems = [self.problem(seed + i, c) for i, c in enumerate(self.conditions)]
        self.hyperparams = dict(hyperparams or {})
        self.make_tx = make_tx
        self.tx = self.wrap(_build(make_tx, self.problems[0], self.hyperparams))
        self._trajectory = eqx.filter_jit(self._run)
        self.own_gradient = None

    def problem(self, seed: int, condition: float):
        quadratic = Quadratic.random(seed, SHAPE[0], condition, outputs=SHAPE[1])
        if self.params_kind == "dense":
            return DenseQuadratic.from_quadratic(quadratic)
        return quadratic

    def wrap(self, tx):
        if self.mode == "preconditioner":
            return optax.chain(tx, optax.scale(-self.lr))
        return optax.with_extra_args_support(tx)

    def _run(self, problem, grad_scale):
        tx = self.tx
        solution = jax.tree.map(lambda s, p: jnp.asarray(s, p.dtype), problem.solution,
                                problem.params)

        def body(carry, _):
            params, state = carry
            loss, g = jax.value_and_grad(problem.loss)(params)
            updates, state = tx.update(otu.tree_scale(grad_scale, g), state, params,
                                       batch=problem.batch)
            out = (loss, _vdot(g, updates), _norm(g), _norm(updates), _finite(updates))
            return (optax.apply_updates(params, updates), state), out

        (final, _), (losses, gu, gnorm, unorm, finite) = jax.lax.scan(
            body, (problem.params, tx.init(problem.params)), length=self.steps)
        losses = jnp.append(losses, problem.loss(final))
        return losses, gu, gnorm, unorm, finite, problem.loss(solution)

    def trajectory(self, problem, grad_scale: float = 1.0) -> dict[str, np.ndarray]:
        out = self._trajectory(problem, jnp.asarray(grad_scale, jnp.float32))
        names = ("losses", "gu", "gnorm", "unorm", "finite", "optimum")
        return dict(zip(names, (np.asarray(x, np.float64) for x in out)))


def _steps_to(run: dict, tol: float) -> float:
    """First step whose gap is at most ``tol`` of the initial gap (inf if none)."""
    gap = (run["losses"] - run["optimum"]) / max(run["losses"][0] - run["optimum"], 1e-30)
    hit = np.flatnonzero(gap <= tol)
    return float(hit[0]) if hit.size else float("inf")


def _gap(run: dict) -> float:
    return max(float(run["losses"][-1] - run["optimum"]), 0.0)


# ---------------------------------------------------------------- the checks


def _kind(x) -> str:
    weak = getattr(jax.typeof(x), "weak_type", False)
    return f"{jnp.result_type(x).name}{list(jnp.shape(x))}" + (" weak" if weak else "")


def _eager_step_twice(tx, grads, state0, params, batch):
    """One eager update, twice from the same inputs (under jit a Python-side side effect is
    traced once): the same result, array leaves, the state's structure kept."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(state0):
        if not isinstance(leaf, (jax.Array, np.ndarray)):
            raise _Failed(f"state leaf {jax.tree_util.keystr(path)} is a {type(leaf).__name__}, "
                          "not an array: keep every number of the state in a jnp array")
    first = tx.update(grads, state0, params, batch=batch)
    again = tx.update(grads, state0, params, batch=batch)
    for what, a, b in (("updates", first[0], again[0]), ("state", first[1], again[1])):
        if jax.tree.structure(a) != jax.tree.structure(b) or not all(
                np.array_equal(x, y, equal_nan=True)
                for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))):
            raise _Failed(f"the same inputs twice gave different {what}: update() keeps "
                          "state outside the state it returns (a Python dict, a closure, "
                          "a global)")
    tree0 = jax.tree.structure(state0)
    if jax.tree.structure(first[1]) != tree0:
        raise _Failed("the state's tree structure changed after one step: a value kept in a "
                      "static field or Python attribute (e.g. a step counter) must be an "
                      f"array leaf; {str(tree0)[:150]} -> "
                      f"{str(jax.tree.structure(first[1]))[:150]}")
    return first


def _purity(kit: _Kit) -> str:
    tx, problem = kit.tx, kit.problems[0]
    params, batch = problem.params, problem.batch
    state0 = tx.init(params)
    tree0 = jax.tree.structure(state0)
    rng = np.random.default_rng(kit.seed)

    def normal(tree, scale=1.0):
        return jax.tree.map(
            lambda x: scale * jnp.asarray(rng.standard_normal(x.shape), x.dtype), tree)

    grads = [normal(params) for _ in range(3)]
    first = _eager_step_twice(tx, grads[0], state0, params, batch)
    traces = []

    @jax.jit
    def step(p, state, g):
        traces.append(1)
        u, state = tx.update(g, state, p, batch=batch)
        return optax.apply_updates(p, u), u, state

    p, u, state = step(params, state0, grads[0])
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(first[0]), jax.tree.leaves(u)):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        if not (np.isfinite(a).all() and np.isfinite(b).all()):
            break  # non-finite updates are the descent and edge-case checks' to report
        if not np.allclose(a, b, rtol=1e-3, atol=1e-5 * max(np.max(np.abs(a)), 1e-30)):
            raise _Failed(f"jit and eager updates{jax.tree_util.keystr(path)} differ by up to "
                          f"{np.max(np.abs(a - b)):.3g}")
    # two jitted steps from other gradients: identical updates mean the gradient is ignored
    p_other, u_other, state_other = step(params, state0, normal(grads[0], 3.0))
    same = [u, u_other]
    for g in grads[1:]:
        _, u_other, state_other = step(p, state_other, normal(g, 3.0))
        p, u, state = step(p, state, g)
        same.extend([u, u_other])
        if jax.tree.structure(state) != tree0:
            raise _Failed("the state's tree structure changed between jitted steps: a value "
                          "kept in a static field must be an array leaf")
    kit.own_gradient = all(np.array_equal(a, b) for u_a, u_b in zip(same[::2], same[1::2])
                           for a, b in zip(jax.tree.leaves(u_a), jax.tree.leaves(u_b)))
    if len(traces) != 1:
        changed = [f"{jax.tree_util.keystr(path)}: {_kind(a)} -> {_kind(b)}" for (path, a), b in
                   zip(jax.tree_util.tree_leaves_with_path(state0), jax.tree.leaves(state))
                   if _kind(a) != _kind(b)]
        raise _Failed(f"a jitted step traced {len(traces)} times over 5 steps: the state's "
                      "leaves must keep their shape, dtype and weak_type" +
                      (f" ({'; '.join(changed)[:200]})" if changed else ""))
    return "pure; " + ("computes its own gradient (ignores the one given)" if kit.own_gradient
                       else "uses the gradient given")


def _contract(kit: _Kit) -> str:
    problem = kit.problems[0]

    def make(**hyperparams):
        tx = _build(kit.make_tx, problem, hyperparams)
        return optax.chain(tx, optax.scale(-kit.lr)) if kit.mode == "preconditioner" else tx

    check_optimizer_contract(make, problem.params, batch=problem.batch,
                             hyperparams=kit.hyperparams or None)
    return "extra args, float32/bfloat16, stable state" + (
        ", inject_hyperparams" if kit.hyperparams else "")


def _descent(kit: _Kit, descent_steps: int | None, allow_zero: bool) -> str:
    zeros = 0
    for i, problem in enumerate(kit.problems):
        run = kit.trajectory(problem)
        where = f"quadratic #{i} (condition {kit.conditions[i]:.3g})"
        if not run["finite"].all():
            raise _Failed(f"{where}: update not finite at step {int(np.argmin(run['finite']))}")
        zero = run["unorm"] == 0
        counted = np.ones_like(zero) if descent_steps is None else (
            np.cumsum(~zero) <= descent_steps)
        active = (run["gnorm"] > 1e-3 * run["gnorm"][0]) & counted.astype(bool)
        bad = active & ~(run["gu"] < 0) & ~(zero & allow_zero)
        if bad.any():
            t = int(np.argmax(bad))
            hint = (" (a zero update: pass allow_zero_steps=True if the method rejects or skips "
                    "steps)" if zero[t] else "")
            raise _Failed(f"{where}: step {t}: ⟨g, u⟩ = {run['gu'][t]:.3g} ≥ 0, not a descent "
                          f"direction{hint}")
        zeros += int((zero & active).sum())
        if not run["losses"][-1] < run["losses"][0]:
            raise _Failed(f"{where}: the loss did not decrease over {kit.steps} steps: "
                          f"{run['losses'][0]:.4g} -> {run['losses'][-1]:.4g}")
    scope = "every step" if descent_steps is None else f"first {descent_steps} non-zero steps"
    return f"⟨g, u⟩ < 0 on {scope} of {len(kit.problems)} quadratics" + (
        f"; {zeros} zero (rejected/skipped) steps allowed" if zeros else "")


def _psd(kit: _Kit) -> str:
    if kit.own_gradient:
        raise _NotApplicable("the method computes its own gradient, so no direction can be fed")
    problem, tx = kit.problems[0], kit.tx
    flat, unravel = ravel_pytree(problem.params)
    rng = np.random.default_rng(kit.seed + 2)
    probes = np.concatenate([np.eye(flat.size), rng.standard_normal((4, flat.size))])
    probe = jax.jit(lambda state, params, v: _vdot(
        unravel(v), tx.update(unravel(v), state, params, batch=problem.batch)[0]))
    step = jax.jit(lambda state, params: (lambda u_s: (optax.apply_updates(params, u_s[0]),
                                                       u_s[1]))(
        tx.update(jax.grad(problem.loss)(params), state, params, batch=problem.batch)))
    state, params = tx.init(problem.params), problem.params
    for t in range(6):
        if t in (0, 5):
            for k, v in enumerate(probes):
                value = float(probe(state, params, jnp.asarray(v, flat.dtype)))
                if not value < 0:
                    what = (f"coordinate {k}" if k < flat.size
                            else f"random direction {k - flat.size}")
                    raise _Failed(f"after {t} steps, ⟨v, u(v)⟩ = {value:.3g} ≥ 0 for v = {what}: "
                                  "the map g ↦ −u is not positive definite along it")
        params, state = step(state, params)
    return f"⟨v, u(v)⟩ < 0 for {len(probes)} directions at steps 0 and 5"


_REFERENCES_OPTIMIZER = {
    "sgd": lambda lr: optax.sgd(lr),
    "adam": lambda lr: optax.adam(lr),
    "adagrad": lambda lr: optax.adagrad(lr, initial_accumulator_value=0.0),
}
_REFERENCES_PRECONDITIONER = {
    "identity": lambda lr: optax.identity(),
    "adam": lambda lr: optax.scale_by_adam(),
    "adagrad": lambda lr: optax.scale_by_rss(initial_accumulator_value=0.0),
}


def newton(learning_rate: float = 1.0) -> optax.GradientTransformationExtraArgs:
    """Exact Newton on a kit problem: ``u = −η (∇²L)⁻¹ g`` with the Hessian of
    ``problem.loss`` from ``batch`` (the ``"newton"`` reference). ``apply_fn`` and
    ``loss_fn`` are those of :class:`~gnopt.testing.problems.Quadratic`."""
    from gnopt.losses import mean_squared_error
    from gnopt.testing.problems import linear_apply

    def update(updates, state, params=None, *, batch=None, **_):
        flat, unravel = ravel_pytree(params)
        def loss(x):
            p = unravel(x)
            weights = p.weight if isinstance(p, eqx.Module) else p
            return mean_squared_error(linear_apply(weights, batch[0]), batch[1])
        step = jnp.linalg.solve(jax.hessian(loss)(flat), ravel_pytree(updates)[0])
        return unravel(-learning_rate * step), state

    return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update)


def _reference_tx(kit: _Kit, reference):
    if callable(reference):
        return kit.wrap(_build(reference, kit.problems[0], {}))
    if reference == "newton":
        return newton(1.0) if kit.mode == "optimizer" else optax.chain(
            newton(-1.0), optax.scale(-kit.lr))
    table = _REFERENCES_OPTIMIZER if kit.mode == "optimizer" else _REFERENCES_PRECONDITIONER
    if reference not in table:
        raise ValueError(f"check_all: reference must be a callable or one of "
                         f"{sorted(table) + ['newton']} in {kit.mode} mode, got {reference!r}")
    return kit.wrap(table[reference](kit.lr))


def _reference(kit: _Kit, reference, factor: float, tol: float) -> str:
    name = reference if isinstance(reference, str) else getattr(reference, "__name__", "reference")
    other = _Kit.__new__(_Kit)
    other.__dict__.update(kit.__dict__)
    other.tx = _reference_tx(kit, reference)
    other._trajectory = eqx.filter_jit(other._run)
    worst = 0.0
    for i, problem in enumerate(kit.problems):
        mine, ref = kit.trajectory(problem), other.trajectory(problem)
        s_mine, s_ref = _steps_to(mine, tol), _steps_to(ref, tol)
        where = f"quadratic #{i} (condition {kit.conditions[i]:.3g})"
        if np.isfinite(s_ref):
            if not s_mine <= factor * s_ref + 2:
                raise _Failed(f"{where}: {s_mine:.0f} steps to {tol:g} of the initial gap, "
                              f"{name} takes {s_ref:.0f} (allowed: {factor:g}× + 2)")
            worst = max(worst, s_mine / max(s_ref, 1.0))
        elif not np.isfinite(s_mine):
            gaps = _gap(mine), _gap(ref)
            if not gaps[0] <= factor * gaps[1] + 1e-6 * (mine["losses"][0] - mine["optimum"]):
                raise _Failed(f"{where}: after {kit.steps} steps the gap is {gaps[0]:.3g}, "
                              f"{gaps[0] / max(gaps[1], 1e-30):.3g}× {name}'s {gaps[1]:.3g} "
                              f"(allowed: {factor:g}×)")
    return f"steps to {tol:g} within {factor:g}× {name}'s (worst ratio {worst:.2g})"


_EDGE_KINDS = ("zeros", "one-hot", "half zero", "dead feature", "tiny", "huge")


def _edge_gradients(flat_size: int, dims: tuple[int, int],
                    rng) -> list[tuple[str, np.ndarray, bool]]:
    """``(name, flat gradient, descent required)`` for every edge case."""
    normal = rng.standard_normal(flat_size)
    half = np.where(rng.random(flat_size) < 0.5, 0.0, normal)
    dead = normal.reshape(dims).copy()
    dead[rng.integers(dims[0])] = 0.0  # one input feature (a row of X) never seen
    cases = [("zeros", np.zeros(flat_size), False)]
    cases += [(f"one-hot (coordinate {k})", np.eye(flat_size)[k], True)
              for k in range(flat_size)]
    cases += [("half zero", half, True), ("dead feature", dead.reshape(-1), True),
              ("tiny", TINY * normal, False), ("huge", HUGE * normal, True)]
    return cases


def _edge_cases(kit: _Kit, allow_zero: bool, dtypes: Sequence[Any]) -> str:
    if kit.own_gradient:
        raise _NotApplicable("the method computes its own gradient from the batch, so edge-case "
                             "gradients cannot be fed (the purity check detected it)")
    problem, tx, n = kit.problems[0], kit.tx, 3
    for dtype in dtypes:
        params = jax.tree.map(lambda p: jnp.zeros(p.shape, dtype), problem.params)
        flat, unravel = ravel_pytree(params)

        @jax.jit
        def run(g_flat):
            g = unravel(g_flat.astype(dtype))
            def body(state, _):
                u, state = tx.update(g, state, params, batch=problem.batch)
                return state, (_vdot(g, u), _norm(u), _finite(u))
            return jax.lax.scan(body, tx.init(params), length=n)[1]

        rng = np.random.default_rng(kit.seed + 3)
        for name, g, descent in _edge_gradients(flat.size, SHAPE, rng):
            gu, unorm, finite = (np.asarray(x) for x in run(jnp.asarray(g, jnp.float32)))
            label = f"{jnp.dtype(dtype).name} {name} gradient"
            if not finite.all():
                raise _Failed(f"{label}: update not finite at step {int(np.argmin(finite))}")
            bad = descent & ~(gu < 0) & ~((unorm == 0) & allow_zero)
            if bad.any():
                t = int(np.argmax(bad))
                raise _Failed(f"{label}, fed {n} times: ⟨g, u⟩ = {gu[t]:.3g} ≥ 0 at step {t}")
    names = ", ".join(_EDGE_KINDS)
    return f"{names}; {', '.join(jnp.dtype(d).name for d in dtypes)}: finite, descent"


def _close(a: dict, b: dict, steps: int, rtol: float) -> tuple[bool, float]:
    if not (np.isfinite(a["losses"][:steps]).all() and np.isfinite(b["losses"][:steps]).all()):
        raise _Failed(f"the losses of the first {steps} steps are not finite")
    gap0 = a["losses"][0] - a["optimum"]
    diff = np.max(np.abs(a["losses"][:steps] - b["losses"][:steps])) / max(gap0, 1e-30)
    return diff <= rtol, float(diff)


def _invariance(kit: _Kit, name: str, tol: float) -> str:
    horizon, rtol = min(kit.steps, 30), 1e-3
    rng = np.random.default_rng(kit.seed + 4)
    if name == "gradient_scale":
        if kit.own_gradient:
            raise _NotApplicable("the method computes its own gradient; scale the loss instead")
        for i, problem in enumerate(kit.problems):
            base = kit.trajectory(problem)
            for scale in (1e-3, 1e3):
                ok, diff = _close(base, kit.trajectory(problem, scale), horizon, rtol)
                if not ok:
                    raise _Failed(f"quadratic #{i}: gradients × {scale:g} change the losses of "
                                  f"the first {horizon} steps by {diff:.3g} of the initial gap")
        return f"gradients × 1e-3 and × 1e3 give the same {horizon}-step losses"
    if name in ("rotation", "permutation"):
        where = "rotated" if name == "rotation" else "permuted"
        for i, problem in enumerate(kit.problems):
            if name == "rotation":
                left = np.linalg.qr(rng.standard_normal((SHAPE[0],) * 2))[0]
                right = np.linalg.qr(rng.standard_normal((SHAPE[1],) * 2))[0]
            else:
                left, right = (np.eye(k)[rng.permutation(k)] for k in SHAPE)
            ok, diff = _close(kit.trajectory(problem),
                              kit.trajectory(_transformed(problem, left, right)), horizon, rtol)
            if not ok:
                raise _Failed(f"quadratic #{i}: in {where} coordinates (X → QᵀXP) the losses of "
                              f"the first {horizon} steps differ by {diff:.3g} of the initial gap")
        return f"the same {horizon}-step losses in {where} coordinates"
    if name == "condition":
        for i in range(len(kit.problems)):
            low = _steps_to(kit.trajectory(kit.problem(kit.seed + i, 10.0)), tol)
            high = _steps_to(kit.trajectory(kit.problem(kit.seed + i, 1e4)), tol)
            if not np.isfinite(low):
                raise _Failed(f"quadratic #{i}: does not reach {tol:g} of the initial gap in "
                              f"{kit.steps} steps even at condition 10")
            if not high <= 2 * low + 2:
                raise _Failed(f"quadratic #{i}: {high:.0f} steps to {tol:g} at condition 1e4, "
                              f"{low:.0f} at condition 10 (allowed: 2× + 2)")
        return "steps to tolerance do not grow from condition 10 to 1e4"
    raise ValueError(f"check_all: invariances must be among {INVARIANCES}, got {name!r}")


def _check_options(mode: str, params: str, checks, invariances, profile: str | None) -> str:
    """Raises ``ValueError`` naming a bad option of :func:`check_all`; returns the profile."""
    if mode not in ("optimizer", "preconditioner"):
        raise ValueError(f"check_all: mode must be 'optimizer' or 'preconditioner', got {mode!r}")
    if params not in ("matrix", "dense"):
        raise ValueError(f"check_all: params must be 'matrix' or 'dense', got {params!r}")
    for name in checks:
        if name not in CHECKS:
            raise ValueError(f"check_all: unknown check {name!r}; choose from {CHECKS}")
    for name in invariances:
        if name not in INVARIANCES:
            raise ValueError(f"check_all: unknown invariance {name!r}; choose from {INVARIANCES}")
    profile = profile or os.environ.get(PROFILE_ENV, "ci")
    if profile not in PROFILES:
        raise ValueError(f"check_all: profile must be one of {sorted(PROFILES)}, got {profile!r}")
    return profile


def _run_plan(plan, checks) -> list[CheckResult]:
    """Runs the ``(name, check or reason it does not apply)`` of ``plan`` selected by
    ``checks``, in order; after a failed purity check the rest are skipped."""
    results, impure = [], False
    for name, run in plan:
        base = name.split(":")[0]
        if base not in checks:
            continue
        if isinstance(run, str):
            results.append(CheckResult(name, "n/a", run))
            continue
        if impure:
            results.append(CheckResult(name, "n/a", "skipped: the purity check failed"))
            continue
        start = time.perf_counter()
        try:
            status, reason = "pass", run()
        except _NotApplicable as err:
            status, reason = "n/a", str(err)
        except _Failed as err:
            status, reason = "fail", str(err)
        except AssertionError as err:
            status, reason = "fail", str(err).splitlines()[0][:400]
        except Exception as err:  # a crash is a failure with its reason, never a raw traceback
            status, reason = "fail", f"raised {_one_line(err)}"
        results.append(CheckResult(name, status, reason, time.perf_counter() - start))
        impure |= name == "purity" and results[-1].status == "fail"
    return results


def check_all(
    make_tx: Callable[..., optax.GradientTransformation],
    *,
    mode: str = "optimizer",
    learning_rate: float = 0.3,
    reference: str | Callable | None = None,
    reference_factor: float = 3.0,
    invariances: Sequence[str] = (),
    checks: Sequence[str] = CHECKS,
    linear: bool = False,
    descent_steps: int | None = None,
    allow_zero_steps: bool = False,
    hyperparams: Mapping[str, Any] | None = None,
    params: str = "matrix",
    profile: str | None = None,
    tol: float = 1e-3,
    dtypes: Sequence[Any] = (jnp.float32, jnp.bfloat16),
    seed: int = 0,
    raise_on_failure: bool = True,
) -> KitReport:
    """Runs every check of this module on an optimizer or a preconditioner.

    Args:
      make_tx: builds the transform: ``make_tx(**hyperparams)``, or
        ``make_tx(problem, **hyperparams)`` when it has a parameter named
        ``problem`` (methods that need the model, e.g. Gauss-Newton:
        ``lambda problem: gnopt.gauss_newton(problem.apply_fn, problem.loss_fn)``;
        it is called once, the batch comes with every update). A bare
        ``optax.GradientTransformation`` is wrapped in
        ``optax.with_extra_args_support`` for the runs; the ``contract`` check
        reports that it needs the wrap.
      mode: ``"optimizer"``: ``make_tx`` is a whole optimizer, its updates are
        added to the parameters (sign and learning rate included, like
        ``optax.adam(1e-1)``). ``"preconditioner"``: ``make_tx`` returns a
        direction ``P g`` (same sign as ``g``, like ``optax.scale_by_adam()``);
        the kit chains ``optax.scale(-learning_rate)`` after it.
      learning_rate: the step size of preconditioner mode and of named references.
      reference: ``None`` (skip), a callable built like ``make_tx`` (same mode),
        or a name: ``"sgd"``, ``"adam"``, ``"adagrad"``, ``"newton"`` (optimizer
        mode, ``learning_rate`` for the first three) or ``"identity"``, ``"adam"``,
        ``"adagrad"``, ``"newton"`` (preconditioner mode: ``optax.identity``,
        ``scale_by_adam``, ``scale_by_rss``, the inverse Hessian). Adagrad's
        accumulator starts at 0 (optax's default 0.1 is not scale invariant).
      reference_factor: steps to ``tol`` may be this many times the reference's (+ 2).
      invariances: any of ``"gradient_scale"``, ``"rotation"``, ``"permutation"``,
        ``"condition"`` (see the module docstring; choose those that should hold).
      checks: the checks to run (default all of :data:`CHECKS`; ``"psd"`` needs
        ``linear=True``, ``"reference"`` a reference, ``"invariance"`` invariances).
      linear: the direction is linear in ``g`` at a fixed state: run ``psd``.
      descent_steps: ``None``: descent at every step. An int ``k``: only the
        first ``k`` non-zero steps (momentum methods overshoot: with heavy-ball
        momentum ``⟨g, u⟩ > 0`` after a sign change is not a bug; the edge cases
        still check descent under constant gradients at every step).
      allow_zero_steps: a zero update passes the descent checks (a rejected or
        skipped step); the loss must still fall over the run.
      hyperparams: keyword arguments of ``make_tx``; the contract also checks
        them under ``optax.inject_hyperparams``.
      params: ``"matrix"`` (a ``(6, 3)`` array) or ``"dense"`` (the matrix as the
        weight of a dense layer, :class:`~gnopt.testing.problems.DenseQuadratic`).
      profile: ``"ci"`` (3 problems, 100 steps) or ``"thorough"`` (20, 200);
        default from the environment variable ``GNOPT_TESTING_PROFILE``, else ``"ci"``.
      tol: the fraction of the initial gap ``L(θ₀) − L*`` that counts as reached.
      dtypes: parameter dtypes of the edge cases.
      seed: seed of the problems and probes.
      raise_on_failure: raise :class:`KitFailure` (an ``AssertionError``, one line
        per failed check) if any check fails; else just return the report.

    Returns:
      The :class:`KitReport` (``str(report)``: one line per check).
    """
    profile = _check_options(mode, params, checks, invariances, profile)
    kit = _Kit(make_tx, mode, learning_rate, hyperparams, params, seed=seed, **PROFILES[profile])

    plan: list[tuple[str, Callable[[], str] | str]] = [("purity", lambda: _purity(kit))]
    plan.append(("contract", lambda: _contract(kit)))
    plan.append(("descent", lambda: _descent(kit, descent_steps, allow_zero_steps)))
    plan.append(("psd", (lambda: _psd(kit)) if linear else
                 "not linear in g (pass linear=True for a linear preconditioner)"))
    plan.append(("reference", (lambda: _reference(kit, reference, reference_factor, tol))
                 if reference is not None else "no reference given"))
    plan.append(("edge_cases", lambda: _edge_cases(kit, allow_zero_steps, dtypes)))
    for name in invariances:
        plan.append((f"invariance:{name}", lambda name=name: _invariance(kit, name, tol)))
    if not invariances:
        plan.append(("invariance", "none selected"))

    results = _run_plan(plan, checks)
    report = KitReport(tuple(results))
    if raise_on_failure and report.failures:
        raise KitFailure(report)
    return report
