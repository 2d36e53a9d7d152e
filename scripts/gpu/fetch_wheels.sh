#!/usr/bin/env bash
# Run here (not on the GPU machine): downloads into .whl/ (git-ignored) the wheels that the
# GPU machine's Python 3.12 lacks for gnopt: grain (with array-record and portpicker) and
# gin-config. It already has jax, equinox, optax, orbax-checkpoint, matplotlib and tqdm.
# The versions are those CI tests with.
set -euo pipefail
cd "$(dirname "$0")/../.."
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl grain==0.2.18 array-record==0.8.6 portpicker==1.6.0 gin-config==0.5.0
ls .whl
