"""The optimizer contract, shared by every optimizer gnopt ships.

``gnopt.testing.check_optimizer_contract``: extra keyword arguments ignored,
one trace over 5 jitted steps, float32 and bfloat16 parameter dtypes kept,
state structure/shapes/dtypes stable, ``optax.inject_hyperparams`` works and
matches, everything finite.
"""

import jax
import numpy as np
import optax
import pytest

import gnopt
from gnopt.losses import softmax_cross_entropy
from gnopt.models import MLP
from gnopt.testing import check_optimizer_contract
from gnopt.transforms.kfac import tapped_call

APPLY = lambda model, x: model(x)
STATIC = ("apply_fn", "loss_fn")


def _gn(**kwargs):
    return lambda learning_rate: gnopt.gauss_newton(APPLY, softmax_cross_entropy,
                                                    learning_rate=learning_rate, **kwargs)


OPTIMIZERS = {
    "adamw": gnopt.adamw,
    "lion": gnopt.lion,
    "muon": gnopt.muon,
    "soap": gnopt.soap,
    "shampoo": gnopt.shampoo,
    "kfac": lambda learning_rate: gnopt.kfac(tapped_call, softmax_cross_entropy, learning_rate,
                                             inverse_every=2),
    "gn_cg_full": _gn(solver=gnopt.solvers.cg(max_iters=3), damping=1e-2),
    "gn_inner_layerwise": _gn(solver=gnopt.solvers.inner_optimizer(gnopt.inner_muon(1e-2), 4),
                              curvature=gnopt.curvature.layerwise(),
                              line_search=gnopt.line_search.grid(3)),
    "gn_prox_linear": _gn(solver=gnopt.solvers.prox_linear(gnopt.inner_adamw(1e-2), 4),
                          line_search=gnopt.line_search.backtracking(max_evals=3)),
    "gn_adaptive_damping": _gn(solver=gnopt.solvers.cg(max_iters=3),
                               damping=gnopt.control.damping_controller()),
    "pi_muon": lambda learning_rate: gnopt.pi_muon(APPLY, softmax_cross_entropy, learning_rate,
                                                   solver=gnopt.solvers.cg(max_iters=3)),
    "fuse_soap": lambda learning_rate: gnopt.fuse(gnopt.soap(learning_rate), APPLY,
                                                  softmax_cross_entropy,
                                                  solver=gnopt.solvers.cg(max_iters=3)),
    "gn_chain_by_hand": lambda learning_rate: gnopt.accept_step(optax.chain(
        gnopt.scale_by_gauss_newton(APPLY, softmax_cross_entropy, solver=gnopt.solvers.cg(max_iters=3),
                                    curvature=gnopt.curvature.layerwise()),
        optax.scale(learning_rate),
        gnopt.scale_by_line_search(APPLY, softmax_cross_entropy, gnopt.line_search.grid(3)))),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_every_optimizer_passes_the_contract(name):
    model = MLP([3, 8, 4], key=jax.random.key(0))
    rng = np.random.default_rng(0)
    batch = (rng.normal(size=(8, 3)).astype(np.float32), rng.integers(0, 4, size=8))
    check_optimizer_contract(OPTIMIZERS[name], model, batch=batch, extra_args={"unused_extra": 1.0},
                             hyperparams={"learning_rate": 1e-2})
