"""Bit-for-bit check that a refactor kept the maths of the GN family.

    python scripts/same_maths.py run OUT.npz        # in each checkout (old, then new)
    python scripts/same_maths.py compare OLD.npz NEW.npz

``run``: nine GN-family settings (full / layerwise / prox-linear GN with line
searches, CG with PI and Nielsen damping, PI-Muon's three fusions and
``gradient="given"``), 6 steps each on a small LLaMA, every parameter leaf
saved. ``compare``: the largest difference per setting (``identical`` when
none). Run both checkouts on one machine: XLA's floats depend on the CPU.
"""
import sys

if sys.argv[1:2] == ["compare"]:
    import numpy as np
    old, new = np.load(sys.argv[2]), np.load(sys.argv[3])
    for name in sorted({k.split("/")[0] for k in old}):
        d = max(float(np.max(np.abs(old[k] - new[k]))) for k in old if k.startswith(name + "/"))
        print(name, "identical" if d == 0 else f"max difference {d:.3g}")
    sys.exit(0)
import jax, jax.numpy as jnp, numpy as np, optax
import gnopt
from gnopt import models, solvers, curvature, line_search, control
from gnopt.losses import softmax_cross_entropy as LOSS
from gnopt.train import apply_model

cfg = models.llama_config("tiny", vocab_size=64, d_model=32, n_layers=2, n_heads=2, d_ff=64, seq_len=16)
params = models.LLaMA(cfg, key=jax.random.PRNGKey(0))
rng = np.random.default_rng(0)
def batch(n=16):
    t = jnp.asarray(rng.integers(0, 64, size=(n, 17)))
    return t[:, :-1], t[:, 1:]
batches = [batch() for _ in range(6)]
fresh = [batch() for _ in range(6)]
im = lambda lr=0.03: solvers.inner_optimizer(gnopt.inner_muon(lr), 4)
OPTS = {
  "gn_full": lambda: gnopt.gauss_newton(apply_model, LOSS, solver=im(), curvature=curvature.full(), line_search=line_search.grid(5)),
  "gn_layerwise": lambda: gnopt.gauss_newton(apply_model, LOSS, solver=im(0.1), curvature=curvature.layerwise(), line_search=line_search.grid(10)),
  "gn_prox": lambda: gnopt.gauss_newton(apply_model, LOSS, solver=solvers.prox_linear(gnopt.inner_muon(0.03), 4), line_search=line_search.grid(5)),
  "gn_cg_lm": lambda: gnopt.gauss_newton(apply_model, LOSS, solver=solvers.cg(max_iters=5), damping=control.damping_controller(damping0=1e-2), line_search=line_search.backtracking(), learning_rate=optax.linear_schedule(0.5, 1.0, 3)),
  "gn_nielsen": lambda: gnopt.gauss_newton(apply_model, LOSS, solver=solvers.cg(max_iters=5), damping=control.nielsen_damping(1e-3)),
  "pim_interp": lambda: gnopt.pi_muon(apply_model, LOSS, 0.08, solver=im(), damping=0.0, parallel="interpolate"),
  "pim_literal": lambda: gnopt.pi_muon(apply_model, LOSS, 0.08, solver=im(), damping=0.0, parallel="muon"),
  "pim_plane": lambda: gnopt.pi_muon(apply_model, LOSS, 0.08, solver=im(), damping=0.0, parallel="plane"),
  "pim_cg_given": lambda: gnopt.pi_muon(apply_model, LOSS, 0.3, gradient="given", muon_step_length="muon", parallel="interpolate"),
}
out = {}
for name, make in OPTS.items():
    tx = make()
    p = params
    state = tx.init(p)
    step = jax.jit(lambda p, s, b, f: tx.update(jax.grad(lambda q: LOSS(apply_model(q, b[0]), b[1]))(p), s, p, batch=b, line_search_batch=f))
    for b, f in zip(batches, fresh):
        u, state = step(p, state, b, f)
        p = optax.apply_updates(p, u)
    for i, leaf in enumerate(jax.tree.leaves(p)):
        out[f"{name}/{i}"] = np.asarray(leaf)
    print(name, float(LOSS(apply_model(p, fresh[0][0]), fresh[0][1])), flush=True)
np.savez(sys.argv[2], **out)
