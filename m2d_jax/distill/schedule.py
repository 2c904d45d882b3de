"""Warmup-stable-decay learning-rate schedule with the semantics of transformers' ``get_wsd_schedule``.

Warm-up rises linearly from ``min_lr_ratio * lr`` to ``lr`` over ``warmup_steps``, the rate stays at ``lr`` until
``decay_steps`` before the end, then decays to ``min_lr_ratio * lr`` (cosine by default, "linear" or "1-sqrt"), and
stays there. docs/METHOD.md §11 / §13 open question 19: warm-up 100, decay 300, cosine to min_lr_ratio 0.1.
"""

from __future__ import annotations

import jax.numpy as jnp
import optax

DECAY_TYPES = ("cosine", "linear", "1-sqrt")


def wsd_schedule(learning_rate: float, total_steps: int, warmup_steps: int, decay_steps: int,
                 min_lr_ratio: float = 0.0, decay_type: str = "cosine") -> optax.Schedule:
    """``step -> learning rate`` (jit-friendly). The stable phase lasts total - warmup - decay steps."""
    if decay_type not in DECAY_TYPES:
        raise ValueError(f"config.schedule.decay_type={decay_type!r}: expected one of {DECAY_TYPES}")
    if min(warmup_steps, decay_steps) < 0 or warmup_steps + decay_steps > total_steps:
        raise ValueError(f"config.schedule: warmup_steps={warmup_steps} + decay_steps={decay_steps} must be >= 0 and "
                         f"<= steps={total_steps}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"config.schedule.min_lr_ratio={min_lr_ratio} must be in [0, 1]")
    stable_end = total_steps - decay_steps

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = step / max(1, warmup_steps)
        progress = jnp.clip((step - stable_end) / max(1, decay_steps), 0.0, 1.0)
        if decay_type == "cosine":
            decay = 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        elif decay_type == "linear":
            decay = 1.0 - progress
        else:
            decay = 1.0 - jnp.sqrt(progress)
        factor = jnp.where(step < warmup_steps, warm, jnp.where(step < stable_end, 1.0, decay))
        factor = jnp.where(step < total_steps, factor * (1.0 - min_lr_ratio) + min_lr_ratio, min_lr_ratio)
        factor = jnp.where((step >= warmup_steps) & (step < stable_end), 1.0, factor)
        return learning_rate * jnp.maximum(factor, 0.0)

    return schedule
