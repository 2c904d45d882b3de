"""Public entry points."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from m2d_jax.models import CausalLM, RuntimeConfig


def from_pretrained(path: str | Path, *, dtype: str | None = None, progress: bool = True,
                    sharding: Callable | None = None, runtime: RuntimeConfig | None = None,
                    **runtime_fields) -> CausalLM:
    """Load a model from an HF checkpoint directory or an m2d_jax (Orbax) checkpoint; every flag means the same
    for both.

    ``dtype`` ("float32" | "bfloat16") sets parameter and compute dtype (default: as saved for an m2d_jax
    checkpoint, float32 for an HF import). How the model runs is a ``RuntimeConfig``: pass ``runtime=`` or its
    fields as keywords (``moe_dispatch="dense"``, ``remat=True``, ``top_k=4`` for expanded routing...); the
    architecture is what the checkpoint says and cannot be overridden. ``sharding(path, abstract) -> Sharding``
    places each parameter leaf (e.g. onto a mesh); ``progress`` shows a progress bar. The result is an
    ``nnx.Module``: ``model(input_ids, attention_mask=None) -> logits [batch, seq, vocab]``; ``model.config`` is
    the architecture (family, sizes, attention/MoE specs), ``model.runtime`` the runtime.
    """
    from m2d_jax import checkpoint
    from m2d_jax.hf import load_hf

    path = Path(path)
    load = checkpoint.load_model if checkpoint.is_m2d_checkpoint(path) else load_hf
    return load(path, dtype=dtype, progress=progress, sharding=sharding, runtime=runtime, **runtime_fields)
