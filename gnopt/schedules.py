"""Learning-rate schedules of the GN study (Abreu et al. 2025, §4)."""

from __future__ import annotations

import optax


def inner_cosine(peak: float, num_steps: int, warmup_fraction: float = 0.1,
                 init_fraction: float = 0.1, final_fraction: float = 0.0) -> optax.Schedule:
    """"Constant + inner cosine": the inner schedule, restarted every outer step.

    The inner learning rate warms up linearly from ``init_fraction · peak`` to
    ``peak`` over ``⌈warmup_fraction · N⌉`` steps, then decays by a cosine to
    ``final_fraction · peak`` at step ``N = num_steps``.
    """
    if num_steps < 1:
        raise ValueError(f"inner_cosine: num_steps must be >= 1, got {num_steps}")
    warmup = min(num_steps - 1, max(1, round(warmup_fraction * num_steps))) if num_steps > 1 else 0
    return optax.warmup_cosine_decay_schedule(
        init_value=init_fraction * peak, peak_value=peak, warmup_steps=warmup,
        decay_steps=num_steps, end_value=final_fraction * peak)
