"""Training runs of the step-count suites: the optimizers (gin/steps/), the warm-up, run-to-target.

Every run starts from the same warmed-up parameters with a fresh optimizer
state, sees the same batches (same data seed) and uses the trainer's own step
(:func:`gnopt.train.make_train_step`). Second-order optimizers score their line
search (or trust ratio) on one more batch per step, counted in ``tokens``. The
target metric is the validation loss (fixed held-out batches), evaluated every
``eval_every`` steps; ``wall_s`` sums the steps' device time only (compilation
and evaluation excluded).
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import math
import os
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

import gin
import gnopt
from gnopt import data
from gnopt import train as train_module
from gnopt.bench import common
from gnopt.diagnostics import noise_scale
from gnopt.requirements import requirements_of
from gnopt.train import apply_model, make_train_step


STEPS_GIN = "steps"
"""The folder of :data:`gnopt.train.GIN_DIR` whose files are the suites' optimizers:
``steps/<name>.gin`` is optimizer ``name`` (``gin/base/steps.gin`` lists the macros
the suites bind)."""


@dataclasses.dataclass(frozen=True)
class Optimizer:
    """An optimizer of the study: ``build(lr, total_steps) -> transform``, swept over
    ``learning_rates``. ``second_order``: it computes its own gradient
    (:class:`gnopt.requirements.Requirements`): it gets a fresh line-search batch
    and the second-order step cap."""

    name: str
    build: Callable[[float, int], optax.GradientTransformation]
    learning_rates: tuple[float, ...]
    second_order: bool = False


@contextlib.contextmanager
def _gin_config(path: str, bindings: Sequence[str]):
    """gin's global config holds ``path`` with ``bindings`` inside the block only."""
    gin.clear_config()
    try:
        train_module.parse_gin([path], list(bindings))
        yield
    finally:
        gin.clear_config()


def _gin_optimizer(path: str):
    builder = gin.get_bindings("train").get("optimizer")
    if builder is None:
        raise ValueError(f"{path} sets no train.optimizer")
    return builder


def from_gin(path: str, bindings: Sequence[str] = ()) -> Optimizer:
    """The optimizer ``train.optimizer`` of gin file ``path`` (with ``bindings``), built as
    ``python -m gnopt.train`` builds it (:func:`gnopt.train.build_optimizer`). Its macro
    ``LEARNING_RATES`` is the grid; ``build(lr, total_steps)`` binds ``LEARNING_RATE = lr``.
    Each build parses the file into gin's global config, and clears that config after.
    """
    def build(lr: float, total_steps: int) -> optax.GradientTransformation:
        with _gin_config(path, [*bindings, f"LEARNING_RATE = {lr!r}"]):
            tx, _ = train_module.build_optimizer(_gin_optimizer(path), loss_fn=common.LOSS,
                                                 total_steps=total_steps)
        return tx

    with _gin_config(path, bindings):
        builder = _gin_optimizer(path)
        try:
            grid = tuple(float(lr) for lr in gin.query_parameter("%LEARNING_RATES"))
        except ValueError:
            raise ValueError(f"{path} defines no LEARNING_RATES (its learning-rate grid, "
                             "e.g. LEARNING_RATES = [0.01, 0.03])") from None
    name = os.path.splitext(os.path.basename(path))[0]
    return Optimizer(name, build, grid, requirements_of(builder).own_gradient)


def optimizers(bindings: Sequence[str] = ()) -> dict[str, Optimizer]:
    """The compared optimizers, one per file of ``gin/steps/`` (see the files and
    ``gin/base/steps.gin``), each with ``bindings`` (gin lines) applied after its file.

    First-order baselines ramp their learning rate linearly over ``RAMP_STEPS``
    (their moments restart from zero), then keep it constant or, with
    ``DECAY_STEPS``, decay it by a cosine to 0.1× at that step (and stay there):
    a horizon to sweep, since annealing lowers the loss sooner. GN: inner
    Muon/Adam with the inner cosine schedule, ``INNER_BATCH`` sequences per
    inner step, line search ``{2^(−i/2)}`` with 5 points (10 for layerwise, as
    in the paper). PI-Muon: Muon's part as Muon's best (``η = 0.08``), its
    layerwise GN step from the same inner solver as GN (the swept rate is the
    inner learning rate), no damping, the fusion on the plane (``gnopt.pi_muon``'s
    default); ``pi_muon_interpolate`` and ``pi_muon_literal`` are its fusion
    ablations (docs/pi_muon.md).
    """
    folder = os.path.join(train_module.GIN_DIR, STEPS_GIN)
    paths = sorted(glob.glob(os.path.join(folder, "*.gin")))
    if not paths:
        raise FileNotFoundError(f"no optimizer files {folder}/*.gin")
    table = [from_gin(path, bindings) for path in paths]
    return {opt.name: opt for opt in table}


def with_noise_scale(opt: Optimizer, small_batch: int) -> Optimizer:
    """``opt`` with :func:`gnopt.diagnostics.noise_scale` in front (logs ``noise_scale``)."""
    return dataclasses.replace(opt, build=lambda lr, total_steps: optax.chain(
        noise_scale(apply_model, common.LOSS, small_batch), opt.build(lr, total_steps)))


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
    tx = opt.build(lr, max_steps)
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
    opt = Optimizer("adamw_warmup", lambda *_: gnopt.transforms.adamw(schedule), (lr,))
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
