"""Optimizers state what they need from the trainer (gnopt.requirements); nothing is
guessed from a builder's signature."""

import functools

import optax
import pytest

import gnopt
from gnopt import registry, train as train_lib
from gnopt.losses import mean_squared_error
from gnopt.requirements import Requirements, requirements_of


def test_gnopt_builders_state_their_needs_also_through_gin():
    gn = Requirements(("apply_fn", "loss_fn"), whole_batch=True, own_gradient=True)
    for name in ("gnopt.gauss_newton", "gnopt.pi_muon", "gnopt.fuse"):
        assert requirements_of(registry.CONFIGURABLES[name]) == gn, name
    assert requirements_of(registry.CONFIGURABLES["gnopt.transforms.kfac"]) == Requirements(
        ("apply_fn", "loss_fn"), whole_batch=True, own_gradient=False)
    for name in ("optax.adamw", "gnopt.transforms.soap"):
        assert requirements_of(registry.CONFIGURABLES[name]) == Requirements(), name
    assert requirements_of(optax.adam(0.1)) == Requirements()
    assert requirements_of(functools.partial(gnopt.gauss_newton, solver=gnopt.solvers.cg())) == gn


def test_a_declared_user_builder_gets_what_it_asked_for():
    seen = {}

    @gnopt.requires("loss_fn", "total_steps")
    def schedule_aware(loss_fn, total_steps, learning_rate=0.1):
        seen.update(loss_fn=loss_fn, total_steps=total_steps)
        return optax.sgd(optax.linear_schedule(learning_rate, 0.0, total_steps))

    tx, needs = train_lib.build_optimizer(schedule_aware, loss_fn=mean_squared_error, total_steps=7,
                                          grad_accum_steps=2)
    assert seen == {"loss_fn": mean_squared_error, "total_steps": 7}
    assert not needs.whole_batch and not needs.own_gradient  # so accumulation is allowed


def test_an_undeclared_need_is_a_config_error_naming_the_fix():
    def second_order(apply_fn, loss_fn, learning_rate=1.0):
        return optax.sgd(learning_rate)

    with pytest.raises(train_lib.ConfigError, match=r"needs \['apply_fn', 'loss_fn'\] but does not "
                                                    r"state it; declare it with @gnopt.requires"):
        train_lib.build_optimizer(second_order, loss_fn=mean_squared_error, total_steps=1)


def test_whole_batch_optimizers_refuse_accumulation():
    with pytest.raises(train_lib.ConfigError, match="grad_accum_steps > 1 needs a first-order"):
        train_lib.build_optimizer(gnopt.gauss_newton, loss_fn=mean_squared_error, total_steps=1,
                                  grad_accum_steps=2)


def test_requires_names_an_unknown_argument():
    with pytest.raises(ValueError, match=r"requires: unknown argument\(s\) \['batch'\]"):
        gnopt.requires("batch")
