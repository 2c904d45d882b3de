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


def import_checkpoint(hf_dir: str | Path, out_dir: str | Path, dtype: str = "float32",
                      overwrite: bool = False) -> Path:
    """``m2d import``: stream an HF checkpoint into an m2d_jax (Orbax) checkpoint directory."""
    from m2d_jax import __version__, checkpoint
    from m2d_jax.hf import load_hf

    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    checkpoint.ensure_new_output(out_dir, overwrite=overwrite)  # fail before any work
    model = load_hf(hf_dir, dtype=dtype)
    config_hash = checkpoint.file_sha256(hf_dir / "config.json")
    metadata = {"source": str(hf_dir.absolute()), "source_config_sha256": config_hash, "kind": "imported",
                "m2d_jax_version": __version__}
    return checkpoint.save_model(model, out_dir, metadata, overwrite=overwrite)
