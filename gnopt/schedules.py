"""Learning-rate schedules of the GN study (Abreu et al. 2025, §4)."""

from __future__ import annotations

import math
import numbers

import optax


def _warmup_steps(warmup_fraction: float, num_steps: int) -> int:
    """``⌈warmup_fraction · N⌉``, at most ``N − 1`` (so 0 when ``N = 1``).

    The product is rounded to 9 decimals before the ceiling, so float error
    does not add a step (``0.07 · 100 = 7.000000000000001`` gives 7, not 8).
    """
    if num_steps <= 1:
        return 0
    return min(num_steps - 1, math.ceil(round(warmup_fraction * num_steps, 9)))


def inner_cosine(peak: float, num_steps: int, warmup_fraction: float = 0.1,
                 init_fraction: float = 0.1, final_fraction: float = 0.0) -> optax.Schedule:
    """"Constant + inner cosine": the inner schedule, restarted every outer step.

    The inner learning rate warms up linearly from ``init_fraction · peak`` to
    ``peak`` over ``⌈warmup_fraction · N⌉`` steps, then decays by a cosine to
    ``final_fraction · peak`` at step ``N = num_steps``: the value at step 0 is
    ``init_fraction · peak`` and ``peak`` is reached at step ``⌈warmup_fraction · N⌉``
    (e.g. 13 for ``N = 122``). The warm-up has at most ``N − 1`` steps, so none
    when ``N = 1``; ``warmup_fraction = 0`` also means none. Without warm-up the
    schedule starts at ``peak``.

    ``peak`` must be finite and ≥ 0 (0 gives an all-zero schedule, e.g. to
    freeze a group); the fractions must lie in ``[0, 1]``.
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, numbers.Integral) or num_steps < 1:
        raise ValueError(f"inner_cosine: num_steps must be an integer >= 1, got {num_steps!r}")
    num_steps = int(num_steps)
    try:
        peak_value = float(peak)
    except TypeError:  # a traced peak (e.g. under inject_hyperparams): not checkable here
        peak_value = 0.0
    if not (math.isfinite(peak_value) and peak_value >= 0):
        raise ValueError(f"inner_cosine: peak must be finite and >= 0, got {peak!r}")
    for name, value in (("warmup_fraction", warmup_fraction), ("init_fraction", init_fraction),
                        ("final_fraction", final_fraction)):
        if not 0 <= value <= 1:  # also rejects NaN
            raise ValueError(f"inner_cosine: {name} must be in [0, 1], got {value!r}")
    return optax.warmup_cosine_decay_schedule(
        init_value=init_fraction * peak, peak_value=peak,
        warmup_steps=_warmup_steps(warmup_fraction, num_steps),
        decay_steps=num_steps, end_value=final_fraction * peak)
