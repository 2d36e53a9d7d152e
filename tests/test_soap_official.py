"""``gnopt.soap`` against the authors' SOAP (issue 14, item 3).

``tests/soap_reference.py`` transcribes the authors' ``soap.py`` to float64
NumPy; here both take the same gradients for 25 steps, the eigenbases
refreshed every 3 steps (8 refreshes), and the parameters must agree after
every step to float32 round-off, as must the Shampoo factors ``L``, ``R``
(which do not depend on a choice of eigenvectors).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gnopt.transforms import constant, scale_by_soap, soap
from gnopt.transforms.soap import layout, merged_shape
from tests.soap_reference import OfficialSOAP, merge_shape

STEPS, FREQUENCY = 25, 3
B1, B2, SHAMPOO_BETA, EPS = 0.9, 0.95, 0.8, 1e-8

# Shapes are chosen so that every factor has full rank by the first refresh
# (t = 3, four gradients): a QR of a rank-deficient L·Q has arbitrary trailing
# columns, so no two implementations could agree after it.
CASES = {
    # max_precond_dim 10: "wide"'s 12 columns use the identity; "b" runs Adam
    "matrices": dict(shapes={"w": (6, 4), "sq": (5, 5), "wide": (3, 12), "b": (7,), "s": ()},
                     options=dict(max_precond_dim=10)),
    "tensor": dict(shapes={"t": (2, 3, 4), "sq": (4, 4)}, options={}),
    "precondition_1d": dict(shapes={"v": (4,), "w": (5, 3)},
                            options=dict(precondition_1d=True)),
    # (2, 3, 4) → (6, 4) and (3, 12) → (3, 12) with the 12 on the identity
    "merge_dims": dict(shapes={"t": (2, 3, 4), "wide": (3, 12), "s": ()},
                       options=dict(merge_dims=True, max_precond_dim=10)),
    # eps added to √V before the bias correction (optax adds it after): a big
    # eps makes the difference visible
    "large_eps": dict(shapes={"w": (6, 4), "b": (5,)}, options=dict(eps=0.1)),
    "normalize_no_bias_correction": dict(shapes={"w": (6, 4), "b": (5,)},
                                         options=dict(normalize_grads=True, correct_bias=False)),
}


def _problem(shapes, seed):
    rng = np.random.default_rng(seed)
    params = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    targets = {k: rng.normal(size=s) for k, s in shapes.items()}

    def grads(params, step):
        """A pull towards a target plus fresh noise: full-rank, changing gradients."""
        noise = np.random.default_rng(1000 * seed + step)
        return {k: (np.asarray(p, np.float64) - targets[k]) + 0.5 * noise.normal(size=p.shape)
                for k, p in params.items()}

    return params, grads


def _checked_bases(factors, first_factors, name):
    """gnopt's first eigenbases after checking that they are eigenbases of the
    reference's first factors, by decreasing eigenvalue; re-orthonormalised in
    float64 (column signs kept)."""
    out = []
    for q, m in zip(factors.bases, first_factors):
        assert (q is None) == (m is None), name
        if q is None:
            out.append(None)
            continue
        q = np.asarray(q, np.float64)
        scale = np.abs(m).max()
        d = q.T @ m @ q
        np.testing.assert_allclose(d - np.diag(np.diag(d)), 0.0, atol=1e-5 * scale)
        assert np.all(np.diff(np.diag(d)) <= 1e-5 * scale), name
        q, r = np.linalg.qr(q)
        out.append(q * np.sign(np.diag(r)))
    return out


def _run(case, weight_decay, *, share_first_bases=True, learning_rate=1e-2, seed=0):
    shapes, options = CASES[case]["shapes"], dict(CASES[case]["options"])
    eps = options.pop("eps", EPS)
    params, grads = _problem(shapes, seed)
    tx = soap(learning_rate, b1=B1, b2=B2, eps=eps, shampoo_beta=SHAMPOO_BETA,
              weight_decay=weight_decay, precondition_frequency=FREQUENCY, **options)
    lr = learning_rate if not callable(learning_rate) else (lambda k: float(learning_rate(k)))
    ref = OfficialSOAP(params, lr=lr, betas=(B1, B2), shampoo_beta=SHAMPOO_BETA, eps=eps,
                       weight_decay=weight_decay, precondition_frequency=FREQUENCY, **options)
    state = tx.init(params)
    update = jax.jit(tx.update)
    ours = jax.tree.map(jnp.asarray, params)
    for call in range(STEPS + 1):
        g = {k: x.astype(np.float32) for k, x in grads(ours, call).items()}
        updates, state = update(jax.tree.map(jnp.asarray, g), state, ours)
        ours = optax.apply_updates(ours, updates)
        factors = state[0].factors
        first = None
        if call == 0 and share_first_bases:
            first = lambda k, gg: _checked_bases(factors[k], gg, k)
        theirs = ref.step(g, first_bases=first)
        for k in shapes:
            np.testing.assert_allclose(ours[k], theirs[k], rtol=2e-5, atol=2e-5,
                                       err_msg=f"{case}: {k} after call {call}")
            for stat, gg in zip(factors[k].stats, ref.state[k]["GG"]):
                if gg is not None:
                    np.testing.assert_allclose(stat, gg, rtol=1e-5, atol=1e-5 * np.abs(gg).max(),
                                               err_msg=f"{case}: factor of {k}, call {call}")


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("case", sorted(CASES))
def test_soap_matches_the_authors_update_through_eight_refreshes(case, weight_decay):
    _run(case, weight_decay)


def test_soap_matches_with_a_warmup_schedule():
    _run("matrices", 0.1, learning_rate=constant(3e-2, warmup_steps=5))


def test_full_rank_first_factors_need_no_shared_basis():
    """Square and 3-axis leaves whose first factors have full rank: each side
    computes its own ``eigh`` (signs may differ; the update does not)."""
    _run("tensor", 0.1, share_first_bases=False)


def test_first_call_sets_factors_to_one_minus_beta_times_gram():
    """The issue's repro: ``L = (1 − β_s) G Gᵀ``, ``R = (1 − β_s) Gᵀ G``, as a lerp from zeros."""
    g = {"s": jnp.array([[1.0, 2.0], [3.0, 4.0]])}
    tx = scale_by_soap(shampoo_beta=0.9)
    update, state = tx.update(g, tx.init(g))
    np.testing.assert_array_equal(update["s"], 0.0)
    np.testing.assert_allclose(state.factors["s"].left, [[0.5, 1.1], [1.1, 2.5]], rtol=1e-6)
    np.testing.assert_allclose(state.factors["s"].right, [[1.0, 1.4], [1.4, 2.0]], rtol=1e-6)


def test_initialising_call_skips_weight_decay():
    params = {"w": jnp.ones((3, 2)), "b": jnp.ones(2)}
    tx = soap(0.1, weight_decay=0.5)
    state = tx.init(params)
    updates, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
    jax.tree.map(lambda u: np.testing.assert_array_equal(u, 0.0), updates)
    updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
    assert all(float(jnp.abs(u).max()) > 0 for u in jax.tree.leaves(updates))


@pytest.mark.parametrize("shape", [(), (5,), (2, 3, 4), (3, 12), (12, 3), (2, 30, 1, 4), (1, 5)])
def test_merged_shape_is_the_reference_rule(shape):
    assert merged_shape(shape, 10) == merge_shape(shape, 10)
    assert np.prod(merged_shape(shape, 10)) == np.prod(shape)


def test_layout_follows_the_authors_choice_of_factors():
    assert layout((), 10) == ((), ())
    assert layout((7,), 10) == ((7,), (False,))
    assert layout((7,), 10, precondition_1d=True) == ((7,), (True,))
    assert layout((11,), 10, precondition_1d=True) == ((11,), (False,))
    assert layout((3, 12), 10) == ((3, 12), (True, False))
    assert layout((2, 3, 4), 10, merge_dims=True) == ((6, 4), (True, True))
    assert layout((2, 3), 10, merge_dims=True) == ((6,), (True,))


@pytest.mark.parametrize("builder, kwargs, name", [
    (soap, dict(learning_rate=-1e-3), "learning_rate"),
    (soap, dict(learning_rate=float("nan")), "learning_rate"),
    (soap, dict(learning_rate=1e-3, b1=1.0), "b1"),
    (soap, dict(learning_rate=1e-3, b2=-0.1), "b2"),
    (soap, dict(learning_rate=1e-3, shampoo_beta=1.5), "shampoo_beta"),
    (soap, dict(learning_rate=1e-3, eps=0.0), "eps"),
    (soap, dict(learning_rate=1e-3, weight_decay=-0.01), "weight_decay"),
    (soap, dict(learning_rate=1e-3, precondition_frequency=2.5), "precondition_frequency"),
    (soap, dict(learning_rate=1e-3, max_precond_dim=-1), "max_precond_dim"),
    (soap, dict(learning_rate=1e-3, merge_dims="yes"), "merge_dims"),
    (scale_by_soap, dict(b1=1.2), "b1"),
    (scale_by_soap, dict(eps=-1e-8), "eps"),
    (scale_by_soap, dict(precondition_frequency=-1), "precondition_frequency"),
    (scale_by_soap, dict(shampoo_beta=1.0), "shampoo_beta"),
])
def test_bad_arguments_name_the_argument_and_value(builder, kwargs, name):
    value = kwargs[name]
    with pytest.raises(ValueError, match=rf"^{builder.__name__}: {name} must be .*got {value!r}"):
        builder(**kwargs)
