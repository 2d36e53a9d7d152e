"""Shared pieces of the benchmarks: machine record, timing, models, result files."""

from __future__ import annotations

import datetime
import functools
import json
import os
import platform
import shlex
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp

from gnopt import models, train
from gnopt.losses import softmax_cross_entropy

LOSS = softmax_cross_entropy
batch_loss = functools.partial(train.batch_loss, LOSS)
"""``L(θ)`` on ``batch = (inputs, targets)``: mean cross-entropy of the LM."""
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12}
"""Dense bf16 peak FLOP/s by device-kind substring (MFU denominators)."""


SIMD_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16")


def cpu_model() -> str:
    """The CPU's model name and SIMD extensions, e.g. ``"AMD EPYC (avx2 avx512f)"``.

    Recorded because XLA's CPU code, and so the last bits of every float, depends
    on the instruction set: a run repeats bit for bit on one machine, not across them.
    """
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if not key.strip():
                    break  # the first processor is enough
                fields[key.strip()] = value.strip()
    except OSError:
        pass
    flags = fields.get("flags", "").split()
    simd = " ".join(flag for flag in SIMD_FLAGS if flag in flags)
    name = fields.get("model name") or platform.processor() or "unknown"
    return f"{name} ({simd})" if simd else name


def machine() -> dict[str, Any]:
    """Where a figure was measured: platform, CPU model and count, JAX devices, date."""
    devices = jax.devices()
    return {
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": [f"{d.platform}:{d.device_kind}" for d in devices],
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def command_line(argv: list[str] | None) -> str:
    """The exact command that produced a result."""
    args = sys.argv[1:] if argv is None else argv
    return "python -m gnopt.bench " + shlex.join(args)


def write_result(out_dir: str, name: str, figures: dict[str, Any], argv: list[str] | None) -> str:
    """Writes ``out_dir/name.json`` with machine, date, command and ``figures``.

    Atomically (a temporary file, then a rename): a run killed at a time limit
    leaves the last complete record, never a truncated one.
    """
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}.json")
    record = {"machine": machine(), "command": command_line(argv), **figures}
    with open(path + ".tmp", "w") as f:
        json.dump(record, f, indent=1, default=float)
    os.replace(path + ".tmp", path)
    return path


def copy_tree(tree):
    """A copy with fresh buffers (jitted steps donate their inputs)."""
    return jax.tree.map(jnp.copy, tree)


def seconds(fn: Callable[[], Any]) -> float:
    """Wall time of one call of ``fn()``, its outputs awaited."""
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def model_config(name: str, *, dtype: str, seq_len: int, **overrides) -> models.LLaMAConfig:
    """A preset LLaMA config at the benchmark's dtype and sequence length."""
    return models.llama_config(name, compute_dtype=dtype, seq_len=seq_len, **overrides)


def flops_per_token(config: models.LLaMAConfig, params) -> float:
    """``6N + 12·L·d·T`` training FLOPs per token (nanoGPT / PaLM convention).

    ``N`` excludes the input embedding table (a gather, no FLOPs).
    """
    n = models.count_params(params) - config.vocab_size * config.d_model
    return 6.0 * n + 12.0 * config.n_layers * config.d_model * config.seq_len


def peak_flops(override: float | None = None) -> float | None:
    """The device's dense bf16 peak FLOP/s (``None`` where unknown, e.g. CPU)."""
    if override:
        return override
    kind = jax.devices()[0].device_kind
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in kind), None)
