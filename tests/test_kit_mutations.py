"""The kit tested by mutation: broken diagonal (Adagrad-like) preconditioners.

Each mutant is a mistake a researcher makes writing ``u = g / √(Σ g²)``; the
kit (``gnopt.testing.check_all``, one call, the settings of the README) must
fail each one on the named check with a reason matching the pattern, and pass
the correct versions. Two bugs it cannot catch are shown at the end, with why.
"""

import re

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gnopt.testing as gt

EPS = 1e-8


def _transform(update, init=lambda params: jax.tree.map(jnp.zeros_like, params)):
    return lambda: optax.GradientTransformationExtraArgs(init, update)


def _zeros(params):
    return jax.tree.map(jnp.zeros_like, params)


def correct(g, acc, params=None, **_):
    acc = jax.tree.map(lambda a, x: a + x * x, acc, g)
    return jax.tree.map(lambda x, a: x / (jnp.sqrt(a) + EPS), g, acc), acc


def negative_coordinate(g, acc, params=None, **_):
    u, acc = correct(g, acc)
    return jax.tree.map(lambda x: x.at[0, 0].multiply(-0.1), u), acc


def forgets_accumulator(g, acc, params=None, **_):
    u, _ = correct(g, acc)  # the new accumulator is not returned: sign descent
    return u, acc


def zero_over_zero(g, acc, params=None, **_):
    acc = jax.tree.map(lambda a, x: a + x * x, acc, g)
    return jax.tree.map(lambda x, a: x / jnp.sqrt(a), g, acc), acc


_MEMORY = {}


def python_dict(g, acc, params=None, **_):
    old = _MEMORY.get("acc", _zeros(g))
    _MEMORY["acc"] = new = jax.tree.map(lambda a, x: a + x * x, old, g)
    return jax.tree.map(lambda x, a: x / (jnp.sqrt(a) + EPS), g, new), acc


class Counted(eqx.Module):
    acc: object
    count: int = eqx.field(static=True)


def static_counter(g, state, params=None, **_):
    u, acc = correct(g, state.acc)
    return u, Counted(acc, state.count + 1)


def ascends(g, acc, params=None, **_):
    u, acc = correct(g, acc)
    return jax.tree.map(jnp.negative, u), acc


def forgets_square(g, acc, params=None, **_):
    acc = jax.tree.map(lambda a, x: a + x, acc, g)
    return jax.tree.map(lambda x, a: x / (jnp.sqrt(a) + EPS), g, acc), acc


def wrong_power(g, acc, params=None, **_):
    acc = jax.tree.map(lambda a, x: a + x * x, acc, g)
    return jax.tree.map(lambda x, a: x / (a + EPS), g, acc), acc


def flipped_accumulator(g, acc, params=None, **_):
    acc = jax.tree.map(lambda a, x: a + x * x, acc, g)
    return jax.tree.map(lambda x, a: x / (jnp.sqrt(a[::-1]) + EPS), g, acc), acc


def casts_to_float32(g, acc, params=None, **_):
    u, acc = correct(g, acc)
    return jax.tree.map(lambda x: x.astype(jnp.float32), u), acc


def huge_epsilon(g, acc, params=None, **_):
    acc = jax.tree.map(lambda a, x: a + x * x, acc, g)
    return jax.tree.map(lambda x, a: x / (jnp.sqrt(a) + 1.0), g, acc), acc


def previous_gradient(g, state, params=None, **_):
    acc, previous = state
    u, acc = correct(previous, acc)
    return u, (acc, g)


def accumulator_lags(g, acc, params=None, **_):
    new = jax.tree.map(lambda a, x: a + x * x, acc, g)  # divides by the old sum, no eps
    return jax.tree.map(lambda x, a: x / jnp.sqrt(a), g, acc), new


def counter_turns_strong(g, state, params=None, **_):
    u, acc = correct(g, state[0])
    return u, (acc, state[1].astype(jnp.int32) + 1)


def python_int_counter(g, state, params=None, **_):
    u, acc = correct(g, state[0])
    return u, (acc, state[1])


_RNG = np.random.default_rng(0)


def host_noise(g, acc, params=None, **_):
    u, acc = correct(g, acc)
    return jax.tree.map(lambda x: x * (1 + 0.01 * _RNG.standard_normal()), u), acc


def clipped_tiny(g, acc, params=None, **_):
    u, acc = correct(g, acc)
    return jax.tree.map(lambda x: jnp.clip(x, -1e-3, 1e-3), u), acc


def no_extra_args():  # a whole optimizer, built as a bare optax.GradientTransformation
    return optax.GradientTransformation(
        _zeros, lambda g, acc, params=None: (lambda u_acc: (
            jax.tree.map(lambda x: -0.3 * x, u_acc[0]), u_acc[1]))(correct(g, acc)))


def fixed_diagonal(scales):
    """A linear preconditioner ``u = D g`` with a fixed diagonal (``psd`` applies)."""
    def update(g, state, params=None, **_):
        return jax.tree.map(lambda x: x * jnp.asarray(scales, x.dtype).reshape(x.shape), g), state
    return _transform(update, lambda params: optax.EmptyState())


RUN = dict(mode="preconditioner", reference="adagrad",
           invariances=("gradient_scale", "permutation"))
# name: (make_tx, extra check_all arguments, {check: reason pattern} the kit must report)
MUTANTS = {
    "negative_coordinate": (_transform(negative_coordinate), {},
                            {"edge_cases": r"one-hot \(coordinate 0\).*⟨g, u⟩ = .* ≥ 0"}),
    "forgets_accumulator": (_transform(forgets_accumulator), {},
                            {"reference": r"inf steps to 0.001 .* adagrad takes"}),
    "zero_over_zero": (_transform(zero_over_zero), {},
                       {"edge_cases": r"zeros gradient: update not finite"}),
    "python_dict": (_transform(python_dict), {},
                    {"purity": r"same inputs twice gave different updates"}),
    "static_counter": (_transform(static_counter, lambda p: Counted(_zeros(p), 0)), {},
                       {"purity": r"tree structure changed .* static field"}),
    "ascends": (_transform(ascends), {}, {"descent": r"step 0: ⟨g, u⟩ = .* not a descent"}),
    "forgets_square": (_transform(forgets_square), {}, {"descent": r"not finite"}),
    "wrong_power": (_transform(wrong_power), {},
                    {"invariance:gradient_scale": r"gradients × 0.001 change the losses"}),
    "flipped_accumulator": (_transform(flipped_accumulator), {},
                            {"invariance:permutation": r"permuted coordinates .* differ"}),
    "casts_to_float32": (_transform(casts_to_float32), {},
                         {"contract": r"bfloat16 params: \(c\).*float32"}),
    "huge_epsilon": (_transform(huge_epsilon), {},
                     {"invariance:gradient_scale": r"change the losses"}),
    "previous_gradient": (_transform(previous_gradient, lambda p: (_zeros(p), _zeros(p))), {},
                          {"descent": r"step 0: ⟨g, u⟩ = 0 .* zero update"}),
    "accumulator_lags": (_transform(accumulator_lags), {}, {"descent": r"not finite"}),
    "counter_turns_strong": (_transform(counter_turns_strong,
                                        lambda p: (_zeros(p), jnp.asarray(0))),
                             {}, {"purity": r"traced 2 times .* int32\[\] weak -> int32\[\]"}),
    "python_int_counter": (_transform(python_int_counter, lambda p: (_zeros(p), 0)), {},
                           {"purity": r"state leaf \[0\]\[1\] is a int"}),
    "host_noise": (_transform(host_noise), {}, {"purity": r"same inputs twice"}),
    "clipped_tiny": (_transform(clipped_tiny), {}, {"reference": r"adagrad takes"}),
    "no_extra_args": (no_extra_args, dict(mode="optimizer", reference="adagrad"),
                      {"contract": r"with_extra_args_support"}),
    "indefinite_linear": (fixed_diagonal([1.0] * 17 + [-0.1]), dict(linear=True, reference=None),
                          {"psd": r"⟨v, u\(v\)⟩ = .* ≥ 0 for v = coordinate 17"}),
}


@pytest.mark.parametrize("name", sorted(MUTANTS))
def test_kit_catches_mutant(name):
    make_tx, extra, expected = MUTANTS[name]
    _MEMORY.clear()
    report = gt.check_all(make_tx, raise_on_failure=False, **(RUN | extra))
    for check, pattern in expected.items():
        assert report[check].status == "fail", f"{name}: {check} did not fail:\n{report}"
        assert re.search(pattern, report[check].reason), report[check].reason


def test_kit_raises_one_line_per_failed_check():
    with pytest.raises(gt.KitFailure, match=r"^purity: fail — the same inputs twice") as info:
        gt.check_all(_transform(host_noise), **RUN)
    assert len(str(info.value).splitlines()) == 1
    assert info.value.report["descent"].reason == "skipped: the purity check failed"


def test_kit_passes_the_correct_versions():
    report = gt.check_all(_transform(correct), **RUN)
    assert set(report.statuses.values()) == {"pass", "n/a"}, report
    assert report["psd"].status == "n/a"  # not linear in g
    report = gt.check_all(fixed_diagonal(np.linspace(0.2, 1.0, 18)), mode="preconditioner",
                          linear=True, invariances=())
    assert report["psd"].status == "pass" and report["descent"].status == "pass", report


# Bugs the kit cannot catch, and why: it runs one (6, 3) matrix leaf for 100 steps (ci).
def vector_leaves_ascend(g, acc, params=None, **_):
    u, acc = correct(g, acc)
    return jax.tree.map(lambda x: -x if x.ndim == 1 else x, u), acc


def breaks_after_step_500(g, state, params=None, **_):
    acc, count = state
    u, acc = correct(g, acc)
    return jax.tree.map(lambda x: jnp.where(count > 500, -x, x), u), (acc, count + 1)


@pytest.mark.parametrize("make_tx", [
    _transform(vector_leaves_ascend),  # the kit's problems have no 1-D leaf
    _transform(breaks_after_step_500, lambda p: (_zeros(p), jnp.zeros((), jnp.int32))),
])
def test_kit_cannot_see_bugs_outside_its_problems(make_tx):
    gt.check_all(make_tx, **RUN)
