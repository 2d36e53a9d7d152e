"""Run in a subprocess with 8 simulated CPU devices by tests/test_distributed.py.

Prints one JSON line: per optimizer and mesh, the 3 training losses and
whether parameters and optimizer state carry the requested shardings.
"""

import json
import os

assert "xla_force_host_platform_device_count=8" in os.environ.get("XLA_FLAGS", "")

import jax
import numpy as np
import optax

import gnopt
from gnopt import distributed as dist
from gnopt.models import LLaMA, llama_config


def optimizers(apply_fn, loss_fn):
    return {
        "adamw": optax.adamw(3e-3),
        "gn_full": gnopt.gauss_newton(apply_fn, loss_fn, solver=gnopt.solvers.cg(max_iters=4),
                                      damping=1.0, line_search=gnopt.line_search.grid(3)),
        "gn_layerwise": gnopt.gauss_newton(
            apply_fn, loss_fn, solver=gnopt.solvers.inner_optimizer(gnopt.inner_adamw(1e-2), 8),
            curvature=gnopt.curvature.layerwise(), line_search=gnopt.line_search.grid(3)),
    }


def run(tx, params, batches, mesh):
    loss_fn = gnopt.losses.softmax_cross_entropy

    def step(params, state, batch):
        loss, grads = jax.value_and_grad(lambda p: loss_fn(p(batch[0]), batch[1]))(params)
        updates, state = tx.update(grads, state, params, batch=batch)
        return optax.apply_updates(params, updates), state, loss

    if mesh is None:
        state = tx.init(params)
        jstep = jax.jit(step)
    else:
        params = dist.shard_tree(params, mesh)
        state_sh = dist.tree_shardings(jax.eval_shape(tx.init, params), mesh)
        state = jax.jit(tx.init, out_shardings=state_sh)(params)
        param_sh = dist.tree_shardings(params, mesh)
        jstep = jax.jit(step, out_shardings=(param_sh, state_sh, dist.replicated(mesh)))
    losses = []
    for batch in batches:
        if mesh is not None:
            batch = dist.global_batch(batch, mesh)
        params, state, loss = jstep(params, state, batch)
        losses.append(float(loss))
    ok = True
    if mesh is not None:
        for tree in (params, state):
            want = dist.tree_shardings(tree, mesh)
            for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(want)):
                ok &= x.sharding.is_equivalent_to(s, x.ndim)
        ok &= any(len(x.sharding.spec) and "fsdp" in x.sharding.spec for x in jax.tree.leaves(params)) \
            or mesh.shape["fsdp"] == 1
    return losses, bool(ok)


def main():
    assert len(jax.devices()) == 8
    cfg = llama_config("tiny", vocab_size=64, d_model=32, n_layers=1, n_heads=4, d_ff=64, seq_len=16)
    params = LLaMA(cfg, key=jax.random.key(0))
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 64, size=(32, 17)).astype(np.int32)
    batches = [(tokens[:, :-1], tokens[:, 1:])] * 3  # one batch: every optimizer must lower its loss
    out = {}
    for name, tx in optimizers(lambda m, x: m(x), gnopt.losses.softmax_cross_entropy).items():
        for label, mesh in (("1", None), ("2x4", dist.make_mesh(2, 4)), ("8x1", dist.make_mesh(8, 1))):
            losses, ok = run(tx, params, batches, mesh)
            out[f"{name}/{label}"] = {"losses": losses, "shardings_ok": ok}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
