"""Shared pieces of the benchmarks: machine record, timing, models, result files."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import json
import os
import platform
import shlex
import subprocess
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


def git_revision() -> dict[str, Any]:
    """The commit of the git checkout that holds this ``gnopt``: ``{"commit", "dirty"}``.

    ``commit`` is ``git rev-parse HEAD``; ``dirty`` is true when tracked files
    other than ``results/`` differ from it (the benchmarks' own result files do
    not count). ``{}`` where gnopt is not a git checkout (an installed wheel) or
    git is missing.
    """
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", root, *args], capture_output=True, text=True,
                              timeout=60, check=True).stdout.strip()

    try:
        if os.path.realpath(git("rev-parse", "--show-toplevel")) != os.path.realpath(root):
            return {}  # gnopt installed inside some other repository
        commit = git("rev-parse", "HEAD")
        changes = git("status", "--porcelain", "--untracked-files=no", "--", ".",
                      ":(exclude)results")
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"commit": commit, "dirty": bool(changes)}


@dataclasses.dataclass
class OutputRule:
    """Which result files a run may write (see :func:`output_rule`)."""

    overwrite: bool = False
    written: set[str] = dataclasses.field(default_factory=set)
    revision: dict[str, Any] | None = None  # git_revision() at the start of the run


_rule = OutputRule()


@contextlib.contextmanager
def output_rule(overwrite: bool = False):
    """One run's rule for result files: never replace an existing file, unless
    ``overwrite`` (``--overwrite``) or this run wrote it itself (a suite that
    rewrites its JSON after each optimizer). Also fixes the run's git revision
    at its start."""
    global _rule
    saved, _rule = _rule, OutputRule(overwrite, revision=git_revision())
    try:
        yield _rule
    finally:
        _rule = saved


def check_new(path: str) -> None:
    """Raises ``ValueError`` if ``path`` exists and the run may not replace it."""
    if (os.path.exists(path) and not _rule.overwrite
            and os.path.abspath(path) not in _rule.written):
        raise ValueError(f"{path} exists: pass --overwrite to replace it, or --out / --name "
                         f"to write a new file")


def write_result(out_dir: str, name: str, figures: dict[str, Any], argv: list[str] | None) -> str:
    """Writes ``out_dir/name.json`` with machine, date, command, git commit and ``figures``.

    Refuses (``ValueError``) to replace a file that this run did not write,
    unless the run allows it (:func:`output_rule`). Atomically (a temporary
    file, then a rename): a run killed at a time limit leaves the last complete
    record, never a truncated one.
    """
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}.json")
    check_new(path)
    revision = git_revision() if _rule.revision is None else _rule.revision
    record = {"machine": machine(), "command": command_line(argv), **revision, **figures}
    with open(path + ".tmp", "w") as f:
        json.dump(record, f, indent=1, default=float)
    os.replace(path + ".tmp", path)
    _rule.written.add(os.path.abspath(path))
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
