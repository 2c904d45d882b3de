"""Decoder building blocks: parameters with logical axes, RMSNorm, RoPE, attention, the SwiGLU FFN."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from m2d_jax.models.config import ModelConfig

# Logical axis names used on parameters; the distillation mesh rules map these onto mesh axes.
#   vocab, embed, heads, kv_heads, head_dim, mlp, exp, layers
LARGE_NEGATIVE = -1e30  # finite mask value: fully masked (padding) rows stay NaN-free


def param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str, ...], dtype, init: str = "normal",
          std: float = 0.02) -> nnx.Param:
    """An ``nnx.Param`` carrying its logical axis names (``out_sharding`` metadata, applied by the mesh rules)."""
    if len(axes) != len(shape):
        raise ValueError(f"axes {axes} do not match shape {shape}")
    if init == "normal":
        value = std * jax.random.normal(rngs.params(), shape, dtype)
    elif init == "ones":
        value = jnp.ones(shape, dtype)
    elif init == "zeros":
        value = jnp.zeros(shape, dtype)
    else:
        raise ValueError(f"unknown init {init!r}")
    return nnx.Param(value, out_sharding=axes, eager_sharding=False)


def dtype_of(name: str):
    return jnp.dtype(name)


class RMSNorm(nnx.Module):
    """``scale * (x / rms(x))`` normalised in float32 and cast back before the scale (as transformers does)."""

    def __init__(self, dim: int, eps: float, dtype, rngs: nnx.Rngs, axis_name: str = "embed"):
        self.eps = eps
        self.scale = param(rngs, (dim,), (axis_name,), dtype, init="ones")

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(x.dtype) * normed.astype(x.dtype)


# ---- rotary position embedding ------------------------------------------------------------------------------
SUPPORTED_ROPE_TYPES = ("default",)


def rope_inv_freq(config: ModelConfig) -> tuple[np.ndarray, float]:
    """Inverse frequencies [head_dim // 2] (float32, computed as transformers does) and the cos/sin scaling."""
    if config.rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"unsupported rope type {config.rope_type!r} (supported: {SUPPORTED_ROPE_TYPES})")
    dim = config.head_dim
    exponent = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    inv_freq = (np.float32(1.0) / np.power(np.float32(config.rope_theta), exponent)).astype(np.float32)
    return inv_freq, 1.0


def rope_cos_sin(config: ModelConfig, position_ids, dtype):
    """cos, sin: [batch, seq, head_dim] for ``position_ids`` [batch, seq] (angles in float32)."""
    inv_freq, scaling = rope_inv_freq(config)
    freqs = position_ids.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B, T, hd/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)  # [B, T, hd]
    return (jnp.cos(emb) * scaling).astype(dtype), (jnp.sin(emb) * scaling).astype(dtype)


def apply_rope(x, cos, sin):
    """Rotate-half RoPE. x: [batch, seq, heads, head_dim]; cos/sin: [batch, seq, head_dim]."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


# ---- attention ---------------------------------------------------------------------------------------------
def make_attention_mask(attention_mask, q_len: int, window):
    """Boolean [batch, 1, 1, q, k] mask: causal, key padding, and a sliding window when ``window`` > 0.

    ``attention_mask`` [batch, k] is 1 for real tokens; ``window`` is a traced int (0 = full attention), so layers
    with different windows share one scanned body.
    """
    k_len = attention_mask.shape[-1]
    q_idx = jnp.arange(q_len)[:, None] + (k_len - q_len)
    k_idx = jnp.arange(k_len)[None, :]
    allowed = k_idx <= q_idx
    allowed &= (window <= 0) | (q_idx - k_idx < window)
    allowed = allowed[None, None, None] & attention_mask.astype(bool)[:, None, None, None, :]
    return allowed


def dot_product_attention(q, k, v, mask, scale):
    """Grouped-query attention. q: [B, T, H, D]; k, v: [B, S, KV, D]; mask [B, 1, 1, T, S] -> [B, T, H, D].

    Heads are moved in front and each KV head's G query heads are flattened into one [G*T, D] operand, so both
    contractions are plain batched matmuls (measured ~1.8x faster on CPU than a 5-D einsum).
    """
    b, t, h, d = q.shape
    s, kv = k.shape[1], k.shape[2]
    g = h // kv
    qh = q.reshape(b, t, kv, g, d).transpose(0, 2, 3, 1, 4).reshape(b, kv, g * t, d)  # [B, KV, G*T, D]
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, KV, S, D]
    scores = jnp.einsum("bkqd,bksd->bkqs", qh, kh).reshape(b, kv, g, t, s) * scale  # [B, KV, G, T, S]
    scores = jnp.where(mask, scores.astype(jnp.float32), LARGE_NEGATIVE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype).reshape(b, kv, g * t, s)
    out = jnp.einsum("bkqs,bksd->bkqd", probs, vh).reshape(b, kv, g, t, d)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


class Attention(nnx.Module):
    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        c, dt = config, dtype_of(config.dtype)
        self.config = config
        self.q_proj = Linear((c.hidden_size,), (c.num_heads, c.head_dim), ("embed",), ("heads", "head_dim"),
                             c.attention_bias, dt, rngs)
        self.k_proj = Linear((c.hidden_size,), (c.num_kv_heads, c.head_dim), ("embed",), ("kv_heads", "head_dim"),
                             c.attention_bias, dt, rngs)
        self.v_proj = Linear((c.hidden_size,), (c.num_kv_heads, c.head_dim), ("embed",), ("kv_heads", "head_dim"),
                             c.attention_bias, dt, rngs)
        self.o_proj = Linear((c.num_heads, c.head_dim), (c.hidden_size,), ("heads", "head_dim"), ("embed",),
                             c.attention_bias, dt, rngs)
        if c.qk_norm == "head":
            self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps, dt, rngs, axis_name="head_dim")
            self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps, dt, rngs, axis_name="head_dim")

    def __call__(self, x, cos, sin, mask):
        c = self.config
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)  # [B, T, H|KV, D]
        if c.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = dot_product_attention(q, k, v, mask, 1.0 / math.sqrt(c.head_dim))
        return self.o_proj(out)


class Linear(nnx.Module):
    """``y = x @ W (+ b)`` with multi-axis input/output features, e.g. [embed] -> [heads, head_dim]."""

    def __init__(self, in_shape, out_shape, in_axes, out_axes, use_bias, dtype, rngs: nnx.Rngs):
        self.n_in = len(in_shape)
        self.kernel = param(rngs, tuple(in_shape) + tuple(out_shape), tuple(in_axes) + tuple(out_axes), dtype)
        if use_bias:
            self.bias = param(rngs, tuple(out_shape), tuple(out_axes), dtype, init="zeros")

    def __call__(self, x):
        kernel = self.kernel[...].astype(x.dtype)
        y = jax.lax.dot_general(x, kernel, (
            (tuple(range(x.ndim - self.n_in, x.ndim)), tuple(range(self.n_in))), ((), ())))
        if hasattr(self, "bias"):
            y = y + self.bias[...].astype(x.dtype)
        return y


# ---- feed-forward ------------------------------------------------------------------------------------------
def glu_activation(name: str):
    """The elementwise gated unit phi(gate, up) of a SwiGLU-family FFN."""
    if name == "silu":
        return lambda gate, up: jax.nn.silu(gate) * up
    raise ValueError(f"unsupported hidden_act {name!r} (supported: 'silu')")


class MLP(nnx.Module):
    """Dense SwiGLU FFN: down(phi(gate(x), up(x)))."""

    def __init__(self, config: ModelConfig, width: int, rngs: nnx.Rngs):
        dt = dtype_of(config.dtype)
        self.act = config.hidden_act
        d = config.hidden_size
        self.gate_proj = Linear((d,), (width,), ("embed",), ("mlp",), False, dt, rngs)
        self.up_proj = Linear((d,), (width,), ("embed",), ("mlp",), False, dt, rngs)
        self.down_proj = Linear((width,), (d,), ("mlp",), ("embed",), False, dt, rngs)

    def __call__(self, x):
        return self.down_proj(glu_activation(self.act)(self.gate_proj(x), self.up_proj(x)))
