"""Public entry points."""

from __future__ import annotations

from pathlib import Path

from m2d_jax.models import CausalLM


def from_pretrained(path: str | Path, dtype: str = "float32", **config_overrides) -> CausalLM:
    """Load a model from an HF checkpoint directory or an m2d_jax (Orbax) checkpoint.

    ``dtype`` ("float32" | "bfloat16") sets parameter and compute dtype; ``config_overrides`` change runtime fields
    of ``ModelConfig`` (e.g. ``moe_dispatch="dense"``). The result is an ``nnx.Module``:
    ``model(input_ids, attention_mask=None) -> logits [batch, seq, vocab]``; ``model.config`` holds family and sizes.
    """
    from m2d_jax import checkpoint
    from m2d_jax.hf import load_hf

    path = Path(path)
    if checkpoint.is_m2d_checkpoint(path):
        return checkpoint.load_model(path, dtype=dtype, **config_overrides)
    return load_hf(path, dtype=dtype, **config_overrides)
