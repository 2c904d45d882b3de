"""Rotary position embeddings: default and YaRN frequencies, rotate-half and interleaved-pair application.

Frequencies are computed in float32 exactly as transformers' ``modeling_rope_utils`` does, so positions far beyond
the original context (where float32 angle rounding matters) agree with the reference.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from m2d_jax.models.config import ModelConfig


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_inv_freq(config: ModelConfig) -> tuple[np.ndarray, float]:
    """Inverse frequencies [rope_dim // 2] (float32) and the cos/sin scaling ("attention factor")."""
    dim, base, p = config.rope_dim, config.rope.theta, config.rope.param
    exponent = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    pos_freqs = np.power(np.float32(base), exponent).astype(np.float32)  # [dim/2]
    if config.rope.type == "default":
        return (np.float32(1.0) / pos_freqs).astype(np.float32), 1.0
    original = p["original_max_position_embeddings"]
    factor = p.get("factor") or config.max_position_embeddings / original
    attention_factor = p.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = p.get("mscale"), p.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = _yarn_mscale(factor)
    beta_fast, beta_slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1

    def correction_dim(rotations):
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
    extrapolation = (np.float32(1) - ramp).astype(np.float32)
    inv_freq = (np.float32(1.0) / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq.astype(np.float32), float(attention_factor)


def softmax_scale(config: ModelConfig) -> float:
    """Attention logit scale: head_dim^-1/2, times mscale^2 for MLA with YaRN ``mscale_all_dim`` (DeepSeek)."""
    scale = config.attention.head_dim ** -0.5
    p = config.rope.param
    if config.attention.kind == "mla" and config.rope.type != "default" and p.get("mscale_all_dim"):
        m = _yarn_mscale(p["factor"], p["mscale_all_dim"])
        scale *= m * m
    return scale


def rope_cos_sin(config: ModelConfig, position_ids):
    """cos, sin: [batch, seq, rope_dim // 2] in float32 (already multiplied by the attention factor)."""
    inv_freq, scaling = rope_inv_freq(config)
    freqs = position_ids.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B, T, dim/2]
    return jnp.cos(freqs) * scaling, jnp.sin(freqs) * scaling


def apply_rope(x, cos, sin):
    """Rotate-half RoPE in x's dtype. x: [batch, seq, heads, dim]; cos/sin: [batch, seq, dim/2]."""
    cos = jnp.concatenate([cos, cos], axis=-1).astype(x.dtype)[:, :, None, :]
    sin = jnp.concatenate([sin, sin], axis=-1).astype(x.dtype)[:, :, None, :]
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def apply_rope_interleaved(x, cos, sin):
    """Complex-pair RoPE on (x[2i], x[2i+1]) computed in float32 (DeepSeek MLA). x: [B, T, H, dim]."""
    pairs = x.astype(jnp.float32).reshape(x.shape[:-1] + (-1, 2))
    re, im = pairs[..., 0], pairs[..., 1]
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    return jnp.stack([re * c - im * s, re * s + im * c], axis=-1).reshape(x.shape).astype(x.dtype)
