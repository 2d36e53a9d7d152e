"""``python -m gnopt.train``: the gin-wired training loop.

::

    python -m gnopt.train [--gin_file quickstart.gin] [--gin_file more.gin]
        [--gin_param 'train.num_steps = 50' ...] [--run_dir runs/x]
        [--dry_run | --shapes_only | --print_config] [--restart] [--allow_config_change]

Without ``--gin_file`` it runs :data:`DEFAULT_GIN_FILE` (the quickstart). ``--help``
lists every gin-configurable argument of :func:`train`. A run prints its operative
gin config first (``--print_config`` prints only that: the model and optimizer are
built abstractly and one step traced, no data read). The progress bar starts after
the first step, so its rate and ETA leave out the compilation (a line says how long
that step took). ``--shapes_only`` compiles the step for the mesh without data and
prints XLA's memory analysis of it per device (``docs/data.md``).

A thin driver: batches from :mod:`gnopt.data`, one jitted step, metrics to
``RUN_DIR/metrics.jsonl`` (strict JSON Lines: non-finite values are ``null``) and
to TensorBoard event files in ``RUN_DIR`` (``train.tensorboard``, on by default;
:class:`gnopt.metrics.MetricsLog`),
the gin operative config to ``RUN_DIR/config.gin`` (and every config the run
used to ``RUN_DIR/configs/from_step_<k>.gin``), checkpoints (orbax, atomic,
checksummed) to ``RUN_DIR/checkpoints``. Re-running the same command with the
same run folder resumes from the newest intact checkpoint (a corrupt one is
moved aside with a warning); on one machine the resumed run repeats the
uninterrupted one bit for bit. A resume whose operative config differs from the
one its checkpoint was made with is refused with the differences unless
``--allow_config_change``
(settings that do not change a step, e.g. ``train.mesh``, ``train.log_every``,
``train.eval_every``, do not count); a folder with metrics but no checkpoint to
resume is refused unless ``--restart`` (which deletes the earlier run).
``train.init_from`` starts a new run from another run's parameters (fresh
optimizer state, step 0).

Before any compute every token id of every shard (train and validation) is
checked against the model's output size (one memory-mapped pass, cached).

gin files: ``include 'x.gin'`` is looked up next to the including file, then in
the repository's ``gin/`` folder (:data:`GIN_DIR`), then in gin's search path;
``--gin_file`` names likewise (current folder first).

The step (:func:`make_train_step`): ``loss, g = value_and_grad(L)(θ)``;
``u, s' = tx.update(g, s, θ, batch=batch, line_search_batch=...)``;
``θ' = θ + u``. If the loss, ``u`` or (for first-order optimizers) ``g`` is not
finite, ``θ`` and ``s`` are kept unchanged; the run counts such steps (``skipped``
and ``nonfinite_skipped`` in the metrics, and in the summary line), stops after
``max_nonfinite_in_a_row`` of them in a row (saving a checkpoint, which holds
the last finite state, and naming which of loss, gradient and update was not
finite, and the first such parameter), and fails at its end if more than
``max_skipped_fraction`` of its steps were rejected.

Scale-out (:mod:`gnopt.distributed`): the step runs on a ``(data, fsdp)`` mesh
(``train.mesh``; default: every device on ``data``); the batch is split over
all devices, parameters and optimizer state are sharded over ``fsdp``. With
several processes (``--gin_param 'gnopt.distributed.initialize.…'``, see
``docs/multihost.md``) each reads its own share of every batch and only process
0 writes metrics and the config; checkpoints are written once, each array shard
by the process holding it. A checkpoint resumes on any mesh or device count.

An optimizer builder states what it needs (:mod:`gnopt.requirements`):
``gnopt.gauss_newton``, ``gnopt.pi_muon``, ``gnopt.fuse`` and K-FAC are given
``apply_fn`` and ``loss_fn`` and see the whole batch, so they cannot use
gradient accumulation; the GN ones compute their own gradient, which the
trainer then does not check. A builder that states nothing is first-order.
When an optimizer ignores the gradient
(Gauss-Newton derives its own from the batch) XLA drops the trainer's backward
pass; the trainer then only adds one forward pass for the logged loss.

``tokens`` counts every token drawn from the training stream (all processes),
the line-search batches of ``line_search_batch="next"`` included.

Exit codes (:func:`main`): 0 done; 1 stopped on non-finite steps, or more than
``train.max_skipped_fraction`` of the steps skipped; 2 bad configuration or run
folder (one line on stderr, nothing computed); 3 a token shard vanished
(checkpoint saved: put it back and re-run); 4 no intact checkpoint to resume
from; 143 stopped by SIGTERM (checkpoint saved at the current step: re-run to
resume).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import inspect
import logging
import math
import os
import re
import shutil
import signal
import sys
import textwrap
import threading
import types
import time
import warnings
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.tree_utils as otu
from jax.experimental import multihost_utils
from tqdm import tqdm

import gin
from gnopt import data as data_lib
from gnopt import distributed as dist
from gnopt import models, registry
from gnopt.checkpoint import (
    CheckpointCorruptError,
    Checkpointer,
    CheckpointMismatchError,
)
from gnopt.losses import softmax_cross_entropy
from gnopt.metrics import METRICS_FILE, MetricsLog, find_diagnostics, read_metrics
from gnopt.requirements import ARGUMENTS, Requirements, requirements_of
from gnopt.solvers import split_microbatches

CONFIG_FILE = "config.gin"
CHECKPOINT_DIR = "checkpoints"
EXIT_DATA_MISSING = 3
EXIT_NO_INTACT_CHECKPOINT = 4
EXIT_SIGTERM = 128 + signal.SIGTERM


class ConfigError(ValueError):
    """A configuration problem, reported as one line before any training step."""


class NonFiniteError(RuntimeError):
    """Too many non-finite steps in a row."""


class DataSourceError(RuntimeError):
    """A token shard of the training data vanished during the run."""


class RunDirError(RuntimeError):
    """The run folder cannot be used as asked (a file, an earlier run in the way, another
    config): reported as one line before any training step."""


def apply_model(model, inputs, tap=None):
    """``apply_fn`` of equinox models: the parameters are the model.

    ``tap`` (see :data:`gnopt.models.Tap`) is passed on when given (K-FAC).
    """
    return model(inputs) if tap is None else model(inputs, tap)


def batch_loss(loss_fn: Callable, params, batch) -> jax.Array:
    """``L(θ) = ℓ(f(θ, x), y)`` on ``batch = (x, y)``."""
    inputs, targets = batch
    return loss_fn(apply_model(params, inputs), targets)


def _accepts(fn: Callable, name: str) -> bool:
    return name in inspect.signature(fn).parameters


def call_with_accepted(fn: Callable, **kwargs):
    """Calls ``fn`` with those of ``kwargs`` its signature names (``**kwargs`` does not count)."""
    return fn(**{k: v for k, v in kwargs.items() if _accepts(fn, k)})


def _undeclared_arguments(builder: Callable) -> list[str]:
    """Parameters a builder must be given, named like the trainer's arguments,
    that it did not declare (for the error message only)."""
    try:
        parameters = inspect.signature(builder).parameters
    except (TypeError, ValueError):
        return []
    return [name for name in ARGUMENTS if name in parameters
            and parameters[name].default is inspect.Parameter.empty]


def build_optimizer(optimizer: Callable, *, loss_fn: Callable, total_steps: int,
                    grad_accum_steps: int = 1) -> tuple[optax.GradientTransformationExtraArgs,
                                                        Requirements]:
    """Builds the configured optimizer.

    Args:
      optimizer: a builder (gin reference without ``()``, e.g. ``@optax.adamw``
        or ``@gnopt.gauss_newton``), which gets the arguments its
        :class:`gnopt.requirements.Requirements` name (``apply_fn``,
        ``loss_fn``, ``total_steps``); or a built first-order transformation
        (``@optax.adamw()``).
      loss_fn: the training loss.
      total_steps: optimizer steps of the whole run.
      grad_accum_steps: micro-batches averaged per step (``optax.MultiSteps``).

    Returns:
      ``(tx, requirements)``: what the optimizer stated it needs (a builder
      that states nothing is first-order).
    """
    if optimizer is None:
        raise ConfigError("train.optimizer is not set (e.g. train.optimizer = @optax.adamw)")
    needs = requirements_of(optimizer)
    if isinstance(optimizer, optax.GradientTransformation):  # built by gin: `@optax.adamw()`
        tx = optimizer
    else:
        missing = [name for name in _undeclared_arguments(optimizer) if name not in needs.arguments]
        if missing:
            raise ConfigError(
                f"train.optimizer {getattr(optimizer, '__name__', optimizer)!r} needs {missing} but "
                f"does not state it; declare it with @gnopt.requires({', '.join(map(repr, missing))}, "
                "...) (see gnopt.requirements)")
        given = {"apply_fn": apply_model, "loss_fn": loss_fn, "total_steps": total_steps}
        tx = optimizer(**{name: given[name] for name in needs.arguments})
    if not isinstance(tx, optax.GradientTransformation):
        raise ConfigError(f"train.optimizer must build an optax GradientTransformation, "
                          f"got {type(tx).__name__}")
    if grad_accum_steps > 1:
        if needs.whole_batch:
            raise ConfigError("train.grad_accum_steps > 1 needs a first-order optimizer; "
                              "second-order ones take the whole batch (use their inner batch size)")
        tx = optax.MultiSteps(tx, grad_accum_steps).gradient_transformation()
    return optax.with_extra_args_support(tx), needs


def finite_leaves(tree) -> jax.Array:
    """Per float leaf of ``tree`` (in ``jax.tree.leaves`` order): whether it is finite."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
              if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.stack(leaves) if leaves else jnp.ones((0,), bool)


def all_finite(tree) -> jax.Array:
    """Whether every float leaf of ``tree`` is finite (a scalar bool)."""
    return finite_leaves(tree).all()


def float_leaf_names(tree) -> list[str]:
    """Paths (``jax.tree_util.keystr``) of the float leaves of ``tree``, as :func:`finite_leaves`
    orders them."""
    return [jax.tree_util.keystr(path) for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]
            if jnp.issubdtype(x.dtype, jnp.inexact)]


def chunked_value_and_grad(loss_fn: Callable, params, batch, chunk_size: int | None = None):
    """``(L(θ), ∇L(θ))`` on ``batch``, summed over chunks of ``chunk_size`` sequences.

    With chunks, ``L = (1/n) Σ_c L_c`` (a ``lax.scan``: memory of one chunk),
    which is the batch mean for a per-token mean loss on equal-length chunks.
    """
    value_and_grad = jax.value_and_grad(functools.partial(batch_loss, loss_fn))
    if chunk_size is None:
        return value_and_grad(params, batch)
    n, chunks = split_microbatches(batch, chunk_size)

    def add_chunk(total, chunk):
        return jax.tree.map(jnp.add, total, value_and_grad(params, chunk)), None

    total, _ = jax.lax.scan(add_chunk, (jnp.zeros(()), otu.tree_zeros_like(params)), chunks)
    return jax.tree.map(lambda x: x / n, total)


def make_train_step(tx: optax.GradientTransformationExtraArgs, loss_fn: Callable, *,
                    check_grads: bool = True, chunk_size: int | None = None,
                    shardings: dist.StepShardings | None = None,
                    explain: bool = False) -> Callable:
    """The jitted step ``(θ, s, batch, ls_batch) -> (θ', s', loss, ok, diagnostics)``.

    ``θ`` and ``s`` are donated. ``ok`` is whether the loss, the update and (if
    ``check_grads``) the gradient were finite; if not, ``θ' = θ`` and
    ``s' = s``. ``diagnostics`` are those of the new optimizer state, also on a
    rejected step (they say what went wrong). ``chunk_size``: see
    :func:`chunked_value_and_grad`. ``shardings``: where the inputs must be and
    the outputs are put (``θ'``, ``s'`` keep those of ``θ``, ``s``; scalars are
    replicated); ``None``: wherever the inputs are. ``explain``: ``ok`` is a
    dict instead: ``"ok"`` (as above), ``"loss"`` (a bool), ``"updates"`` and,
    with ``check_grads``, ``"grads"`` (one bool per float leaf, see
    :func:`finite_leaves`): which quantity was not finite.
    """

    def step(params, opt_state, batch, line_search_batch):
        loss, grads = chunked_value_and_grad(loss_fn, params, batch, chunk_size)
        updates, new_state = tx.update(grads, opt_state, params, batch=batch,
                                       line_search_batch=line_search_batch)
        checks = {"loss": jnp.all(jnp.isfinite(loss)), "updates": finite_leaves(updates)}
        if check_grads:
            checks["grads"] = finite_leaves(grads)
        ok = jnp.stack([c.all() for c in checks.values()]).all()
        if explain:
            ok = {"ok": ok, **checks}
        new_params = optax.apply_updates(params, updates)
        keep = ok["ok"] if explain else ok
        return (otu.tree_where(keep, new_params, params),
                otu.tree_where(keep, new_state, opt_state), loss, ok, find_diagnostics(new_state))

    if shardings is None:
        return jax.jit(step, donate_argnums=(0, 1))
    p, s, b, r = shardings
    return jax.jit(step, donate_argnums=(0, 1), in_shardings=(p, s, b, b),
                   out_shardings=(p, s, r, r, r))


def _one_line(error: BaseException) -> str:
    """The first line of an error, plus the innermost gin configurable it came from."""
    text = str(error)
    macro = re.match(r"No bindings specified for '([^'/]+)/gin.macro'", text)
    if macro:
        return f"gin macro {macro[1]} is not defined (add --gin_param '{macro[1]} = ...')"
    calls = re.findall(r"In call to configurable '([^']+)'", text)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    message = lines[0] if lines else type(error).__name__
    return f"{message} (in {calls[0]})" if calls else message


@contextlib.contextmanager
def _config_errors():
    """Turns errors raised while building from the config into one-line ConfigErrors."""
    try:
        yield
    except ConfigError:
        raise
    except (TypeError, ValueError, FileNotFoundError) as e:
        raise ConfigError(_one_line(e)) from e


_POSITIVE_OPTIONS = ("seq_len", "batch_size", "grad_accum_steps", "num_steps", "eval_batches",
                     "log_every", "keep_checkpoints", "max_nonfinite_in_a_row")
_COUNT_OPTIONS = ("eval_every", "checkpoint_every")  # 0: never
_CHOICE_OPTIONS = {"line_search_batch": ("same", "next"), "target_metric": ("val_loss", "loss"),
                   "mode": ("train", "dry_run", "shapes", "memory", "print_config")}


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_real(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, (bool, np.bool_))


def _check_options(options: dict[str, Any]) -> None:
    """Raises a ConfigError naming the first bad ``train`` argument in ``options``."""
    for name in _POSITIVE_OPTIONS:
        if not _is_int(options[name]) or options[name] <= 0:
            raise ConfigError(f"train.{name} must be a positive int, got {options[name]!r}")
    for name in _COUNT_OPTIONS:
        if not _is_int(options[name]) or options[name] < 0:
            raise ConfigError(f"train.{name} must be an int >= 0 (0: never), "
                              f"got {options[name]!r}")
    if not _is_int(options["seed"]):
        raise ConfigError(f"train.seed must be an int, got {options['seed']!r}")
    for name in ("shuffle", "tensorboard"):
        if not isinstance(options[name], (bool, np.bool_)):
            raise ConfigError(f"train.{name} must be True or False, got {options[name]!r}")
    fraction = options["max_skipped_fraction"]
    if not _is_real(fraction) or not 0 <= fraction <= 1:
        raise ConfigError(f"train.max_skipped_fraction must be a number in [0, 1], "
                          f"got {fraction!r}")
    target = options["target_loss"]
    if target is not None and (not _is_real(target) or math.isnan(target)):
        raise ConfigError(f"train.target_loss must be a number or None, got {target!r}")
    for name in ("data", "loss_fn"):
        if not callable(options[name]):
            raise ConfigError(f"train.{name} must be a function or gin reference "
                              f"(@name), got {options[name]!r}")
    for name in ("model", "val_data"):
        if options[name] is not None and not callable(options[name]):
            raise ConfigError(f"train.{name} must be a gin reference (@name) or None, "
                              f"got {options[name]!r}")
    if options["run_dir"] is not None and not isinstance(options["run_dir"], (str, os.PathLike)):
        raise ConfigError(f"run_dir must be a path, got {options['run_dir']!r}")
    for name, allowed in _CHOICE_OPTIONS.items():
        if options[name] not in allowed:
            raise ConfigError(f"train.{name} must be one of {allowed}, got {options[name]!r}")
    chunk, batch_size = options["microbatch_size"], options["batch_size"]
    if chunk is not None and (not isinstance(chunk, int) or chunk <= 0 or batch_size % chunk):
        raise ConfigError(f"train.microbatch_size={chunk!r} must be a positive int "
                          f"dividing train.batch_size={batch_size}")
    if (options["target_loss"] is not None and options["target_metric"] == "val_loss"
            and not options["eval_every"]):
        raise ConfigError("train.target_loss on val_loss needs train.eval_every > 0")



def _device_mesh(shape) -> jax.sharding.Mesh:
    """``train.mesh``: ``None``, ``{"data": d, "fsdp": f}`` or ``(d, f)``; data fills the devices
    unless given (``-1`` also fills), fsdp is 1 unless given."""
    if shape is None:
        shape = {}
    if isinstance(shape, (tuple, list)) and len(shape) == len(dist.AXES):
        shape = dict(zip(dist.AXES, shape))
    if (not isinstance(shape, dict) or not set(shape) <= set(dist.AXES)
            or not all(isinstance(size, int) for size in shape.values())):
        raise ConfigError(f"train.mesh must be {{'data': d, 'fsdp': f}} or (d, f) with int sizes "
                          f"(-1: the rest), got {shape!r}")
    try:
        return dist.make_mesh(shape.get("data", -1), shape.get("fsdp", 1))
    except ValueError as e:
        raise ConfigError(f"train.mesh: {e}") from e


def _check_batch_split(mesh: jax.sharding.Mesh, options: dict[str, Any]) -> None:
    """Every (micro-)batch must split evenly over the mesh's devices."""
    devices = mesh.devices.size
    for name in ("batch_size", "microbatch_size"):
        if options[name] is not None and options[name] % devices:
            raise ConfigError(f"train.{name}={options[name]} must be divisible by the {devices} "
                              f"devices of the mesh {dict(mesh.shape)}")


def _init_params(model: Callable, seed: int):
    """``(params, rng)``: the model from ``seed``'s first key, the second kept for later use."""
    model_key, rng = jax.random.split(jax.random.PRNGKey(seed))
    return model(key=model_key), rng


def _abstract_params(init: Callable):
    """The shapes of ``init()``'s parameters (no compute); all leaves must be arrays."""
    params, _ = eqx.filter_eval_shape(init)
    odd = [type(x).__name__ for x in jax.tree.leaves(params)
           if not isinstance(x, jax.ShapeDtypeStruct)]
    if odd:
        raise ConfigError(f"the model has non-array leaves ({sorted(set(odd))}); "
                          "mark them eqx.field(static=True)")
    return params


def _trace_shapes(params, opt_state, step_fn, *, batch_size: int, seq_len: int,
                  next_batch: bool, compile_step: bool = False) -> dict[str, Any]:
    """Traces one step on the abstract model and optimizer state (no compute); with
    ``compile_step`` also compiles it and adds XLA's memory analysis (:func:`_memory_of`)."""
    tokens = jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32)
    args = (params, opt_state, (tokens, tokens), (tokens, tokens) if next_batch else None)
    jax.eval_shape(step_fn, *args)
    out = {"step": 0, "num_params": models.count_params(params)}
    if compile_step:
        out["memory"] = _memory_of(step_fn.lower(*args).compile())
    return out


def _memory_of(compiled) -> dict[str, int] | None:
    """Bytes per device of a compiled step, from XLA's memory analysis: ``arguments``
    (parameters, optimizer state, batch), ``outputs``, ``aliased`` (outputs written into
    donated arguments), ``temporaries``, ``code``, and ``peak``: XLA's own peak where the
    backend reports one, else arguments + outputs - aliased + temporaries + code."""
    stats = compiled.memory_analysis()
    if stats is None:  # a backend without memory analysis
        return None
    out = {"arguments": stats.argument_size_in_bytes, "outputs": stats.output_size_in_bytes,
           "aliased": stats.alias_size_in_bytes, "temporaries": stats.temp_size_in_bytes,
           "code": stats.generated_code_size_in_bytes}
    total = (out["arguments"] + out["outputs"] - out["aliased"] + out["temporaries"]
             + out["code"])
    out["peak"] = max(int(getattr(stats, "peak_memory_in_bytes", 0) or 0), total)
    return out


def memory_line(memory: dict[str, int], devices: int, mesh: dict[str, int]) -> str:
    """The report of :func:`_memory_of` as printed by ``--shapes_only``."""
    gib = lambda n: f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"
    return (f"peak memory per device of the compiled step: {gib(memory['peak'])} "
            f"(arguments {gib(memory['arguments'])}: parameters, optimizer state and batch; "
            f"temporaries {gib(memory['temporaries'])}; outputs {gib(memory['outputs'])}, "
            f"{gib(memory['aliased'])} of them in donated buffers) on {devices} device(s), "
            f"mesh data {mesh['data']} x fsdp {mesh['fsdp']}")


def _load_tokens(data: Callable, val_data: Callable | None):
    train_tokens = call_with_accepted(data, split="train")
    if val_data is not None:
        return train_tokens, call_with_accepted(val_data, split="all")
    if not _accepts(data, "split"):
        raise ConfigError("train.data takes no split argument: set train.val_data too")
    return train_tokens, data(split="validation")


def _check_vocab(params, sources: dict[str, Any], *, seq_len: int) -> None:
    """Every token id of every shard of ``sources`` (``{"train": tokens, ...}``) must be below
    the model's output size (one pass over the data, see :func:`gnopt.data.max_token_ids`)."""
    inputs = jax.ShapeDtypeStruct((1, seq_len), jnp.int32)
    vocab = jax.eval_shape(apply_model, params, inputs).shape[-1]
    for split, tokens in sources.items():
        if np.issubdtype(tokens.dtype, np.unsignedinteger) and np.iinfo(tokens.dtype).max < vocab:
            continue  # no id of this type can reach the vocabulary size
        for filename, top in data_lib.max_token_ids(tokens):
            if top >= vocab:
                where = f"token shard {filename}" if filename else f"the {split} data"
                raise ConfigError(f"{where} has token id {top} but the model's output has only "
                                  f"{vocab} classes (set the model's vocab_size, e.g. "
                                  "gnopt.models.llama_config.vocab_size)")


def _process_rows(batch):
    """This process's share of the rows of a batch that every process holds whole."""
    i, n = jax.process_index(), jax.process_count()
    return jax.tree.map(lambda x: x[i * len(x) // n:(i + 1) * len(x) // n], batch)


def _token_files(tokens) -> list[tuple[str, int]]:
    """``(path, bytes the memory map needs)`` of each memory-mapped shard of a token stream."""
    shards = tokens.shards if isinstance(tokens, data_lib.ShardedTokens) else [tokens]
    return [(s.filename, s.offset + s.nbytes) for s in shards
            if isinstance(s, np.memmap) and s.filename]


def _vanished(files: list[tuple[str, int]]) -> str | None:
    """What happened to the first of ``files`` that is gone or shorter than mapped, if any.

    A memory map of a deleted file stays readable, so the loss of a shard (deleted,
    moved, unmounted) shows only here; a truncated one would crash the reader.
    """
    for path, size in files:
        try:
            actual = os.path.getsize(path)
        except OSError:
            return f"token shard {path} disappeared"
        if actual < size:
            return f"token shard {path} shrank to {actual} bytes (its memory map needs {size})"
    return None


def _config_banner(config: str) -> str:
    """The operative gin config as printed when a run starts (comments and blank lines
    dropped)."""
    lines = [line for line in config.splitlines() if line.strip() and not line.startswith("#")]
    return "\n".join(["operative gin config (RUN_DIR/config.gin):", *("  " + line for line in lines)])


class _NoBar:
    """Stands in for the progress bar before the first (compiling) step has run."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


@contextlib.contextmanager
def _sigterm_received():
    """A list that gets an entry on SIGTERM, which then no longer kills the process.

    Only in the main thread (Python delivers signals there); elsewhere it stays empty.
    """
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    try:
        yield received
    finally:
        signal.signal(signal.SIGTERM, previous)


CONFIGS_DIR = "configs"
"""``RUN_DIR/configs/from_step_<k>.gin``: the operative config of steps ``k, k+1, …`` (until
the next such file); ``config.gin`` is a copy of the newest."""
_CONFIG_HISTORY = re.compile(r"from_step_(\d+)\.gin$")
# Arguments of train() that do not change what a step computes: changing them on resume needs
# no --allow_config_change (the new config is still recorded under configs/).
_NEUTRAL_OPTIONS = ("mesh", "log_every", "checkpoint_every", "keep_checkpoints", "eval_every",
                    "eval_batches", "target_loss", "target_metric", "max_nonfinite_in_a_row",
                    "max_skipped_fraction", "tensorboard")


def _check_run_dir(run_dir: str) -> None:
    """``run_dir`` must be a folder or creatable as one (checked before any data or compute)."""
    path = os.path.abspath(run_dir)
    if os.path.exists(path) and not os.path.isdir(path):
        raise RunDirError(f"--run_dir {run_dir} is a file, not a folder")
    parent = os.path.dirname(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise RunDirError(f"--run_dir {run_dir}: {parent} is a file, not a folder")
    if not os.access(path if os.path.isdir(path) else parent, os.W_OK | os.X_OK):
        raise RunDirError(f"--run_dir {run_dir}: no permission to write in "
                          f"{path if os.path.isdir(path) else parent}")


def _checkpoint_steps(run_dir: str) -> list[int]:
    """The step folders in ``run_dir/checkpoints`` (not verified)."""
    folder = os.path.join(run_dir, CHECKPOINT_DIR)
    if not os.path.isdir(folder):
        return []
    return sorted(int(name) for name in os.listdir(folder) if name.isdigit())


def _check_earlier_run(run_dir: str) -> None:
    """Refuses a run folder holding metrics of an earlier run but no checkpoint to resume:
    starting again would replace them (``--restart`` does so on purpose)."""
    if _checkpoint_steps(run_dir) or not os.path.isfile(os.path.join(run_dir, METRICS_FILE)):
        return
    try:
        records = read_metrics(run_dir)
    except ValueError:
        records = [{"step": "?"}]
    if not records:
        return
    corrupt = os.path.join(os.path.abspath(run_dir), CHECKPOINT_DIR) + "-corrupt"
    damaged = (f" (the damaged ones are in {corrupt})" if os.path.isdir(corrupt) else "")
    raise RunDirError(
        f"{run_dir} holds an earlier run ({METRICS_FILE} to step {records[-1].get('step')}) but no "
        f"intact checkpoint to resume from{damaged}; re-run with --restart to start it over from "
        "step 0 (its metrics and checkpoints are deleted), or give another --run_dir")


def _clear_run(run_dir: str) -> list[str]:
    """Deletes what an earlier run wrote to ``run_dir`` (``--restart``); returns what was there."""
    names = [METRICS_FILE, CONFIG_FILE, CONFIGS_DIR, CHECKPOINT_DIR, CHECKPOINT_DIR + "-corrupt"]
    found = [name for name in names if os.path.exists(os.path.join(run_dir, name))]
    if jax.process_index() == 0:
        for name in found:
            path = os.path.join(run_dir, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            else:
                os.remove(path)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("gnopt_restart_cleared")
    return found


def _bindings(config: str) -> dict[str, str]:
    """``{name: value}`` of the bindings of a gin operative config (comments dropped,
    multi-line values joined, whitespace collapsed)."""
    bindings: dict[str, str] = {}
    name = None
    for line in config.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = re.match(r"([A-Za-z_][\w./]*)\s*=\s*(.*)$", line)
        if match and not line[0].isspace():
            name = match[1]
            bindings[name] = match[2].strip()
        elif name is not None:
            bindings[name] += " " + line.strip()
    return {k: " ".join(v.split()) for k, v in bindings.items()}


def _resolve_macros(bindings: dict[str, str]) -> dict[str, str]:
    """``bindings`` with each ``%MACRO`` replaced by its value and the macros dropped, so that
    what is compared is what each configurable got."""
    macros = {name for name in bindings
              if any(re.search(rf"%{re.escape(name)}\b", v) for v in bindings.values())}
    resolved = {k: v for k, v in bindings.items() if k not in macros}
    for _ in range(10):  # macros of macros
        for name in macros:
            pattern = re.compile(rf"%{re.escape(name)}\b")
            resolved = {k: pattern.sub(lambda _: bindings[name], v) for k, v in resolved.items()}
    return resolved


def _neutral(name: str, neutral: tuple[str, ...]) -> bool:
    match = re.fullmatch(r"(?:gnopt\.)?train\.(\w+)", name)
    return bool(match and match[1] in neutral) or bool(
        re.fullmatch(r"(?:gnopt\.)?(?:distributed\.)?initialize\.\w+", name))


def _config_changes(stored: str, current: str, neutral: tuple[str, ...]) -> list[str]:
    """``"name: old -> new"`` of each binding that differs and is not in ``neutral``."""
    old, new = _resolve_macros(_bindings(stored)), _resolve_macros(_bindings(current))
    short = lambda v: "(unset)" if v is None else v if len(v) <= 40 else v[:37] + "..."
    return [f"{name}: {short(old.get(name))} -> {short(new.get(name))}"
            for name in sorted(set(old) | set(new))
            if old.get(name) != new.get(name) and not _neutral(name, neutral)]


_HISTORY_HEADER = "# gnopt.train: the operative config of steps {0}, {1}, ... of this run\n"


def _config_history(run_dir: str) -> dict[int, str]:
    """``{k: path}`` of ``run_dir/configs/from_step_<k>.gin``."""
    folder = os.path.join(run_dir, CONFIGS_DIR)
    if not os.path.isdir(folder):
        return {}
    return {int(m[1]): os.path.join(folder, name) for name in os.listdir(folder)
            if (m := _CONFIG_HISTORY.match(name))}


def _config_in_effect(run_dir: str, step: int) -> str | None:
    """The operative config that step ``step`` of the run used (``config.gin`` for runs
    without ``configs/``); ``None`` if there is none."""
    history = {k: path for k, path in _config_history(run_dir).items() if k <= step}
    path = history[max(history)] if history else os.path.join(run_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        text = f.read()
    return text.split("\n", 1)[1] if text.startswith("# gnopt.train:") else text


def _check_config_change(run_dir: str, step: int, current: str, neutral: tuple[str, ...],
                         allow: bool) -> list[str]:
    """Compares ``current`` with the config that produced the checkpoint of ``step``; refuses
    a change unless ``allow``. Returns the changes (allowed ones)."""
    stored = _config_in_effect(run_dir, step)
    changes = [] if stored is None else _config_changes(stored, current, neutral)
    if changes and not allow:
        shown = "; ".join(changes[:3]) + (f"; and {len(changes) - 3} more" if len(changes) > 3
                                          else "")
        raise RunDirError(
            f"{run_dir} was run with another config ({shown}); re-run with "
            "--allow_config_change to continue with this one (every config used is kept in "
            f"{os.path.join(run_dir, CONFIGS_DIR)}), or give another --run_dir")
    return changes


def _record_config(run_dir: str, first_step: int, config: str) -> None:
    """Writes ``config`` as ``config.gin`` and, if it differs from the config in effect before
    ``first_step``, as ``configs/from_step_<first_step>.gin`` (files of later steps are
    dropped: those steps were redone)."""

    def write(path: str, text: str) -> None:
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.replace(path + ".tmp", path)

    folder = os.path.join(run_dir, CONFIGS_DIR)
    history = _config_history(run_dir)
    legacy = _config_in_effect(run_dir, first_step) if not history else None
    os.makedirs(folder, exist_ok=True)
    if legacy is not None:  # a run of an older gnopt (no configs/): its config.gin
        write(os.path.join(folder, "from_step_1.gin"), _HISTORY_HEADER.format(1, 2) + legacy)
    for start, path in history.items():
        if start > first_step:
            os.remove(path)
    if _config_in_effect(run_dir, first_step - 1) != config:
        write(os.path.join(folder, f"from_step_{first_step}.gin"),
              _HISTORY_HEADER.format(first_step, first_step + 1) + config)
    write(os.path.join(run_dir, CONFIG_FILE), config)


def _nonfinite_report(check: dict[str, np.ndarray], names: list[str], loss: float) -> str:
    """Which of loss, gradient and update were not finite on a rejected step, and where."""
    bad, good = [], []
    (good if bool(check["loss"]) else bad).append(f"loss ({loss:.4g})")
    for key, label in (("grads", "gradient"), ("updates", "update")):
        if key not in check:
            continue
        finite = np.asarray(check[key], bool)
        if finite.all():
            good.append(label)
            continue
        wrong = np.flatnonzero(~finite)
        leaf = names[wrong[0]] if len(names) == len(finite) else f"leaf {wrong[0]}"
        more = f" and {len(wrong) - 1} more of {len(finite)} leaves" if len(wrong) > 1 else ""
        bad.append(f"{label} (in {leaf or 'the root'}{more})")
    text = "non-finite " + " and ".join(bad)
    return text + (f"; finite {' and '.join(good)}" if good else "")


def _open_init_from(init_from: str) -> tuple[Checkpointer, int | None]:
    """``(read-only checkpointer, step or None: the newest)`` of ``train.init_from``: a run
    folder, its checkpoint folder or one step's folder."""
    path, step = os.path.abspath(init_from), None
    if os.path.isdir(os.path.join(path, CHECKPOINT_DIR)):
        path = os.path.join(path, CHECKPOINT_DIR)
    elif os.path.basename(path).isdigit():
        path, step = os.path.dirname(path), int(os.path.basename(path))
    if not os.path.isdir(path):
        raise ConfigError(f"train.init_from={init_from!r} is not a run or checkpoint folder")
    checkpointer = Checkpointer(path, create=False)
    steps = checkpointer.all_steps()
    if not steps or (step is not None and step not in steps):
        checkpointer.close()
        which = "" if step is None else f" of step {step}"
        raise ConfigError(f"train.init_from={init_from!r}: no checkpoint{which} in {path}")
    return checkpointer, step


def _load_params(source: tuple[Checkpointer, int | None], params):
    """``(params, step)`` read from ``source`` (see :func:`_open_init_from`) into the template
    ``params`` (shapes and shardings); only the parameters are read."""
    checkpointer, step = source
    try:
        loaded, meta = checkpointer.restore({"params": params}, step, partial=True)
    except CheckpointCorruptError as e:
        raise ConfigError(f"train.init_from: {e}") from e
    return loaded["params"], meta["step"]


def _build_step(o):
    """The mesh, the optimizer and the jitted step, checked and traced abstractly."""
    device_mesh = _device_mesh(o.mesh)
    _check_batch_split(device_mesh, vars(o))
    tx, needs = build_optimizer(o.optimizer, loss_fn=o.loss_fn, total_steps=o.num_steps,
                                grad_accum_steps=o.grad_accum_steps)
    init = functools.partial(_init_params, o.model, o.seed)
    abstract = (_abstract_params(init),)
    abstract += (jax.eval_shape(tx.init, abstract[0]),)
    shardings = dist.step_shardings(device_mesh, *abstract)
    step_fn = make_train_step(tx, o.loss_fn, check_grads=not needs.own_gradient,
                              chunk_size=o.microbatch_size, shardings=shardings, explain=True)
    trace = functools.partial(_trace_shapes, *abstract, step_fn, batch_size=o.batch_size,
                              seq_len=o.seq_len, next_batch=o.line_search_batch == "next")
    return device_mesh, tx, needs, init, abstract, shardings, step_fn, trace


def _build(o):
    """Everything a run needs before its first step (config errors raised here), or,
    for ``print_config`` / ``shapes`` / ``memory``, the answer."""
    _check_options(vars(o))
    writes = o.mode == "train"
    if o.run_dir is None and writes:
        raise ConfigError("train needs a run_dir")
    if writes:
        _check_run_dir(o.run_dir)
        if not o.restart:
            _check_earlier_run(o.run_dir)
    if o.model is None:
        raise ConfigError("train.model is not set (e.g. train.model = @gnopt.models.LLaMA)")
    if o.init_from is not None and not isinstance(o.init_from, (str, os.PathLike)):
        raise ConfigError(f"train.init_from must be a path, got {o.init_from!r}")
    device_mesh, tx, needs, init, abstract, shardings, step_fn, trace = _build_step(o)
    if o.mode == "print_config":
        trace()
        return {"config": gin.operative_config_str()}
    if o.mode in ("shapes", "memory"):
        out = trace(compile_step=o.mode == "memory")
        return {**out, "devices": device_mesh.devices.size, "mesh": dict(device_mesh.shape)}
    source = None if o.init_from is None else _open_init_from(o.init_from)
    train_tokens, val_tokens = _load_tokens(o.data, o.val_data)
    _check_vocab(abstract[0], {"train": train_tokens, "validation": val_tokens},
                 seq_len=o.seq_len)
    if writes and not o.restart and _checkpoint_steps(o.run_dir):
        trace()  # what the step uses is recorded by gin as it is traced: trace, then compare
        neutral = _NEUTRAL_OPTIONS + (() if "total_steps" in needs.arguments else ("num_steps",))
        _check_config_change(o.run_dir, _checkpoint_steps(o.run_dir)[-1],
                             gin.operative_config_str(), neutral, o.allow_config_change)
    params, rng = jax.jit(init, out_shardings=(shardings.params, shardings.replicated))()
    return (device_mesh, tx, shardings, step_fn, source, train_tokens, params, rng,
            _validation_batches(o, val_tokens, device_mesh))


def _validation_batches(o, val_tokens, device_mesh) -> list:
    if not o.eval_every:
        return []
    try:
        return [dist.global_batch(_process_rows(batch), device_mesh)
                for batch in data_lib.validation_batches(
                    val_tokens, seq_len=o.seq_len, batch_size=o.microbatch_size or o.batch_size,
                    num_batches=o.eval_batches)]
    except ValueError as e:
        raise ConfigError(f"validation data: {_one_line(e)}; give a larger set with "
                          "train.val_data, or lower train.eval_batches, or set "
                          "train.eval_every = 0") from e


class _Run:
    """One training run: what :func:`_build` made, the state, the counters, and the
    pieces of one step; the hooks (:class:`ShardWatch`, :class:`Progress`,
    :class:`MetricsHook`, :class:`CheckpointHook`) do the rest."""

    def __init__(self, o, device_mesh, tx, shardings, step_fn, source, train_tokens, params,
                 rng, val_batches):
        self.o, self.device_mesh, self.tx, self.shardings = o, device_mesh, tx, shardings
        self.step_fn, self.source, self.train_tokens = step_fn, source, train_tokens
        self.params, self.rng, self.val_batches = params, rng, val_batches
        self.dry_run = o.mode == "dry_run"
        self.processes = jax.process_count()
        self.primary = jax.process_index() == 0
        self.say = functools.partial(print, flush=True) if self.primary else lambda *_: None
        self.pipeline = data_lib.make_pipeline(
            train_tokens, seq_len=o.seq_len, batch_size=o.batch_size // self.processes,
            seed=o.seed, shuffle=o.shuffle, shard_index=jax.process_index(),
            shard_count=self.processes)
        self.eval_fn = jax.jit(functools.partial(batch_loss, o.loss_fn),
                               out_shardings=shardings.replicated)
        self.leaf_names = float_leaf_names(params)
        self.checkpointer = self.log = None
        self.start = time.perf_counter()
        self.rate_start = self.rate_tokens = None  # throughput clock: after the compiling step

    def announce(self) -> None:
        mesh = self.device_mesh
        self.say(f"model: {models.describe(self.params)}")
        self.say(f"mesh: data {mesh.shape['data']} x fsdp {mesh.shape['fsdp']} "
                 f"({mesh.devices.size} device(s), {self.processes} process(es))")
        if self.o.mode == "train":
            self.say(_config_banner(gin.operative_config_str()))

    def open(self) -> None:
        """The run folder, the checkpointer, the initial or restored state, the metrics log."""
        o = self.o
        if not self.dry_run:
            if o.restart:
                cleared = _clear_run(o.run_dir)
                if cleared:
                    self.say(f"--restart: deleted {', '.join(cleared)} of the earlier run in "
                             f"{o.run_dir}")
            os.makedirs(o.run_dir, exist_ok=True)
            self.checkpointer = Checkpointer(os.path.join(o.run_dir, CHECKPOINT_DIR),
                                             keep=o.keep_checkpoints)
        resume = self.checkpointer is not None and self.checkpointer.latest_step() is not None
        if self.source is not None:
            if not resume:
                self.params, from_step = _load_params(self.source, self.params)
                self.say(f"parameters from {o.init_from} (step {from_step}), fresh optimizer state")
            self.source[0].close()
        # Copies: an init may put one array in two places, which donation rejects.
        opt_state = jax.tree.map(jnp.copy, jax.jit(
            self.tx.init, out_shardings=self.shardings.opt_state)(self.params))
        self.state = {"params": self.params, "opt_state": opt_state, "rng": self.rng}
        self.meta = {"step": 0, "tokens": 0, "wall_s": 0.0, "nonfinite_skipped": 0,
                     "nonfinite_in_a_row": 0, "stop_reason": None}
        if resume:
            self.state, self.meta = self.checkpointer.restore(self.state)
            self.pipeline.set_state(self.meta["data_state"])
            self.say(f"resuming {o.run_dir} from step {self.meta['step']}")
            if self.meta["stop_reason"] == "nonfinite":  # stopped by the guard: count afresh
                self.meta["nonfinite_in_a_row"] = 0
        self.log = (MetricsLog(o.run_dir, resume_step=self.meta["step"], tensorboard=o.tensorboard)
                    if self.primary and not self.dry_run else None)
        self.params, self.opt_state = self.state["params"], self.state["opt_state"]
        self.step, self.tokens, self.skipped, self.in_a_row = (self.meta[k] for k in (
            "step", "tokens", "nonfinite_skipped", "nonfinite_in_a_row"))
        self.summary = {"step": self.step, "loss": None, "val_loss": None, "tokens": self.tokens,
                        "wall_s": self.meta["wall_s"], "tokens_per_s": None,
                        "stop_reason": self.meta["stop_reason"],
                        "nonfinite_skipped": self.skipped, "params": self.params,
                        "opt_state": self.opt_state}

    def take_step(self):
        """One optimizer step (``grad_accum_steps`` micro-steps): ``(loss, diagnostics,
        rejected)``, ``rejected`` the check and loss of the last non-finite micro-step."""
        losses, diagnostics, rejected = [], {}, None
        for _ in range(self.o.grad_accum_steps):
            batch = dist.global_batch(next(self.pipeline), self.device_mesh)
            ls_batch = (dist.global_batch(next(self.pipeline), self.device_mesh)
                        if self.o.line_search_batch == "next" else None)
            self.params, self.opt_state, loss, check, diagnostics = self.step_fn(
                self.params, self.opt_state, batch, ls_batch)
            self.tokens += batch[0].size + (0 if ls_batch is None else ls_batch[0].size)
            check = jax.device_get(check)
            if bool(check["ok"]):
                self.in_a_row = 0
            else:
                self.skipped, self.in_a_row = self.skipped + 1, self.in_a_row + 1
                rejected = (check, float(loss))
            losses.append(loss)
        self.step += 1
        return float(np.mean(jax.device_get(losses))), diagnostics, rejected

    def record(self, loss: float, rejected) -> dict[str, Any]:
        """The step's metrics record (with the validation loss when due); updates the summary."""
        o, now = self.o, time.perf_counter()
        if self.rate_start is None:
            self.rate_start, self.rate_tokens = now, self.tokens
        record = {"step": self.step, "tokens": self.tokens, "loss": loss,
                  "wall_s": self.meta["wall_s"] + now - self.start, "skipped": rejected is not None,
                  "nonfinite_skipped": self.skipped}
        if o.eval_every and (self.step % o.eval_every == 0 or self.step == o.num_steps
                             or self.dry_run):
            record["val_loss"] = float(np.mean([self.eval_fn(self.params, b)
                                                for b in self.val_batches]))
            self.summary["val_loss"] = record["val_loss"]
        if self.rate_tokens != self.tokens:
            self.summary["tokens_per_s"] = (self.tokens - self.rate_tokens) / (now - self.rate_start)
        self.summary.update(step=self.step, loss=loss, tokens=self.tokens, wall_s=record["wall_s"],
                            nonfinite_skipped=self.skipped, params=self.params,
                            opt_state=self.opt_state)
        return record

    def stop_reason(self, record, sigterm) -> str | None:
        o, reason = self.o, None
        if self.in_a_row >= o.max_nonfinite_in_a_row:
            reason = "nonfinite"
        elif o.target_loss is not None and record.get(o.target_metric, math.inf) <= o.target_loss:
            reason = "target_loss"
        elif self.step >= o.num_steps:
            reason = "num_steps"
        elif dist.any_process(bool(sigterm)):
            reason = "sigterm"
        self.summary["stop_reason"] = reason
        return reason

    def save(self, stop_reason: str | None) -> None:
        self.state.update(params=self.params, opt_state=self.opt_state)
        self.checkpointer.save(self.step, self.state, {
            "step": self.step, "tokens": self.tokens,
            "wall_s": self.meta["wall_s"] + time.perf_counter() - self.start,
            "nonfinite_skipped": self.skipped, "nonfinite_in_a_row": self.in_a_row,
            "stop_reason": stop_reason, "data_state": self.pipeline.get_state()})

    def close(self) -> None:
        if self.checkpointer is not None:
            self.checkpointer.close()
        if self.log:
            self.log.close()

    def finish(self, check_skipped: bool = True) -> dict[str, Any]:
        """Closes the run (and fails it if it skipped too many steps): its summary."""
        self.close()
        if check_skipped:
            self.check_skipped()
        return self.summary

    def check_skipped(self) -> None:
        """Fails a finished run that rejected too many of its steps."""
        steps, skipped, limit = self.step * self.o.grad_accum_steps, self.skipped, \
            self.o.max_skipped_fraction
        if steps and skipped > limit * steps:
            raise NonFiniteError(
                f"{skipped} of {steps} steps were skipped as non-finite ({skipped / steps:.0%}), "
                f"more than train.max_skipped_fraction = {limit}: the run did not "
                f"train as configured (checkpoint of step {self.step} in "
                f"{self.checkpointer.directory}); lower the learning rate or check the data, or "
                "raise train.max_skipped_fraction")

    def fail_nonfinite(self, rejected) -> None:
        """Stops after ``max_nonfinite_in_a_row`` rejected steps (their checkpoint is saved)."""
        self.close()
        step, in_a_row = self.step, self.in_a_row
        last_good = step - math.ceil(in_a_row / self.o.grad_accum_steps)
        what = _nonfinite_report(rejected[0], self.leaf_names, rejected[1])
        raise NonFiniteError(
            f"stopped at step {step}: {in_a_row} non-finite steps in a row; step {step} "
            f"had a {what}; the parameters and "
            f"optimizer state of step {last_good}, the last finite one, are saved as the "
            f"checkpoint of step {step} in {self.checkpointer.directory}; lower the learning "
            "rate and re-run with --allow_config_change to continue from it, or raise "
            "train.max_nonfinite_in_a_row")


class TrainHook:
    """A piece of the training loop around the step: ``before_step(run)`` and
    ``after_step(run, record, diagnostics, stop_reason)`` (``stop_reason``: ``None``
    while the run goes on)."""

    def before_step(self, run: _Run) -> None:
        pass

    def after_step(self, run: _Run, record: dict, diagnostics: dict,
                   stop_reason: str | None) -> None:
        pass

    def close(self) -> None:
        """Called when the loop ends, also by an error."""


class ShardWatch(TrainHook):
    """Stops with a checkpoint (exit 3) when a token shard vanishes."""

    def __init__(self, files):
        self.files = files

    def before_step(self, run):
        vanished = _vanished(self.files)
        if not dist.any_process(vanished is not None):
            return
        if run.step:
            run.save("data_missing")
        run.close()
        saved = f"checkpoint of step {run.step} in {run.checkpointer.directory}; " if run.step else ""
        raise DataSourceError(
            f"{vanished or 'a token shard vanished on another process'} after step "
            f"{run.step}; {saved}put it back and re-run the same command to resume")


class Progress(TrainHook):
    """The progress bar, started after the first step so that its rate and ETA leave
    out the compilation."""

    def __init__(self):
        self.bar = _NoBar()

    def after_step(self, run, record, diagnostics, stop_reason):
        if isinstance(self.bar, _NoBar):
            if not (run.dry_run or not run.primary):
                run.say(f"step {run.step} (compiling the step included) took "
                        f"{time.perf_counter() - run.start:.1f} s")
            self.bar = tqdm(total=run.o.num_steps, initial=run.step, unit="step",
                            dynamic_ncols=True, disable=run.dry_run or not run.primary,
                            mininterval=0.5 if sys.stderr.isatty() else 30.0)
        else:
            self.bar.update(1)
        self.bar.set_postfix(loss=f"{record['loss']:.4f}",
                             tok_s=f"{run.summary['tokens_per_s'] or 0:,.0f}", refresh=False)
        if run.dry_run or stop_reason:
            self.bar.close()

    def close(self):
        self.bar.close()


class MetricsHook(TrainHook):
    """``metrics.jsonl`` (and TensorBoard) every ``log_every`` steps, at evaluations and at
    the end; the config beside them after the first step."""

    def __init__(self):
        self.logged_at = None  # (time, tokens) at the first step, then at each record

    def after_step(self, run, record, diagnostics, stop_reason):
        if run.dry_run:
            return
        now, tokens, log = time.perf_counter(), run.tokens, run.log
        if log and (run.step % run.o.log_every == 0 or "val_loss" in record or stop_reason):
            if self.logged_at is not None and tokens > self.logged_at[1]:
                record["tokens_per_s"] = (tokens - self.logged_at[1]) / (now - self.logged_at[0])
                self.logged_at = (now, tokens)
            log.write({**diagnostics, **record})
        if self.logged_at is None:  # after the first (compiling) step: the throughput clock
            self.logged_at = (now, tokens)
        if run.primary and run.step == run.meta["step"] + 1:
            _record_config(run.o.run_dir, run.step, gin.operative_config_str())
            if log:
                log.text("config", gin.operative_config_str(), run.step)


class CheckpointHook(TrainHook):
    """A checkpoint every ``checkpoint_every`` steps and at the end (also after the
    non-finite guard: rejected steps changed nothing, so it holds the last finite state)."""

    def after_step(self, run, record, diagnostics, stop_reason):
        every = run.o.checkpoint_every
        if not run.dry_run and (stop_reason or (every and run.step % every == 0)):
            run.save(stop_reason)


@contextlib.contextmanager
def _closing(hooks):
    try:
        yield
    finally:
        for hook in hooks:
            hook.close()


@gin.configurable("train", module="gnopt",
                  denylist=["run_dir", "mode", "restart", "allow_config_change"])
def train(
    run_dir: str | None = None,
    *,
    mode: str = "train",
    restart: bool = False,
    allow_config_change: bool = False,
    model: Callable | None = None,
    optimizer: Callable | None = None,
    data: Callable = registry.CONFIGURABLES["gnopt.data.stdlib_corpus"],
    val_data: Callable | None = None,
    loss_fn: Callable = softmax_cross_entropy,
    mesh: dict[str, int] | tuple[int, int] | None = None,
    init_from: str | None = None,
    seq_len: int = 128,
    batch_size: int = 16,
    grad_accum_steps: int = 1,
    microbatch_size: int | None = None,
    num_steps: int = 100,
    eval_every: int = 50,
    eval_batches: int = 4,
    target_loss: float | None = None,
    target_metric: str = "val_loss",
    log_every: int = 1,
    checkpoint_every: int = 100,
    keep_checkpoints: int = 2,
    seed: int = 0,
    shuffle: bool = True,
    max_nonfinite_in_a_row: int = 10,
    max_skipped_fraction: float = 0.1,
    line_search_batch: str = "same",
    tensorboard: bool = True,
) -> dict[str, Any]:
    """Trains a model; resumes from ``run_dir``'s newest intact checkpoint if there is one.

    Args:
      run_dir: folder of metrics, config and checkpoints (only ``mode="train"``).
      mode: ``"train"``; ``"dry_run"``: build everything, run one step, write
        nothing; ``"shapes"``: build the model and optimizer state abstractly
        (``jax.eval_shape``) and trace one step: no data, no compute, for
        checking configs too big for this machine; ``"memory"``: as
        ``"shapes"``, and compile the step for the mesh and report XLA's memory
        analysis of it (``"memory"``: bytes per device, see :func:`_memory_of`;
        simulated CPU devices, ``XLA_FLAGS=--xla_force_host_platform_device_count=8``,
        stand in for accelerators); ``"print_config"``: as ``"shapes"``, and
        return the operative gin config (``"config"``).
      restart: start ``run_dir`` over from step 0, deleting what an earlier
        run wrote there (metrics, configs, checkpoints). Without it, a folder
        with metrics but no checkpoint to resume is refused.
      allow_config_change: resume although the operative config differs from
        the run's ``config.gin`` (in more than the settings that do not change
        what a step computes: mesh, logging, checkpointing, evaluation, stop
        criteria, and ``num_steps`` if the optimizer does not take
        ``total_steps``). Every config used is kept as
        ``configs/from_step_<k>.gin``.
      model: factory ``model(key=...) -> equinox model`` (e.g.
        ``@gnopt.models.LLaMA`` with ``gnopt.models.LLaMA.config =
        @gnopt.models.llama_config()``); all its leaves must be arrays.
      optimizer: optimizer builder, see :func:`build_optimizer`.
      data: token source, called with ``split="train"`` (and
        ``split="validation"`` unless ``val_data`` is given) if it accepts it:
        ``@gnopt.data.stdlib_corpus``, ``@gnopt.data.text_files``,
        ``@gnopt.data.token_shards``.
      val_data: validation token source, used whole (called with
        ``split="all"`` if it accepts it).
      loss_fn: ``loss_fn(logits, targets) -> scalar``.
      mesh: device mesh ``{"data": d, "fsdp": f}`` or ``(d, f)`` over all
        devices of all processes (``-1``: the rest); ``None``: every device on
        ``data``. Batches are split over all devices; parameters and optimizer
        state are sharded over ``fsdp`` (:func:`gnopt.distributed.leaf_spec`).
      init_from: a run folder, its ``checkpoints`` folder or one step's folder
        (e.g. a short AdamW warm-up): a new run starts from its parameters,
        with a fresh optimizer state at step 0. Ignored when ``run_dir`` has a
        checkpoint of its own (that is resumed).
      seq_len, batch_size: ``[B, T]`` of one (micro-)batch; ``B`` is global
        (all processes) and must be divisible by the mesh's device count.
      grad_accum_steps: micro-batches per optimizer step (first-order only);
        the effective batch is ``batch_size · grad_accum_steps``.
      microbatch_size: compute the trainer's loss and gradient, and the
        validation loss, in chunks of this many sequences (memory: needed for
        second-order optimizers on batches of millions of tokens); ``None``:
        the whole batch at once. Must be divisible by the device count.
      num_steps: optimizer steps to reach (counting steps of earlier runs).
      eval_every: validation loss every this many steps and at the end (0: never).
      eval_batches: validation batches per evaluation (the same ones each time).
      target_loss: stop once ``target_metric`` is at or below it.
      target_metric: ``"val_loss"`` or ``"loss"`` (the step's training loss).
      log_every: write a metrics record every this many steps (and at
        evaluations and the end).
      checkpoint_every: checkpoint every this many steps (0: only at the end).
      keep_checkpoints: newest checkpoints kept.
      seed: model initialisation and data order.
      shuffle: shuffle the training windows.
      max_nonfinite_in_a_row: stop after this many consecutive rejected steps
        (with a checkpoint: rejected steps change nothing, so it holds the
        state of the last finite step).
      max_skipped_fraction: a run that rejected more than this fraction of
        its (micro-)steps as non-finite fails at its end (``NonFiniteError``,
        after its final checkpoint).
      line_search_batch: ``"same"``: optimizers score line-search candidates on
        the step's batch; ``"next"``: on one more batch drawn per step (counted
        in ``tokens``).
      tensorboard: also write every logged scalar as TensorBoard events in
        ``run_dir`` (beside ``metrics.jsonl``; ``tensorboard --logdir runs``).

    A SIGTERM (in the main thread) ends the run after the current step, with a
    checkpoint of it and ``stop_reason="sigterm"``.

    Returns:
      A summary: ``step``, ``loss``, ``val_loss``, ``tokens``, ``wall_s``,
      ``tokens_per_s`` (after compilation), ``stop_reason`` (``"num_steps"``,
      ``"target_loss"``, ``"sigterm"``), ``nonfinite_skipped`` (rejected
      steps of the whole run), and the final ``params`` and
      ``opt_state`` (on the mesh) (``mode="shapes"``: ``step`` and ``num_params``).

    Raises:
      ConfigError: a bad setting (before any step).
      RunDirError: ``run_dir`` is a file, holds an earlier run that cannot be
        resumed (without ``restart``), or was run with another config
        (without ``allow_config_change``); before any step.
      NonFiniteError: ``max_nonfinite_in_a_row`` rejected steps in a row, or
        more than ``max_skipped_fraction`` of them in the whole run.
      DataSourceError: a token shard vanished; a checkpoint of the last step is saved.
      CheckpointCorruptError: ``run_dir`` has checkpoints but none is intact.
    """
    o = types.SimpleNamespace(**locals())  # the arguments
    with _config_errors():
        built = _build(o)
        if isinstance(built, dict):  # print_config, shapes, memory: nothing run
            return built
        run = _Run(o, *built)
    run.announce()
    run.open()
    if run.meta["stop_reason"] == "target_loss" or run.step >= num_steps:
        run.say(f"{run_dir} is already finished at step {run.step}")
        return run.finish()
    hooks = ([] if run.dry_run else [ShardWatch(_token_files(run.train_tokens))]) + [
        Progress(), MetricsHook(), CheckpointHook()]
    with _sigterm_received() as sigterm, _closing(hooks):
        while True:
            for hook in hooks:
                hook.before_step(run)
            loss, diagnostics, rejected = run.take_step()
            record = run.record(loss, rejected)
            stop = run.stop_reason(record, sigterm)
            for hook in hooks:
                hook.after_step(run, record, diagnostics, stop)
            if run.dry_run:
                return run.summary
            if stop == "nonfinite":
                run.fail_nonfinite(rejected)
            if stop:
                return run.finish(check_skipped=stop != "sigterm")


_INITIALIZE = "gnopt.distributed.initialize"


def _start_processes() -> None:
    """``gnopt.distributed.initialize`` if the config binds any of its arguments (even to None)."""
    for argument in ("coordinator_address", "num_processes", "process_id"):
        try:
            gin.query_parameter(f"{_INITIALIZE}.{argument}")
        except ValueError:
            continue
        registry.CONFIGURABLES[_INITIALIZE]()
        return


PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_REPOSITORY_GIN_DIR = os.path.join(os.path.dirname(PACKAGE_DIR), "gin")
GIN_DIR = (_REPOSITORY_GIN_DIR if os.path.isfile(os.path.join(_REPOSITORY_GIN_DIR, "quickstart.gin"))
           else os.path.join(PACKAGE_DIR, "gin"))
"""gnopt's experiments: the repository's ``gin/`` folder (next to the ``gnopt`` package) in a
checkout or editable install, else the copy a wheel installs as ``gnopt/gin``."""


def _resolve_gin_file(name: str, including: str | None) -> str:
    """Where ``include 'name'`` (or ``--gin_file name``) points: an absolute path as is; a
    relative one in the including file's folder (for ``--gin_file``: the current folder), then
    in :data:`GIN_DIR`, then in gin's search path."""
    if os.path.isabs(name):
        return name
    folders = [os.path.dirname(including) if including else os.getcwd(), GIN_DIR]
    for folder in folders:
        candidate = os.path.join(folder, name)
        if os.path.isfile(candidate):
            return os.path.abspath(candidate)
    for prefix in gin.config._LOCATION_PREFIXES:  # gin.add_config_file_search_path's list
        candidate = os.path.join(prefix, name)
        if os.path.isfile(candidate):
            return os.path.abspath(candidate)
    where = f"include '{name}' in {including}" if including else f"--gin_file {name}"
    raise FileNotFoundError(f"{where}: no such file in {' or '.join(folders)}")


@contextlib.contextmanager
def _gin_includes_relative_to_including_file():
    """While parsing: gin files are found by :func:`_resolve_gin_file` (gin itself looks only
    in its search path, so a file outside ``gin/`` could not include one that includes
    ``base/...``)."""
    original = gin.config.parse_config_file
    including: list[str] = []

    def parse_config_file(config_file, skip_unknown=False, print_includes_and_imports=False):
        path = _resolve_gin_file(config_file, including[-1] if including else None)
        if path in including:
            raise ValueError(f"gin file {path} includes itself (via {' -> '.join(including)})")
        including.append(path)
        try:
            return original(path, skip_unknown, print_includes_and_imports)
        finally:
            including.pop()

    gin.config.parse_config_file = parse_config_file
    try:
        yield
    finally:
        gin.config.parse_config_file = original


DEFAULT_GIN_FILE = "quickstart.gin"
"""What ``python -m gnopt.train`` without ``--gin_file`` runs."""


def _train_options_help() -> str:
    """``--help``'s list of the gin-configurable arguments of :func:`train`, with their
    defaults and descriptions (from its docstring)."""
    doc = inspect.getdoc(train) or ""
    described: dict[str, str] = {}
    args_section = doc.split("Args:", 1)[1].split("\n\n", 1)[0] if "Args:" in doc else ""
    for match in re.finditer(r"^  (\w+(?:, \w+)*): (.*?)(?=^  \w|\Z)", args_section,
                             re.M | re.S):
        text = re.sub(r":\w+:`~?([^`]+)`", r"\1", " ".join(match[2].split()))
        text = re.sub(r"``([^`]+)``", r"\1", text)
        for name in match[1].split(", "):
            described[name] = text
    hidden = {"run_dir", "mode", "restart", "allow_config_change"}
    lines = ["gin-configurable options of train (set with --gin_param 'train.NAME = VALUE'; "
             "the value shown is the default):"]
    for name, parameter in inspect.signature(train).parameters.items():
        if name in hidden:
            continue
        lines.append(f"  train.{name} = {_gin_value(parameter.default)}")
        if described.get(name):
            lines += textwrap.wrap(described[name], 78, initial_indent="      ",
                                   subsequent_indent="      ")
    return "\n".join(lines)


def _gin_value(value) -> str:
    """``value`` as written in a gin file."""
    for name, configurable in registry.CONFIGURABLES.items():
        if configurable is value:
            return f"@{name}"
    if value is softmax_cross_entropy:
        return "%gnopt.losses.softmax_cross_entropy"
    return repr(value)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (see the module docstring)."""
    parser = argparse.ArgumentParser(
        prog="python -m gnopt.train",
        description="Train a model from gin files (default: quickstart.gin, the tiny LLaMA on "
                    "the embedded corpus). gin files are looked up in the current folder, then "
                    f"in gnopt's experiments ({GIN_DIR}).",
        epilog=_train_options_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gin_file", action="append", default=[],
                        help="gin config file (repeatable), e.g. quickstart.gin, 45m_gn.gin")
    parser.add_argument("--gin_param", action="append", default=[],
                        help="one gin binding, e.g. 'train.num_steps = 10' (repeatable)")
    parser.add_argument("--run_dir", help="run folder (default: runs/<first gin file's name>)")
    modes = parser.add_mutually_exclusive_group()
    modes.add_argument("--dry_run", action="store_true",
                       help="build everything, run one step, write nothing")
    modes.add_argument("--shapes_only", action="store_true",
                       help="build abstractly, trace and compile one step for the mesh, and "
                            "report its peak memory per device (XLA's memory analysis): no "
                            "data, no compute")
    modes.add_argument("--print_config", action="store_true",
                       help="print the operative gin config (model and optimizer built "
                            "abstractly, one step traced; no data, no compute) and exit")
    parser.add_argument("--restart", action="store_true",
                        help="start the run folder over from step 0, deleting the metrics, "
                             "configs and checkpoints of an earlier run in it")
    parser.add_argument("--allow_config_change", action="store_true",
                        help="resume a run although its config changed (each config used is "
                             "kept in RUN_DIR/configs/from_step_<k>.gin)")
    args = parser.parse_args(argv)
    if not args.gin_file:
        args.gin_file = [DEFAULT_GIN_FILE]
    run_dir = args.run_dir or os.path.join(
        "runs", os.path.splitext(os.path.basename(args.gin_file[0]))[0])
    original_format = warnings.formatwarning
    warnings.formatwarning = _one_line_warnings(original_format)
    try:
        return _main(args, run_dir)
    finally:
        warnings.formatwarning = original_format


def _one_line_warnings(original: Callable) -> Callable:
    """``warnings.formatwarning`` that writes gnopt's own warnings as one line."""

    def format_warning(message, category, filename, lineno, line=None):
        if os.path.abspath(filename).startswith(PACKAGE_DIR + os.sep):
            return f"gnopt.train: warning: {message}\n"
        return original(message, category, filename, lineno, line)

    return format_warning


def parse_gin(files: list[str], bindings: list[str] = ()) -> None:
    """Parses gin ``files``, then ``bindings``, into gin's global config; files
    (and their includes) are found as :func:`_resolve_gin_file` says."""
    logging.disable(logging.ERROR)  # gin's resource reader logs every search-path miss
    try:
        with _gin_includes_relative_to_including_file():
            gin.parse_config_files_and_bindings(files, bindings)
    finally:
        logging.disable(logging.NOTSET)


def _main(args: argparse.Namespace, run_dir: str) -> int:
    try:
        parse_gin(args.gin_file, args.gin_param)
    except Exception as e:  # noqa: BLE001 -- any parse error is a config error: one line, exit 2
        print(f"gnopt.train: config error: {_one_line(e)}", file=sys.stderr)
        return 2
    try:
        _start_processes()
        mode = ("dry_run" if args.dry_run else "memory" if args.shapes_only
                else "print_config" if args.print_config else "train")
        summary = train(run_dir, mode=mode, restart=args.restart,
                        allow_config_change=args.allow_config_change)
    except (ConfigError, CheckpointMismatchError) as e:
        print(f"gnopt.train: config error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    except RunDirError as e:
        print(f"gnopt.train: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    except NonFiniteError as e:
        print(f"gnopt.train: {str(e).splitlines()[0]}", file=sys.stderr)
        return 1
    except DataSourceError as e:
        print(f"gnopt.train: {str(e).splitlines()[0]}", file=sys.stderr)
        return EXIT_DATA_MISSING
    except CheckpointCorruptError as e:
        print(f"gnopt.train: {str(e).splitlines()[0]}; they were moved to "
              f"{os.path.join(os.path.abspath(run_dir), CHECKPOINT_DIR)}-corrupt; re-run with "
              "--restart to start over from step 0", file=sys.stderr)
        return EXIT_NO_INTACT_CHECKPOINT
    if "config" in summary:
        print(summary["config"].rstrip())
        return 0
    if "num_params" in summary:
        if summary.get("memory"):
            print(memory_line(summary["memory"], summary["devices"], summary["mesh"]))
        print(f"shapes check passed: {summary['num_params']:,} parameters")
        return 0
    if summary["stop_reason"] == "sigterm":
        print(f"gnopt.train: stopped by SIGTERM after step {summary['step']} (checkpoint saved); "
              "re-run the same command to resume", file=sys.stderr)
        return EXIT_SIGTERM
    if jax.process_index() == 0:
        val = "" if summary["val_loss"] is None else f", val_loss {summary['val_loss']:.4f}"
        rate = ("" if summary["tokens_per_s"] is None
                else f", {summary['tokens_per_s']:,.0f} tokens/s")
        loss = "" if summary["loss"] is None else f": loss {summary['loss']:.4f}"
        skipped = ("" if not summary["nonfinite_skipped"]
                   else f", {summary['nonfinite_skipped']} steps skipped (non-finite)")
        print(f"step {summary['step']}{loss}{val}, {summary['tokens']:,} tokens, "
              f"{summary['wall_s']:.1f} s{rate}{skipped}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
