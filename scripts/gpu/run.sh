#!/usr/bin/env bash
# The prepared device command of the `gpu` benchmark suite (docs/results.md §5).
#   here, once:  bash scripts/gpu/fetch_wheels.sh
#   device call: command "bash scripts/gpu/run.sh", carry [".whl"], timeout_s 600
# Writes cost_45m.json/.png, steps_45m.json/.png and log.txt to $OUT (default results/gpu):
# copy them into results/gpu/ and the figures into docs/results.md §5. Like every bench run it
# refuses to replace existing result files (exit code 2) unless given --overwrite.
# Each part has its own time limit, so a slow first part cannot starve the second, and
# the steps part rewrites its JSON after each optimizer. Extra arguments go to both parts
# (`bash scripts/gpu/run.sh --smoke` runs the same commands at CI size on a CPU, into a new
# temporary folder $TMPDIR/gnopt-bench-gpu-smoke-XXXXXXXX unless $OUT is set).
# $PYTHON is the interpreter (default python3 from PATH; the tests pass their own).
set -uo pipefail
cd "$(dirname "$0")/../.."
py=${PYTHON:-python3}
smoke=0 overwrite=0
for arg in "$@"; do
  case $arg in --smoke) smoke=1 ;; --overwrite) overwrite=1 ;; esac
done
if [ -n "${OUT:-}" ]; then
  out=$OUT
elif [ $smoke = 1 ]; then
  out=$(mktemp -d "${TMPDIR:-/tmp}/gnopt-bench-gpu-smoke-XXXXXXXX") || exit 1
else
  out=results/gpu
fi
mkdir -p "$out"
log="$out/log.txt"
if [ -e "$log" ] && [ $overwrite = 0 ]; then
  echo "$log exists: pass --overwrite to replace it, or set OUT to a new folder" >&2
  exit 2
fi
if ! "$py" -c "import grain, gin" 2>/dev/null; then  # the GPU machine: install the carried wheels
  compgen -G ".whl/*.whl" >/dev/null || { echo "no .whl/: run scripts/gpu/fetch_wheels.sh here"; exit 1; }
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/gnopt-site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/gnopt-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  "$py" -c "import jax; print('jax', jax.__version__, jax.devices())" 2>&1; } | tee "$log"
status=0
timeout "${COST_LIMIT_S:-240}" "$py" -m gnopt.bench gpu --part cost --out "$out" "$@" 2>&1 \
  | tee -a "$log" || status=1
timeout "${STEPS_LIMIT_S:-320}" "$py" -m gnopt.bench gpu --part steps --out "$out" "$@" 2>&1 \
  | tee -a "$log" || status=1
exit $status
