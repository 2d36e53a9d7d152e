"""Issue 18 item 4: after a plain (non-editable) install from a wheel, ``python -m gnopt.train
--gin_file quickstart.gin`` and a bare ``python -m gnopt.train`` work from any folder: the
experiments in the repository's ``gin/`` ship as ``gnopt/gin``.

Offline: the wheel is built with the installed setuptools (``--no-build-isolation``) from a
copy of the sources, and installed with ``--no-deps`` into a fresh virtual environment that
sees this interpreter's packages (``--system-site-packages``) for the dependencies.
"""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("gnopt", "gin", "pyproject.toml", "setup.py", "README.md")
# The quickstart, shrunk so that one step compiles in seconds.
SMALL = ["NUM_STEPS = 1", "gnopt.models.llama_config.d_model = 16",
         "gnopt.models.llama_config.n_layers = 1", "gnopt.models.llama_config.n_heads = 2",
         "gnopt.models.llama_config.d_ff = 32", "gnopt.data.stdlib_corpus.max_bytes = 200_000",
         "train.seq_len = 32", "train.batch_size = 16", "train.eval_batches = 1"]


def _run(args, **kwargs):
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300, **kwargs)
    assert proc.returncode == 0, (args, proc.stdout[-2000:], proc.stderr[-3000:])
    return proc


@pytest.mark.slow
def test_wheel_installs_the_experiments_and_runs_from_any_folder(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy(ROOT / name, source / name)
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
          "--no-index", "-q", "-w", str(dist), str(source)])
    (wheel,) = dist.glob("gnopt-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "gnopt/gin/quickstart.gin" in names and "gnopt/gin/base/tiny_gn.gin" in names
    assert "gnopt/gin/steps/pi_muon_interpolate.gin" in names and "gnopt/gin/base/steps.gin" in names

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)])
    python = str(venv / "bin" / "python")
    _run([python, "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    env.pop("PYTHONPATH", None)
    help_text = " ".join(_run([python, "-m", "gnopt.train", "--help"], cwd=elsewhere,
                              env=env).stdout.split())
    assert f"gnopt's experiments ({venv}/lib/" in help_text, help_text
    assert "train.tensorboard = True" in help_text

    params = [arg for p in SMALL for arg in ("--gin_param", p)]
    # --gin_file by its bare name, resolved in the installed gnopt/gin
    proc = _run([python, "-m", "gnopt.train", "--gin_file", "quickstart.gin", "--print_config"],
                cwd=elsewhere, env=env)
    assert "gauss_newton.curvature = @gnopt.curvature.layerwise()" in proc.stdout
    # No --gin_file at all: the quickstart (layerwise GN), here one dry step of it.
    proc = _run([python, "-m", "gnopt.train", "--dry_run", *params], cwd=elsewhere, env=env)
    assert proc.stdout.strip().splitlines()[-1].startswith("step 1: loss"), proc.stdout
    proc = _run([python, "-m", "gnopt.train", "--print_config"], cwd=elsewhere, env=env)
    assert "gauss_newton.curvature = @gnopt.curvature.layerwise()" in proc.stdout
