"""Shared by the trainer's scale-out and robustness tests: the smallest LLaMA
(vocabulary 64, one layer, d_model 32) on ``.npy`` token shards, driven through
``python -m gnopt.train`` in this process or in a subprocess with simulated devices."""

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np

import gin
from gnopt import train as train_lib
from gnopt.data import stdlib_corpus
from gnopt.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
GIN = ROOT / "gin"
VOCAB = 64
TINY = [
    f"gnopt.models.llama_config.vocab_size = {VOCAB}",
    "gnopt.models.llama_config.d_model = 32",
    "gnopt.models.llama_config.n_layers = 1",
    "gnopt.models.llama_config.n_heads = 4",
    "gnopt.models.llama_config.d_ff = 64",
    "gnopt.models.llama_config.seq_len = 16",
    "train.seq_len = 16",
    "train.batch_size = 16",
    "train.eval_every = 0",
    "train.data = @train/gnopt.data.token_shards",
    "train.val_data = @validation/gnopt.data.token_shards",
    "gnopt.transforms.warmup_cosine.warmup_steps = 1",
    "gnopt.solvers.inner_optimizer.inner_batch_size = 8",
]


def write_shards(folder: Path) -> tuple[Path, Path]:
    """Train and validation ``.npy`` shards: Python source bytes mod 64 (learnable)."""
    folder.mkdir(parents=True, exist_ok=True)
    tokens = (stdlib_corpus(max_bytes=60_000) % VOCAB).astype(np.uint16)
    paths = folder / "train.npy", folder / "val.npy"
    np.save(paths[0], tokens[:50_000])
    np.save(paths[1], tokens[50_000:])
    return paths


def bindings(shards: tuple[Path, Path], *params: str) -> list[str]:
    """gin bindings of the tiny model on ``shards`` (train, validation), then ``params``."""
    return [*TINY, f'train/gnopt.data.token_shards.paths = "{shards[0]}"',
            f'validation/gnopt.data.token_shards.paths = "{shards[1]}"', *params]


def argv(gin_file: str, run_dir: Path, shards: tuple[Path, Path], *params: str) -> list[str]:
    """Command-line arguments of ``python -m gnopt.train`` for the tiny model."""
    args = ["--gin_file", str(GIN / gin_file), "--run_dir", str(run_dir)]
    for binding in bindings(shards, *params):
        args += ["--gin_param", binding]
    return args


def run_here(args: list[str]) -> int:
    """``python -m gnopt.train`` in this process (one device); returns the exit code."""
    gin.clear_config()
    try:
        return train_lib.main(args)
    finally:
        gin.clear_config()


@contextlib.contextmanager
def compilation_cache(path: Path):
    """Runs in this process use (and fill) the persistent compilation cache at ``path``."""
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    saved = {name: getattr(jax.config, name) for name in names}
    for name, value in zip(names, (str(path), 0.0, 0)):
        jax.config.update(name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            jax.config.update(name, value)


def train_here(gin_file: str, run_dir: Path, shards: tuple[Path, Path], *params: str) -> dict:
    """``gnopt.train.train`` in this process, configured like :func:`argv`; its summary."""
    gin.clear_config()
    gin.add_config_file_search_path(str(GIN))
    try:
        gin.parse_config_files_and_bindings([str(GIN / gin_file)], bindings(shards, *params))
        return train_lib.train(str(run_dir))
    finally:
        gin.clear_config()


def env(devices: int = 1, cache: Path | None = None) -> dict[str, str]:
    """Environment of a subprocess with ``devices`` simulated CPU devices."""
    out = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    if cache is not None:  # runs of one config compile the same step: once
        out.update(JAX_COMPILATION_CACHE_DIR=str(cache),
                   JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return out


def start(args: list[str], devices: int = 1, cache: Path | None = None) -> subprocess.Popen:
    """``python -m gnopt.train`` in a subprocess (stdout and stderr piped, text)."""
    return subprocess.Popen([sys.executable, "-m", "gnopt.train", *args], cwd=ROOT,
                            env=env(devices, cache), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def run_python(code: str, *args: str, devices: int) -> dict:
    """Runs ``code`` in a subprocess; returns the JSON of its last stdout line."""
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=env(devices),
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir)]
