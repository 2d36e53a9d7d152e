"""Training metrics: ``metrics.jsonl`` (one JSON object per logged step).

Every record has ``step`` and whatever the trainer logs (``loss``, ``tokens``,
``wall_s``, ``val_loss``, ``skipped`` (this step was rejected as non-finite),
``nonfinite_skipped`` (rejected steps so far), optimizer diagnostics; scalars
are numbers, array diagnostics such as a per-iteration history are lists). The
file is strict JSON Lines: a NaN or infinite value is written as ``null``.
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


def _finite_or_none(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list):
        return [_finite_or_none(v) for v in value]
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    return value


def to_json_value(value) -> float | int | bool | list | None:
    """An array / numpy / Python value as a plain Python number (or nested list);
    NaN and infinities become ``None`` (JSON ``null``)."""
    return _finite_or_none(value if value is None else np.asarray(value).tolist())


def _json_line(record: dict[str, Any]) -> str:
    return json.dumps({k: to_json_value(v) for k, v in record.items()}, allow_nan=False) + "\n"


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
            f.writelines(_json_line(r) for r in kept)

    def write(self, record: dict[str, Any]) -> None:
        """Appends one record (values converted to Python scalars, non-finite ones to
        ``None``) and flushes."""
        line = _json_line(record)
        with open(self.path, "a") as f:
            f.write(line)


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """All records of a run, in file order (``[]`` if it has none yet); ``null`` values
    are ``None`` (files of older versions may hold ``NaN``, which is read as NaN)."""
    path = os.path.join(run_dir, METRICS_FILE)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def column(records: list[dict[str, Any]], key: str, x: str = "step") -> tuple[list, list]:
    """``(xs, ys)`` of the records that have a finite ``key`` (``null``: left out)."""
    pairs = [(r[x], r[key]) for r in records
             if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)
             and math.isfinite(r[key]) and isinstance(r.get(x), (int, float))]
    return [p[0] for p in pairs], [p[1] for p in pairs]
