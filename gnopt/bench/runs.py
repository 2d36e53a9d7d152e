"""Training runs of the step-count suites: the optimizers, the warm-up, run-to-target.

Every run starts from the same warmed-up parameters with a fresh optimizer
state, sees the same batches (same data seed) and uses the trainer's own step
(:func:`gnopt.train.make_train_step`). Second-order optimizers score their line
search (or trust ratio) on one more batch per step, counted in ``tokens``. The
target metric is the validation loss (fixed held-out batches), evaluated every
``eval_every`` steps; ``wall_s`` sums the steps' device time only (compilation
and evaluation excluded).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

import gnopt
from gnopt import control, curvature, data, line_search, solvers
from gnopt.bench import common
from gnopt.diagnostics import noise_scale
from gnopt.train import apply_model, make_train_step
from gnopt.transforms.kfac import tapped_call

from gnopt.transforms.pi_muon import pi_muon


@dataclasses.dataclass(frozen=True)
class Optimizer:
    """An optimizer of the study: ``build(lr) -> transform``, swept over ``learning_rates``.

    For the GN family ``lr`` is the inner optimizer's peak learning rate.
    """

    name: str
    build: Callable[[float], optax.GradientTransformation]
    learning_rates: tuple[float, ...]
    second_order: bool = False


RAMP_STEPS = 5
"""Default length of the first-order baselines' linear learning-rate ramp."""


def baseline_schedule(lr: float, warmup_steps: int = RAMP_STEPS,
                      decay_steps: int | None = None) -> optax.Schedule:
    """Linear ramp over ``warmup_steps``, then constant, or a cosine to ``0.1·lr`` at ``decay_steps``."""
    if decay_steps is None:
        return gnopt.transforms.constant(lr, warmup_steps)
    return gnopt.transforms.warmup_cosine(lr, decay_steps, warmup_steps)


def optimizers(inner_batch: int, warmup_steps: int = RAMP_STEPS, ls_stop_at_rise: bool = False,
               decay_steps: int | None = None,
               pi_gains: tuple[float, float] | None = None) -> dict[str, Optimizer]:
    """The compared optimizers with their default learning-rate grids.

    First-order baselines ramp their learning rate linearly over
    ``warmup_steps`` (their moments restart from zero), then keep it constant
    or, with ``decay_steps``, decay it by a cosine to 0.1× at that step (and
    stay there): a horizon to sweep, since annealing lowers the loss sooner.
    Muon's AdamW part (embedding, head, vectors) uses a fixed ``3e-3``.
    GN: inner Muon/Adam with the inner cosine schedule, ``inner_batch``
    sequences per inner step, line search ``{2^(−i/2)}`` with 5 points
    (10 for layerwise, as in the paper). PI-Muon: Muon's part as Muon's best
    (``η = 0.08``), its layerwise GN step from the same inner solver as GN
    (``lr`` is the inner learning rate), no damping; ``pi_muon_literal`` and
    ``pi_muon_plane`` are its fusion ablations (``parallel="muon"`` and
    ``"plane"``, docs/pi_muon.md). ``ls_stop_at_rise``: GN's
    grid search stops at the first rise (:class:`gnopt.line_search.GridLineSearch`).
    ``pi_gains``: ``(K_p, K_i)`` of PI-Muon's fusion-weight controller (default
    ``pi_muon``'s, ``(0.2, 0.1)``), for the gain sensitivity sweep.
    """
    ramp = lambda lr: baseline_schedule(lr, warmup_steps, decay_steps)

    def gn(solver_fn, curv, points: int):
        return lambda lr: gnopt.gauss_newton(
            apply_model, common.LOSS, solver=solver_fn(gnopt.inner_muon(lr), inner_batch),
            curvature=curv, line_search=line_search.grid(points, stop_at_rise=ls_stop_at_rise))

    def pim(parallel: str):
        return lambda lr: pi_muon(
            apply_model, common.LOSS, ramp(0.08), adam_learning_rate=ramp(3e-3),
            solver=solvers.inner_optimizer(gnopt.inner_muon(lr), inner_batch), damping=0.0,
            parallel=parallel, fusion=None if pi_gains is None else control.fusion_weight_controller(
                kp=pi_gains[0], ki=pi_gains[1], reject_below=0.0))

    gn_grid = (1e-2, 3e-2, 1e-1)
    table = [
        Optimizer("adamw", lambda lr: gnopt.transforms.adamw(ramp(lr)), (3e-3, 6e-3, 1.2e-2)),
        Optimizer("muon", lambda lr: gnopt.transforms.muon(ramp(lr), adam_learning_rate=ramp(3e-3)),
                  (0.04, 0.08, 0.16)),
        Optimizer("soap", lambda lr: gnopt.transforms.soap(ramp(lr)), (6e-3, 1.2e-2, 2.4e-2)),
        Optimizer("shampoo", lambda lr: gnopt.transforms.shampoo(ramp(lr)), (3e-3, 6e-3, 1.2e-2)),
        Optimizer("kfac", lambda lr: gnopt.transforms.kfac(tapped_call, common.LOSS, ramp(lr)),
                  (3e-3, 1e-2, 3e-2)),
        Optimizer("gn_full", gn(solvers.inner_optimizer, curvature.full(), 5), gn_grid, True),
        Optimizer("gn_layerwise", gn(solvers.inner_optimizer, curvature.layerwise(), 10),
                  gn_grid, True),
        Optimizer("gn_prox_linear", gn(solvers.prox_linear, curvature.full(), 5), gn_grid, True),
        Optimizer("pi_muon", pim("interpolate"), gn_grid, True),
        Optimizer("pi_muon_literal", pim("muon"), gn_grid, True),
        Optimizer("pi_muon_plane", pim("plane"), gn_grid, True),
    ]
    return {opt.name: opt for opt in table}


def with_noise_scale(opt: Optimizer, small_batch: int) -> Optimizer:
    """``opt`` with :func:`gnopt.diagnostics.noise_scale` in front (logs ``noise_scale``)."""
    return dataclasses.replace(opt, build=lambda lr: optax.chain(
        noise_scale(apply_model, common.LOSS, small_batch), opt.build(lr)))


@dataclasses.dataclass
class Data:
    """Token streams and the fixed validation batches of a study."""

    train_tokens: Any
    val_batches: list
    seq_len: int
    seed: int = 0

    @classmethod
    def stdlib(cls, seq_len: int, *, val_batch: int, val_batches: int,
               max_bytes: int | None = None, seed: int = 0) -> "Data":
        """The default corpus (:func:`gnopt.data.stdlib_corpus`)."""
        val = data.validation_batches(data.stdlib_corpus("validation", max_bytes=max_bytes),
                                      seq_len=seq_len, batch_size=val_batch, num_batches=val_batches)
        return cls(data.stdlib_corpus("train", max_bytes=max_bytes), val, seq_len, seed)

    def pipeline(self, batch_size: int):
        return data.make_pipeline(self.train_tokens, seq_len=self.seq_len,
                                  batch_size=batch_size, seed=self.seed)


def make_evaluator(val_batches: list) -> Callable[[Any], float]:
    """``params -> mean validation loss`` over the fixed batches (one jitted call)."""
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *val_batches)
    losses = jax.jit(lambda p: jnp.mean(jax.lax.map(lambda b: common.batch_loss(p, b), stacked)))
    return lambda params: float(losses(params))


def train(opt: Optimizer, lr: float, params, corpus: Data, evaluate, *, batch_size: int,
          max_steps: int, target: float = -math.inf, eval_every: int = 1,
          max_nonfinite: int = 3, ls_batch_size: int | None = None) -> tuple[Any, dict[str, Any]]:
    """Trains a copy of ``params`` until the validation loss reaches ``target``.

    Second-order optimizers get a fresh line-search (trust-ratio) batch each
    step: the first ``ls_batch_size`` sequences (default: all) of the next batch.

    Returns:
      ``(params, record)``; ``record`` has ``steps_to_target``,
      ``tokens_to_target``, ``wall_s_to_target`` (``None`` if not reached),
      ``compile_s``, ``stop_reason`` and the ``curve`` (one entry per evaluated
      step: step, tokens, wall_s, loss, val_loss and the optimizer's diagnostics).
    """
    tx = opt.build(lr)
    step_fn = make_train_step(tx, common.LOSS, check_grads=not opt.second_order)
    params = common.copy_tree(params)
    state = common.copy_tree(tx.init(params))  # some inits share buffers; steps donate them
    pipeline = corpus.pipeline(batch_size)

    def next_batches():
        batch = next(pipeline)
        if not opt.second_order:
            return batch, None
        return batch, jax.tree.map(lambda x: x[:ls_batch_size], next(pipeline))

    batch, ls_batch = next_batches()
    start = time.perf_counter()
    compiled = step_fn.lower(params, state, batch, ls_batch).compile()
    compile_s = time.perf_counter() - start
    curve = [{"step": 0, "tokens": 0, "wall_s": 0.0, "val_loss": evaluate(params)}]
    record = {"optimizer": opt.name, "lr": lr, "batch_size": batch_size, "compile_s": compile_s,
              "steps_to_target": None, "tokens_to_target": None, "wall_s_to_target": None}
    tokens, wall, bad, stop = 0, 0.0, 0, "max_steps"
    for step in range(1, max_steps + 1):
        if step > 1:
            batch, ls_batch = next_batches()
        start = time.perf_counter()
        params, state, loss, ok, diag = jax.block_until_ready(compiled(params, state, batch, ls_batch))
        wall += time.perf_counter() - start
        tokens += batch[0].size + (0 if ls_batch is None else ls_batch[0].size)
        bad = 0 if bool(ok) else bad + 1
        if step % eval_every and step != max_steps and bad < max_nonfinite:
            continue
        point = {"step": step, "tokens": tokens, "wall_s": wall, "loss": float(loss),
                 "val_loss": evaluate(params),
                 **{k: float(np.asarray(v)) for k, v in diag.items() if np.size(v) == 1}}
        curve.append(point)
        if point["val_loss"] <= target:
            record.update(steps_to_target=step, tokens_to_target=tokens, wall_s_to_target=wall)
            stop = "target"
            break
        if bad >= max_nonfinite:
            stop = "nonfinite"
            break
    record.update(stop_reason=stop, final_val_loss=curve[-1]["val_loss"], steps=curve[-1]["step"],
                  curve=curve)
    return params, record


def warm_up(params, corpus: Data, evaluate, *, steps: int, batch_size: int,
            lr: float) -> tuple[Any, dict[str, Any]]:
    """The shared starting point: ``steps`` of AdamW (linear warm-up over 10%, cosine decay)."""
    schedule = gnopt.transforms.warmup_cosine(lr, steps, max(1, steps // 10))
    opt = Optimizer("adamw_warmup", lambda _: gnopt.transforms.adamw(schedule), (lr,))
    params, record = train(opt, lr, params, corpus, evaluate, batch_size=batch_size,
                           max_steps=steps, eval_every=steps)
    return params, record


def target_key(target: float) -> str:
    """The key of ``target`` in the ``by_target`` records (``2.0 -> "2"``)."""
    return f"{target:g}"


def reached(curve: list[dict], target: float) -> dict | None:
    """The first evaluated step (after step 0) with validation loss ``≤ target``."""
    return next((p for p in curve[1:] if p["val_loss"] <= target), None)


def best_at(runs: list[dict], target: float) -> dict[str, Any]:
    """The run reaching ``target`` in the fewest steps (ties, or none reaching it:
    the lowest final validation loss): its lr, steps, tokens and wall time."""
    def key(run):
        point = reached(run["curve"], target)
        return (point["step"] if point else math.inf, run["final_val_loss"])

    best = min(runs, key=key)
    point = reached(best["curve"], target)
    return {"best_lr": best["lr"], "steps_to_target": point and point["step"],
            "tokens_to_target": point and point["tokens"],
            "wall_s_to_target": point and point["wall_s"]}


def sweep(opt: Optimizer, learning_rates, params, corpus: Data, evaluate, *,
          targets: list[float], **kwargs) -> dict:
    """Runs ``opt`` at each learning rate until the lowest of ``targets``.

    The top-level fields are the best run for the lowest target; ``by_target``
    has the best run for each target (the best lr may differ between them).
    """
    runs = []
    for lr in learning_rates:
        _, record = train(opt, lr, params, corpus, evaluate, target=min(targets), **kwargs)
        print(f"  {opt.name:<15} lr {lr:<8g} steps {record['steps_to_target'] or '-':>5} "
              f"final val {record['final_val_loss']:.4f} ({record['stop_reason']}, "
              f"{record['curve'][-1]['wall_s']:.1f} s + compile {record['compile_s']:.1f} s)",
              flush=True)
        runs.append(record)
    by_target = {target_key(t): best_at(runs, t) for t in sorted(targets, reverse=True)}
    return {"optimizer": opt.name, "grid": list(learning_rates),
            **by_target[target_key(min(targets))], "by_target": by_target, "runs": runs}
