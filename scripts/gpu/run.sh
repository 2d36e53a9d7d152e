#!/usr/bin/env bash
# The prepared device command of the `gpu` benchmark suite (docs/results.md §5).
#   here, once:  bash scripts/gpu/fetch_wheels.sh
#   device call: command "bash scripts/gpu/run.sh", carry [".whl"], timeout_s 600
# Writes cost_45m.json/.png, steps_45m.json/.png and log.txt to $OUT (default results/gpu):
# copy them into results/gpu/ and the figures into docs/results.md §5.
# Each part has its own time limit, so a slow first part cannot starve the second, and
# the steps part rewrites its JSON after each optimizer. Extra arguments go to both parts
# (`bash scripts/gpu/run.sh --smoke` runs the same commands at CI size on a CPU).
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-results/gpu}
mkdir -p "$out"
if ! python3 -c "import grain, gin" 2>/dev/null; then  # the GPU machine: install the carried wheels
  compgen -G ".whl/*.whl" >/dev/null || { echo "no .whl/: run scripts/gpu/fetch_wheels.sh here"; exit 1; }
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/gnopt-site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/gnopt-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
log="$out/log.txt"
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  python3 -c "import jax; print('jax', jax.__version__, jax.devices())" 2>&1; } | tee "$log"
status=0
timeout "${COST_LIMIT_S:-240}" python3 -m gnopt.bench gpu --part cost --out "$out" "$@" 2>&1 \
  | tee -a "$log" || status=1
timeout "${STEPS_LIMIT_S:-320}" python3 -m gnopt.bench gpu --part steps --out "$out" "$@" 2>&1 \
  | tee -a "$log" || status=1
exit $status
