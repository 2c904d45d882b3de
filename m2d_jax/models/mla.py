"""DeepSeek-V2 multi-head latent attention (MLA).

Queries come from a plain projection or a low-rank (``mla.q_lora_rank``) path with an RMSNorm; keys and values come from
one compressed latent [kv_lora_rank] (RMS-normalised, then expanded per head by ``kv_b_proj``) plus a single shared
rotary key part [qk_rope_head_dim]. RoPE acts on interleaved pairs in float32. The softmax scale is
(qk_nope + qk_rope)^-1/2, times YaRN's mscale^2 when configured.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from m2d_jax.models.config import ModelConfig
from m2d_jax.models.layers import Linear, RMSNorm, dot_product_attention, write_cache
from m2d_jax.models.rope import apply_rope_interleaved, softmax_scale

LATENT_NORM_EPS = 1e-6  # transformers builds q_a_layernorm / kv_a_layernorm with the RMSNorm default eps


class MLAttention(nnx.Module):
    def __init__(self, config: ModelConfig, dtype, rngs: nnx.Rngs):
        a, m, dt = config.attention, config.attention.mla, dtype
        self.config = config
        d, h = config.hidden_size, a.num_heads
        qk = m.qk_nope_head_dim + m.qk_rope_head_dim
        if m.q_lora_rank is None:
            self.q_proj = Linear((d,), (h, qk), ("embed",), ("heads", "head_dim"), False, dt, rngs)
        else:
            self.q_a_proj = Linear((d,), (m.q_lora_rank,), ("embed",), ("q_lora",), a.bias, dt, rngs)
            self.q_a_norm = RMSNorm(m.q_lora_rank, LATENT_NORM_EPS, dt, rngs, axis_name="q_lora")
            self.q_b_proj = Linear((m.q_lora_rank,), (h, qk), ("q_lora",), ("heads", "head_dim"), False, dt, rngs)
        self.kv_a_proj = Linear((d,), (m.kv_lora_rank + m.qk_rope_head_dim,), ("embed",), ("kv_lora",), a.bias, dt,
                                rngs)
        self.kv_a_norm = RMSNorm(m.kv_lora_rank, LATENT_NORM_EPS, dt, rngs, axis_name="kv_lora")
        self.kv_b_proj = Linear((m.kv_lora_rank,), (h, m.qk_nope_head_dim + m.v_head_dim), ("kv_lora",),
                                ("heads", "head_dim"), False, dt, rngs)
        self.o_proj = Linear((h, m.v_head_dim), (d,), ("heads", "head_dim"), ("embed",), a.bias, dt, rngs)

    def __call__(self, x, cos, sin, mask, cache=None, cache_index=None):
        """x [B, T, d] -> [B, T, d]; with a ``cache`` (see ``init_cache``) -> (out, updated cache)."""
        m = self.config.attention.mla
        nope, rope = m.qk_nope_head_dim, m.qk_rope_head_dim
        q = self.q_proj(x) if m.q_lora_rank is None else self.q_b_proj(self.q_a_norm(self.q_a_proj(x)))  # [B,T,H,qk]
        compressed = self.kv_a_proj(x)  # [B, T, kv_lora + rope]
        latent = self.kv_a_norm(compressed[..., :m.kv_lora_rank])  # [B, T, kv_lora]
        k_rope = apply_rope_interleaved(compressed[..., None, m.kv_lora_rank:], cos, sin)[:, :, 0]  # [B, T, rope]
        if cache is not None:  # decoding caches the compressed latent and the shared rotary key, as DeepSeek does
            cache = write_cache(cache, cache_index, latent=latent, k_rope=k_rope)
            latent, k_rope = cache["latent"], cache["k_rope"]  # [B, S, ...]
        kv = self.kv_b_proj(latent)  # [B, S, H, nope + v]
        q = jnp.concatenate([q[..., :nope], apply_rope_interleaved(q[..., nope:], cos, sin)], axis=-1)
        k = jnp.concatenate([kv[..., :nope], jnp.broadcast_to(k_rope[:, :, None], kv.shape[:3] + (rope,))], axis=-1)
        out = self.o_proj(dot_product_attention(q, k, kv[..., nope:], mask, softmax_scale(self.config)))  # [B,T,d]
        return out if cache is None else (out, cache)

    def init_cache(self, batch: int, max_len: int, dtype) -> dict:
        """Zeroed per-layer decode cache: {"latent": [batch, max_len, kv_lora_rank], "k_rope": [.., qk_rope]}."""
        m = self.config.attention.mla
        return {"latent": jnp.zeros((batch, max_len, m.kv_lora_rank), dtype),
                "k_rope": jnp.zeros((batch, max_len, m.qk_rope_head_dim), dtype)}
