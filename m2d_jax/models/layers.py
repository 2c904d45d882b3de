"""Decoder building blocks: parameters with logical axes, activation sharding constraints, RMSNorm, RoPE, attention,
the SwiGLU FFN."""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from m2d_jax.models.config import FFNSpec, ModelConfig, NormSpec
from m2d_jax.models.rope import apply_rope, softmax_scale
from m2d_jax.models.splash import SplashMask, splash_attention

# Logical axis names used on parameters; the distillation mesh rules (m2d_jax.distill.sharding) map these onto
# mesh axes: vocab, embed, heads, kv_heads, head_dim, mlp, exp, layers, and q_lora, kv_lora (MLA latents).
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


# Activation logical axes: batch, seq, embed, heads, kv_heads, head_dim, mlp, vocab, exp. A sharded step installs a
# layout that maps them onto its mesh (``m2d_jax.distill.sharding.activation_sharding``, which owns the rules);
# without one, ``constrain`` and ``map_token_shards`` change nothing, so single-device code, tests and decoding are
# untouched.
_ACTIVATION_LAYOUT: contextvars.ContextVar = contextvars.ContextVar("activation_layout", default=None)


@contextlib.contextmanager
def activation_layout(layout):
    """While active (at trace time), ``constrain`` and ``map_token_shards`` defer to ``layout``: an object with
    ``constrain(x, axes)`` and ``map_token_shards(fn, tokens, shared)``."""
    token = _ACTIVATION_LAYOUT.set(layout)
    try:
        yield
    finally:
        _ACTIVATION_LAYOUT.reset(token)


def constrain(x, axes: tuple[str | None, ...]):
    """``x`` with a sharding constraint from its logical axis names (one per dimension), or ``x`` itself when no
    layout is active. Numerics never change: a constraint only fixes the layout the partitioner keeps."""
    layout = _ACTIVATION_LAYOUT.get()
    if layout is None:
        return x
    if len(axes) != x.ndim:
        raise ValueError(f"activation axes {axes} do not match shape {x.shape}")
    return layout.constrain(x, tuple(axes))


def map_token_shards(fn: Callable, tokens: tuple, shared):
    """``fn(*tokens, shared)``, where every array of ``tokens`` has a leading token axis sharded like the batch and
    ``fn`` treats tokens independently (e.g. an MoE dispatch: sort, group, expert matmuls, unsort). Under a layout
    each batch shard runs ``fn`` on its own tokens with ``shared`` (weights) whole on every device, so no token
    crosses devices; otherwise it is one call."""
    layout = _ACTIVATION_LAYOUT.get()
    return fn(*tokens, shared) if layout is None else layout.map_token_shards(fn, tokens, shared)


def dtype_of(name: str):
    return jnp.dtype(name)


class RMSNorm(nnx.Module):
    """``scale * (x / rms(x))`` normalised in float32. The scale multiplies after the cast back to x's dtype
    (Llama/Qwen/DeepSeek) or before it, in float32 (``weight_in_float32``, GPT-OSS), as transformers does."""

    def __init__(self, dim: int, eps: float, dtype, rngs: nnx.Rngs, axis_name: str = "embed",
                 weight_in_float32: bool = False):
        self.eps = eps
        self.weight_in_float32 = weight_in_float32
        self.scale = param(rngs, (dim,), (axis_name,), dtype, init="ones")

    def __call__(self, x):
        return _rms_norm(x, self.scale[...], self.eps, self.weight_in_float32)


@functools.partial(jax.checkpoint, static_argnums=(2, 3), prevent_cse=False)
def _rms_norm(x, scale, eps: float, weight_in_float32: bool):
    """RMSNorm's arithmetic, rematerialised in the backward pass: it keeps x (and the scale), not the normalised
    intermediates; recomputing them is one elementwise pass."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    if weight_in_float32:
        return (scale.astype(jnp.float32) * normed).astype(x.dtype)
    return scale.astype(x.dtype) * normed.astype(x.dtype)


def rms_norm(norm: NormSpec, dim: int, dtype, rngs: nnx.Rngs, axis_name: str = "embed") -> RMSNorm:
    return RMSNorm(dim, norm.eps, dtype, rngs, axis_name, norm.weight_in_float32)


# ---- attention ---------------------------------------------------------------------------------------------
def make_attention_mask(attention_mask, q_len: int, window, q_start=None):
    """Boolean [batch, 1, 1, q, k] mask: causal, key padding, and a sliding window when ``window`` > 0.

    ``attention_mask`` [batch, k] is 1 for real tokens; ``window`` is a traced int (0 = full attention), so layers
    with different windows share one scanned body. Query i sits at key slot ``q_start + i`` (default: the queries
    are the last ``q_len`` keys); with a KV cache ``q_start`` is the (traced) cache write index.
    """
    k_len = attention_mask.shape[-1]
    q_idx = jnp.arange(q_len)[:, None] + (k_len - q_len if q_start is None else q_start)
    k_idx = jnp.arange(k_len)[None, :]
    allowed = k_idx <= q_idx
    allowed &= (window <= 0) | (q_idx - k_idx < window)
    allowed = allowed[None, None, None] & attention_mask.astype(bool)[:, None, None, None, :]
    return allowed


@jax.custom_jvp
def softmax(x):
    """``jax.nn.softmax(x, axis=-1)`` (the same forward ops) whose derivative is written in terms of its output,
    ``dy = y * (dx - sum(y * dx))``: the backward pass keeps only y, where autodiff through the normalising
    division keeps the exponentials, y and two per-row sums."""
    unnormalized = jnp.exp(x - jnp.max(x, axis=-1, keepdims=True))
    return unnormalized / jnp.sum(unnormalized, axis=-1, keepdims=True)


@softmax.defjvp
def _softmax_jvp(primals, tangents):
    y = softmax(primals[0])
    return y, y * (tangents[0] - jnp.sum(y * tangents[0], axis=-1, keepdims=True))


def dot_product_attention(q, k, v, mask, scale, sinks=None):
    """Grouped-query attention. q: [B, T, H, D]; k, v: [B, S, KV, Dv]; mask [B, 1, 1, T, S] -> [B, T, H, Dv].

    ``sinks`` [H] (GPT-OSS): one extra learned logit per head joins the softmax and is dropped after it.

    Heads are moved in front and each KV head's G query heads are flattened into one [G*T, D] operand, so both
    contractions are plain batched matmuls (measured ~1.8x faster on CPU than a 5-D einsum). The scores stay in that
    [B, KV, G*T, S] layout through the softmax, so the backward pass keeps one copy of the probabilities (the
    softmax's and the second matmul's residual are the same array). The mask enters as an additive bias (0 or
    ``LARGE_NEGATIVE``) built from the boolean mask: it is not differentiated, so the backward pass saves no mask;
    the probabilities are the same as masking with a select (a masked score rounds to exactly ``LARGE_NEGATIVE``).
    """
    b, t, h, d = q.shape
    s, kv, dv = k.shape[1], k.shape[2], v.shape[3]
    g = h // kv
    qh = q.reshape(b, t, kv, g, d).transpose(0, 2, 3, 1, 4).reshape(b, kv, g * t, d)  # [B, KV, G*T, D]
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, KV, S, D]
    bias = jnp.where(mask, 0.0, LARGE_NEGATIVE).astype(jnp.float32)  # [B, 1, 1, T, S]
    bias = jnp.broadcast_to(bias, (b, 1, g, t, s)).reshape(b, 1, g * t, s)  # [B, 1, G*T, S]
    scores = (jnp.einsum("bkqd,bksd->bkqs", qh, kh) * scale).astype(jnp.float32) + bias  # [B, KV, G*T, S]
    if sinks is None:
        probs = softmax(scores)
    else:
        sink = jnp.broadcast_to(sinks.astype(jnp.float32).reshape(1, kv, g, 1, 1), (b, kv, g, t, 1))
        probs = softmax(jnp.concatenate([scores, sink.reshape(b, kv, g * t, 1)], axis=-1))[..., :-1]
    out = jnp.einsum("bkqs,bksd->bkqd", probs.astype(v.dtype), vh).reshape(b, kv, g, t, dv)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, dv)


class Attention(nnx.Module):
    """Grouped-query attention with the family options: per-head or full-projection q/k RMSNorm, q/k/v clipping,
    projection biases, learned sinks, and a per-layer sliding window (through ``mask``)."""

    def __init__(self, config: ModelConfig, dtype, rngs: nnx.Rngs):
        a, d = config.attention, config.hidden_size
        self.config = config
        self.q_proj = Linear((d,), (a.num_heads, a.head_dim), ("embed",), ("heads", "head_dim"), a.bias, dtype, rngs)
        self.k_proj = Linear((d,), (a.num_kv_heads, a.head_dim), ("embed",), ("kv_heads", "head_dim"), a.bias, dtype,
                             rngs)
        self.v_proj = Linear((d,), (a.num_kv_heads, a.head_dim), ("embed",), ("kv_heads", "head_dim"), a.bias, dtype,
                             rngs)
        self.o_proj = Linear((a.num_heads, a.head_dim), (d,), ("heads", "head_dim"), ("embed",), a.bias, dtype, rngs)
        if a.qk_norm == "head":
            self.q_norm = rms_norm(config.norm, a.head_dim, dtype, rngs, axis_name="head_dim")
            self.k_norm = rms_norm(config.norm, a.head_dim, dtype, rngs, axis_name="head_dim")
        elif a.qk_norm == "full":  # over the whole projection, stored flat as [heads * head_dim]
            self.q_norm = rms_norm(config.norm, a.num_heads * a.head_dim, dtype, rngs, axis_name="heads")
            self.k_norm = rms_norm(config.norm, a.num_kv_heads * a.head_dim, dtype, rngs, axis_name="kv_heads")
        if a.sinks:
            self.sinks = param(rngs, (a.num_heads,), ("heads",), dtype)

    def __call__(self, x, cos, sin, mask, cache=None, cache_index=None):
        """x [B, T, d] -> [B, T, d]; with a ``cache`` (see ``init_cache``) -> (out, updated cache). ``mask``: the
        dense [B, 1, 1, T, S] mask (``make_attention_mask``), or a ``SplashMask`` for the fused kernel."""
        a = self.config.attention
        q = constrain(self.q_proj(x), ("batch", "seq", "heads", "head_dim"))  # [B, T, H, D]
        k = constrain(self.k_proj(x), ("batch", "seq", "kv_heads", "head_dim"))  # [B, T, KV, D]
        v = constrain(self.v_proj(x), ("batch", "seq", "kv_heads", "head_dim"))
        if a.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        elif a.qk_norm == "full":
            q = self.q_norm(q.reshape(q.shape[:2] + (-1,))).reshape(q.shape)
            k = self.k_norm(k.reshape(k.shape[:2] + (-1,))).reshape(k.shape)
        if a.clip_qkv is not None:
            q, k, v = (jnp.clip(t, -a.clip_qkv, a.clip_qkv) for t in (q, k, v))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:  # decoding: attend over every cached slot; ``mask`` is built over the cache slots
            cache = write_cache(cache, cache_index, k=k, v=v)
            k, v = cache["k"], cache["v"]  # [B, S, KV, D]
        if isinstance(mask, SplashMask):
            attended = splash_attention(q, k, v, mask.key_mask, mask.window, softmax_scale(self.config), mask.windows)
        else:
            sinks = self.sinks[...] if a.sinks else None
            attended = dot_product_attention(q, k, v, mask, softmax_scale(self.config), sinks)  # [B, T, H, D]
        out = constrain(self.o_proj(attended), ("batch", "seq", "embed"))  # [B, T, d]
        return out if cache is None else (out, cache)

    def init_cache(self, batch: int, max_len: int, dtype) -> dict:
        """Zeroed per-layer decode cache: post-RoPE keys and values, {"k", "v"}: [batch, max_len, kv_heads, D]."""
        shape = (batch, max_len, self.config.attention.num_kv_heads, self.config.attention.head_dim)
        return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def write_cache(cache: dict, index, **new) -> dict:
    """``cache[name][:, index:index + T] = new[name]`` for each entry (arrays [B, S, ...], new [B, T, ...])."""
    out = dict(cache)
    for name, value in new.items():
        start = (0, index) + (0,) * (value.ndim - 2)
        out[name] = jax.lax.dynamic_update_slice(cache[name], value.astype(cache[name].dtype), start)
    return out


@jax.custom_vjp
def dense(x, kernel):
    """``x @ kernel``: x [..., in], kernel [in, out] -> [..., out]. The backward pass computes the kernel's gradient
    as one 2-D matmul over the flattened tokens, [tokens, in]^T @ [tokens, out]: XLA:CPU takes those operands as they
    are, where autodiff's contraction over the token axes (batch, seq) makes it transpose the output's cotangent
    into a copy first (measured 2.5x slower for a [4, 256, 256] @ [256, 512] layer's backward + SiLU)."""
    return jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))


def _dense_fwd(x, kernel):
    return dense(x, kernel), (x, kernel)


def _dense_bwd(residuals, cotangent):
    x, kernel = residuals
    d_x = jax.lax.dot_general(cotangent, kernel, (((cotangent.ndim - 1,), (1,)), ((), ())))  # [..., in]
    d_kernel = x.reshape(-1, x.shape[-1]).T @ cotangent.reshape(-1, cotangent.shape[-1])  # [in, out]
    return d_x, d_kernel


dense.defvjp(_dense_fwd, _dense_bwd)


class Linear(nnx.Module):
    """``y = x @ W (+ b)`` with multi-axis input/output features, e.g. [embed] -> [heads, head_dim]."""

    def __init__(self, in_shape, out_shape, in_axes, out_axes, use_bias, dtype, rngs: nnx.Rngs):
        self.n_in = len(in_shape)
        self.kernel = param(rngs, tuple(in_shape) + tuple(out_shape), tuple(in_axes) + tuple(out_axes), dtype)
        if use_bias:
            self.bias = param(rngs, tuple(out_shape), tuple(out_axes), dtype, init="zeros")

    def __call__(self, x):
        """x [..., *in_shape] -> [..., *out_shape]."""
        kernel = self.kernel[...].astype(x.dtype)
        lead, in_shape, out_shape = x.shape[:x.ndim - self.n_in], kernel.shape[:self.n_in], kernel.shape[self.n_in:]
        n_in = math.prod(in_shape)
        y = dense(x.reshape(lead + (n_in,)), kernel.reshape(n_in, -1)).reshape(lead + out_shape)
        if hasattr(self, "bias"):
            y = y + self.bias[...].astype(x.dtype)
        return y


# ---- feed-forward ------------------------------------------------------------------------------------------
def glu_activation(ffn: FFNSpec):
    """The elementwise gated unit phi(gate, up) of the family's SwiGLU FFNs (acts per neuron pair).

    Rematerialised in the backward pass (``jax.checkpoint``): the backward keeps only gate and up (the matmuls'
    outputs, saved anyway) and recomputes the cheap elementwise rest, instead of saving every intermediate
    (sigmoid, SiLU, clamps) per layer."""
    if ffn.activation == "silu":
        return jax.checkpoint(lambda gate, up: jax.nn.silu(gate) * up, prevent_cse=False)
    if ffn.activation == "clamped_swiglu":  # GPT-OSS
        alpha, limit = ffn.swiglu_alpha, ffn.swiglu_limit

        def clamped(gate, up):
            gate = jnp.minimum(gate, limit)
            up = jnp.clip(up, -limit, limit)
            return (up + 1) * (gate * jax.nn.sigmoid(gate * alpha))

        return jax.checkpoint(clamped, prevent_cse=False)
    raise ValueError(f"unsupported FFN activation {ffn.activation!r}")


class MLP(nnx.Module):
    """Dense SwiGLU FFN of ``width``: down(phi(gate(x), up(x))) (+ biases with ``ffn.bias``)."""

    def __init__(self, ffn: FFNSpec, hidden_size: int, width: int, dtype, rngs: nnx.Rngs):
        self.ffn = ffn
        d, bias = hidden_size, ffn.bias
        self.gate_proj = Linear((d,), (width,), ("embed",), ("mlp",), bias, dtype, rngs)
        self.up_proj = Linear((d,), (width,), ("embed",), ("mlp",), bias, dtype, rngs)
        self.down_proj = Linear((width,), (d,), ("mlp",), ("embed",), bias, dtype, rngs)

    def __call__(self, x):
        """x [B, T, d] or tokens [T, d] -> the same shape."""
        tokens = ("batch", "seq")[:x.ndim - 1]
        hidden = constrain(glu_activation(self.ffn)(self.gate_proj(x), self.up_proj(x)), (*tokens, "mlp"))
        return constrain(self.down_proj(hidden), (*tokens, "embed"))
