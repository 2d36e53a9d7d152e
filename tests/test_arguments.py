"""Construction-time checks of gnopt's public builders: a bad hyper-parameter is a
one-line ``ValueError`` naming the builder, the argument and the value."""

import pytest

import gnopt
from gnopt import control, line_search, solvers
from gnopt.transforms import baselines, kfac, muon, shampoo

apply_fn = lambda params, x: x  # noqa: E731
loss_fn = lambda out, y: 0.0  # noqa: E731

BAD = [
    ("inner_muon", lambda: solvers.inner_muon(-0.01), "learning_rate", "-0.01"),
    ("inner_muon", lambda: solvers.inner_muon("0.01"), "learning_rate", "'0.01'"),
    ("inner_muon", lambda: solvers.inner_muon(beta=1.5), "beta", "1.5"),
    ("inner_adamw", lambda: solvers.inner_adamw(1e-2, b2=-0.1), "b2", "-0.1"),
    ("inner_adamw", lambda: solvers.inner_adamw(1e-2, warmup_fraction=2.0), "warmup_fraction", "2.0"),
    ("inner_optimizer", lambda: solvers.inner_optimizer(solvers.inner_muon(), 0), "inner_batch_size", "0"),
    ("prox_linear", lambda: solvers.prox_linear(solvers.inner_muon(), 2.5), "inner_batch_size", "2.5"),
    ("cg", lambda: solvers.cg(max_iters=0), "max_iters", "0"),
    ("cg", lambda: solvers.cg(tol=float("nan")), "tol", "nan"),
    ("line_search.grid", lambda: line_search.grid(num=0), "num", "0"),
    ("line_search.grid", lambda: line_search.grid(scale=-1.0), "scale", "-1.0"),
    ("line_search.backtracking", lambda: line_search.backtracking(c=2.0), "c", "2.0"),
    ("line_search.backtracking", lambda: line_search.backtracking(max_evals=0), "max_evals", "0"),
    ("gauss_newton", lambda: gnopt.gauss_newton(apply_fn, loss_fn, learning_rate=-1.0), "learning_rate", "-1.0"),
    ("gauss_newton", lambda: gnopt.gauss_newton(apply_fn, loss_fn, damping="1e-3"), "damping", "'1e-3'"),
    ("pi_muon", lambda: gnopt.pi_muon(apply_fn, loss_fn, -0.02), "learning_rate", "-0.02"),
    ("pi_muon", lambda: gnopt.pi_muon(apply_fn, loss_fn, 0.02, trust_batch_size=0), "trust_batch_size", "0"),
    ("muon", lambda: muon(0.02, beta=-0.5), "beta", "-0.5"),
    ("muon", lambda: muon(0.02, ns_steps=0), "ns_steps", "0"),
    ("shampoo", lambda: shampoo(1e-3, update_frequency=0), "update_frequency", "0"),
    ("kfac", lambda: kfac(apply_fn, loss_fn, 1e-3, ema_decay=1.5), "ema_decay", "1.5"),
    ("adamw", lambda: baselines.adamw(-1e-3), "learning_rate", "-0.001"),
    ("lion", lambda: baselines.lion(1e-3, b1=2.0), "b1", "2.0"),
    ("PIController", lambda: control.damping_controller(kp="0.5"), "kp", "'0.5'"),
    ("PIController", lambda: control.fusion_weight_controller(ki=-1.0), "ki", "-1.0"),
    ("nielsen_damping", lambda: control.nielsen_damping(float("inf")), "damping0", "inf"),
]


@pytest.mark.parametrize("where, build, name, shown", BAD, ids=[f"{b[0]}-{b[2]}" for b in BAD])
def test_a_bad_hyperparameter_is_one_line_naming_it(where, build, name, shown):
    with pytest.raises(ValueError) as info:
        build()
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{where}: {name} must be"), message
    assert f"got {shown}" in message, message


def test_good_values_and_schedules_pass():
    solvers.inner_muon(1e-2, clip=None)
    gnopt.gauss_newton(apply_fn, loss_fn, learning_rate=lambda t: 0.5, damping=0)
    gnopt.pi_muon(apply_fn, loss_fn, lambda t: 0.02)
    line_search.backtracking(shrink=0.5, c=1e-4)
    muon(0.0)
