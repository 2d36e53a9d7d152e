"""Training metrics: ``metrics.jsonl`` (one JSON object per logged step).

Every record has ``step`` and whatever the trainer logs (``loss``, ``tokens``,
``wall_s``, ``val_loss``, ``nonfinite_skipped``, optimizer diagnostics; scalars
are numbers, array diagnostics such as a per-iteration history are lists).
Optimizer states expose diagnostics as a NamedTuple field named ``diagnostics``
holding a ``dict[str, scalar]``; :func:`find_diagnostics` collects all of them.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import jax
import numpy as np

METRICS_FILE = "metrics.jsonl"


def _has_diagnostics(node) -> bool:
    return isinstance(node, tuple) and "diagnostics" in getattr(node, "_fields", ())


def find_diagnostics(opt_state: Any) -> dict[str, Any]:
    """Merges every ``diagnostics`` dict found in an optimizer-state tree.

    Nested states (``optax.chain``, ``MultiSteps``, ``inject_hyperparams``)
    are searched; when two states report the same key the later one wins.
    """
    found: dict[str, Any] = {}
    for node in jax.tree.leaves(opt_state, is_leaf=_has_diagnostics):
        if _has_diagnostics(node):
            found.update(node.diagnostics)
    return found


def to_json_value(value) -> float | int | bool | list:
    """An array / numpy / Python value as a plain Python number (or nested list)."""
    return np.asarray(value).tolist()


class MetricsLog:
    """Appends records to ``run_dir/metrics.jsonl``.

    Args:
      run_dir: the run's folder.
      resume_step: drop existing records with ``step > resume_step`` (a run that
        was killed after its last checkpoint logged steps that will be redone).
    """

    def __init__(self, run_dir: str | os.PathLike, *, resume_step: int = 0):
        self.path = os.path.join(run_dir, METRICS_FILE)
        kept = [r for r in read_metrics(run_dir) if r["step"] <= resume_step]
        with open(self.path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)

    def write(self, record: dict[str, Any]) -> None:
        """Appends one record (values converted to Python scalars) and flushes."""
        line = json.dumps({k: to_json_value(v) for k, v in record.items()})
        with open(self.path, "a") as f:
            f.write(line + "\n")


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """All records of a run, in file order (``[]`` if it has none yet)."""
    path = os.path.join(run_dir, METRICS_FILE)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def column(records: list[dict[str, Any]], key: str, x: str = "step") -> tuple[list, list]:
    """``(xs, ys)`` of the records that have a finite ``key``."""
    pairs = [(r[x], r[key]) for r in records
             if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return [p[0] for p in pairs], [p[1] for p in pairs]
