"""Benchmarks: ``python -m gnopt.bench <suite> [--smoke] [--out DIR] [--overwrite]``.

Suites (each writes ``results/<suite>/<name>.json`` with the machine, date,
exact command and git commit, plus a PNG; an existing file is replaced only
with ``--overwrite``):

* ``cost``: GGN product / gradient, inner solver step / AdamW step, outer GN
  step / AdamW step per token, peak memory, MFU on GPUs (:mod:`.cost`);
* ``steps-to-target``: Abreu et al. (2025) Fig. 1 at small scale (:mod:`.steps`);
* ``batch-scaling``: steps to target vs batch size with the gradient noise
  scale (:mod:`.scaling`);
* ``gpu``: the first two on the 45m model, sized for one GPU (:mod:`.gpu`);
* ``nls``: Gauss-Newton with Levenberg–Marquardt damping on the 35
  Moré–Garbow–Hillstrom least-squares problems (:mod:`.nls`);
* ``layerwise``: XLA's FLOP count of a layerwise GGN product over a full one at
  the tiny, 45m and 150m shapes (:mod:`.layerwise`).

``--smoke`` runs a suite at CI size on CPU in seconds (the tests do), into a
new temporary folder (``$TMPDIR/gnopt-bench-<suite>-smoke-XXXXXXXX``), never
into ``results/`` unless ``--out`` says so.
"""

from gnopt.bench.cli import SUITES, main

__all__ = ["SUITES", "main"]
