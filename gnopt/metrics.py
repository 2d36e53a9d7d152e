"""Training metrics: ``metrics.jsonl`` (one JSON object per logged step).

Every record has ``step`` and whatever the trainer logs (``loss``, ``tokens``,
``wall_s``, ``val_loss``, ``tokens_per_s`` (since the previous record; not on
the first, compiling, step), ``skipped`` (this step was rejected as non-finite),
``nonfinite_skipped`` (rejected steps so far), optimizer diagnostics; scalars
are numbers, array diagnostics such as a per-iteration history are lists). The
file is strict JSON Lines: a NaN or infinite value is written as ``null``.
Optimizer states expose diagnostics as a NamedTuple field named ``diagnostics``
holding a ``dict[str, scalar]``; :func:`find_diagnostics` collects all of them.

Beside ``metrics.jsonl``, :class:`MetricsLog` writes TensorBoard event files
(``events.out.tfevents.*``, with tensorboardX: no TensorFlow needed): every
finite scalar of a record is a TensorBoard scalar of the same name at the
record's ``step`` (booleans as 0/1; lists and ``null`` values are left out).
View them with ``tensorboard --logdir runs`` (``pip install tensorboard``).
A resumed run purges the events of the steps it redoes (TensorBoard's
``purge_step``), as it drops their ``metrics.jsonl`` records.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import jax
import numpy as np

METRICS_FILE = "metrics.jsonl"
EVENTS_PREFIX = "events.out.tfevents"
"""TensorBoard event files of a run start with this."""


def _has_diagnostics(node) -> bool:
    return isinstance(node, tuple) and "diagnostics" in getattr(node, "_fields", ())


def find_diagnostics(opt_state: Any) -> dict[str, Any]:
    """Merges every ``diagnostics`` dict found in an optimizer-state tree.

    Nested states (``optax.chain``, ``MultiSteps``, ``inject_hyperparams``,
    :func:`gnopt.accept_step` around its inner chain) are searched, inner
    states before the state that holds them; when two states report the same
    key the later one wins.
    """
    found: dict[str, Any] = {}
    for node in jax.tree.leaves(opt_state, is_leaf=_has_diagnostics):
        if _has_diagnostics(node):
            found.update(find_diagnostics([v for k, v in node._asdict().items()
                                           if k != "diagnostics"]))
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
    """Appends records to ``run_dir/metrics.jsonl`` and, by default, to TensorBoard event
    files in ``run_dir``.

    Args:
      run_dir: the run's folder.
      resume_step: drop existing records with ``step > resume_step`` (a run that
        was killed after its last checkpoint logged steps that will be redone);
        TensorBoard hides their events likewise.
      tensorboard: also write TensorBoard event files.
    """

    def __init__(self, run_dir: str | os.PathLike, *, resume_step: int = 0,
                 tensorboard: bool = True):
        self.path = os.path.join(run_dir, METRICS_FILE)
        kept = [r for r in read_metrics(run_dir) if r["step"] <= resume_step]
        with open(self.path, "w") as f:
            f.writelines(_json_line(r) for r in kept)
        self._events = None
        if tensorboard:
            from tensorboardX import SummaryWriter  # imported here: ~0.3 s

            self._events = SummaryWriter(logdir=os.fspath(run_dir),
                                         purge_step=resume_step + 1 if resume_step else None,
                                         flush_secs=30)

    def write(self, record: dict[str, Any]) -> None:
        """Appends one record (values converted to Python scalars, non-finite ones to
        ``None``) and flushes; its finite scalars go to TensorBoard at ``record["step"]``."""
        line = _json_line(record)
        with open(self.path, "a") as f:
            f.write(line)
        if self._events is not None:
            step = int(record["step"])
            for key, value in tensorboard_scalars(record).items():
                self._events.add_scalar(key, value, global_step=step)
            self._events.flush()

    def text(self, tag: str, text: str, step: int = 0) -> None:
        """A text entry in TensorBoard (shown as preformatted text), e.g. the config."""
        if self._events is not None:
            self._events.add_text(tag, "\n".join("    " + line for line in text.splitlines()),
                                  global_step=step)
            self._events.flush()

    def close(self) -> None:
        """Flushes and closes the event files (the JSON lines need nothing)."""
        if self._events is not None:
            self._events.close()
            self._events = None


def tensorboard_scalars(record: dict[str, Any]) -> dict[str, float]:
    """The finite scalar values of a record, but ``step``, as floats (booleans as 0/1)."""
    out = {}
    for key, value in record.items():
        if key == "step" or value is None:
            continue
        array = np.asarray(value)
        if array.ndim != 0 or not (np.issubdtype(array.dtype, np.number)
                                   or array.dtype == np.bool_):
            continue
        number = float(array)
        if math.isfinite(number):
            out[key] = number
    return out


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
