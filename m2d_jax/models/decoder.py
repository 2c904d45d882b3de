"""The one decoder that serves every family: embeddings -> scanned stacks of layers -> norm -> LM head."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from m2d_jax.models.config import ModelConfig, RuntimeConfig
from m2d_jax.models.layers import MLP, Attention, constrain, dtype_of, make_attention_mask, param, rms_norm
from m2d_jax.models.mla import MLAttention
from m2d_jax.models.rope import rope_cos_sin
from m2d_jax.models.splash import SplashMask, attention_kernel
from m2d_jax.models.moe import MoE

RESIDUAL = ("batch", "seq", "embed")  # logical axes of the residual stream [B, T, d]


class DecoderLayer(nnx.Module):
    """Pre-norm block: x + attn(norm(x)), then + ffn(norm(x)); or post-norm (``norm.placement == "post"``, OLMo2):
    x + norm(attn(x)), then + norm(ffn(x)). The FFN is dense or MoE (``kind``)."""

    def __init__(self, config: ModelConfig, runtime: RuntimeConfig, kind: str, rngs: nnx.Rngs):
        dt = dtype_of(runtime.param_dtype)
        self.kind = kind
        self.post_norm = config.norm.placement == "post"
        if not self.post_norm:
            self.input_norm = rms_norm(config.norm, config.hidden_size, dt, rngs)
        self.attn = (MLAttention if config.attention.kind == "mla" else Attention)(config, dt, rngs)
        self.post_attn_norm = rms_norm(config.norm, config.hidden_size, dt, rngs)  # post-norm: on the attention out
        if self.post_norm:
            self.post_ffn_norm = rms_norm(config.norm, config.hidden_size, dt, rngs)
        if kind == "moe":
            self.moe = MoE(config, runtime, rngs)
        else:
            self.mlp = MLP(config.ffn, config.hidden_size, config.ffn.intermediate_size, dt, rngs)

    def __call__(self, x, cos, sin, mask, observe=None, cache=None, cache_index=None, num_experts=None):
        """x: [B, T, d] -> (x', the MoE observation or None), plus the updated attention cache when given one.
        ``num_experts``: this MoE layer's real expert count (per-layer counts; None = all)."""
        x = constrain(x, RESIDUAL)
        h = x if self.post_norm else self.input_norm(x)
        if cache is None:
            attn = self.attn(h, cos, sin, mask)
        else:
            attn, cache = self.attn(h, cos, sin, mask, cache=cache, cache_index=cache_index)
        x = constrain(x + (self.post_attn_norm(attn) if self.post_norm else attn), RESIDUAL)
        h = x if self.post_norm else self.post_attn_norm(x)
        if self.kind == "moe":
            y, observation = self.moe(h, observe, num_experts)
        else:
            y, observation = self.mlp(h), None
        x = constrain(x + (self.post_ffn_norm(y) if self.post_norm else y), RESIDUAL)
        return (x, observation) if cache is None else (x, observation, cache)


def _stacked_layers(config: ModelConfig, runtime: RuntimeConfig, kind: str, num: int, rngs: nnx.Rngs
                    ) -> DecoderLayer:
    """``num`` layers with parameters stacked on a leading ``layers`` axis."""

    @nnx.split_rngs(splits=num)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(r):
        return DecoderLayer(config, runtime, kind, r)

    return make(rngs)


class DecodeCache(NamedTuple):
    """State of incremental decoding (a pytree; see ``CausalLM.init_cache``)."""
    layers: tuple  # per stack of config.stacks: its attention's cache pytree, leaves [layers, B, S, ...]
    mask: jax.Array  # [B, S] int32: 1 where a slot holds a real token (written slots only)
    index: jax.Array  # [] int32: the next slot to write (same for every row; left-pad ragged prompts)


class CausalLM(nnx.Module):
    """Decoder-only causal LM. ``model(input_ids, attention_mask=None) -> logits [batch, seq, vocab]``.

    ``config`` is the architecture (``model.config``), ``runtime`` how it runs (``model.runtime``: dtypes, MoE
    dispatch, remat, expanded top-k'; default ``RuntimeConfig()``). ``m2d_jax.models.with_runtime`` changes the
    runtime of a built model; the architecture of a built model does not change.
    """

    def __init__(self, config: ModelConfig, runtime: RuntimeConfig | None = None, rngs: nnx.Rngs | None = None):
        runtime = runtime if runtime is not None else RuntimeConfig()
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        dt = dtype_of(runtime.param_dtype)
        self.config, self.runtime = config, runtime
        self.embed = param(rngs, (config.vocab_size, config.hidden_size), ("vocab", "embed"), dt)
        self.stacks = nnx.List([_stacked_layers(config, runtime, kind, num, rngs) for kind, _, num in config.stacks])
        self.final_norm = rms_norm(config.norm, config.hidden_size, dt, rngs)
        if not config.tie_word_embeddings:
            self.lm_head = param(rngs, (config.hidden_size, config.vocab_size), ("embed", "vocab"), dt)

    def hidden_states(self, input_ids, attention_mask=None, position_ids=None, observe=None, cache=None):
        """Final-norm hidden states [B, T, d].

        ``attention_mask`` [B, T] is 1 for real tokens (left or right padding); ``position_ids`` default to
        0..T-1 as in transformers. ``observe(view: MoEView) -> pytree`` is called inside every MoE layer of the
        same (jitted, scanned) forward; then ``(hidden, observations)`` is returned, with one entry per stack of
        ``config.stacks`` (None for dense stacks) whose leaves carry a leading layer axis. This is how calibration
        statistics and router losses are computed without a second pass or Python hooks.

        With ``cache`` (a ``DecodeCache``), the T new tokens are written at slots ``cache.index ...`` and attend
        over every cached slot; ``position_ids`` then default to each token's count of earlier real tokens in its
        row (so left-padded prompts get 0-based positions), and ``(hidden, updated cache)`` is returned.
        """
        c = self.config
        cdt = dtype_of(self.runtime.compute_dtype)
        b, t = input_ids.shape
        if attention_mask is None:
            attention_mask = jnp.ones((b, t), jnp.int32)
        if cache is not None:
            if observe is not None:
                raise ValueError("observe and cache cannot be combined")
            key_mask = jax.lax.dynamic_update_slice(cache.mask, attention_mask.astype(jnp.int32),
                                                    (0, cache.index))  # [B, S]
            if position_ids is None:
                earlier = jnp.sum(cache.mask, axis=1, keepdims=True)  # [B, 1] real tokens already cached
                position_ids = jnp.maximum(earlier + jnp.cumsum(attention_mask, axis=1) - 1, 0).astype(jnp.int32)
        if position_ids is None:
            position_ids = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        x = constrain(jnp.take(self.embed[...], input_ids, axis=0).astype(cdt), RESIDUAL)
        cos, sin = (constrain(r, ("batch", "seq", None)) for r in rope_cos_sin(c, position_ids))  # [B, T, rope/2] f32
        layer_windows = [c.attention.sliding_window if lt == "sliding_attention" else 0
                         for lt in c.attention.layer_types]
        windows = jnp.asarray(layer_windows, jnp.int32)  # [L]
        fused = cache is None and attention_kernel(c, self.runtime, t) == "splash"  # m2d_jax.models.splash
        # [L] real routed experts per layer when MoE layers differ in count (the rest of each stack is padding)
        layer_experts = jnp.asarray(c.layer_experts, jnp.int32) if c.is_moe and c.moe.experts.num_experts_per_layer \
            else None
        stack_outputs = []  # per stack: its observations, or its updated cache when decoding
        for i, (stack, (kind, start, num)) in enumerate(zip(self.stacks, c.stacks)):
            graphdef, state = nnx.split(stack)

            def body(h, xs, graphdef=graphdef, stack_windows=tuple(sorted(set(layer_windows[start:start + num])))):
                # one layer's params, sliding window (0 = full), cache, real experts (None: unpadded)
                layer_state, window, layer_cache, num_experts = xs
                layer = nnx.merge(graphdef, layer_state)
                if layer_cache is None:
                    mask = (SplashMask(attention_mask, window, stack_windows) if fused
                            else make_attention_mask(attention_mask, t, window))
                    return layer(h, cos, sin, mask, observe, num_experts=num_experts)
                mask = make_attention_mask(key_mask, t, window, q_start=cache.index)
                h, _, layer_cache = layer(h, cos, sin, mask, cache=layer_cache, cache_index=cache.index,
                                          num_experts=num_experts)
                return h, layer_cache

            if self.runtime.remat:
                body = jax.checkpoint(body, prevent_cse=False)
            stack_cache = None if cache is None else cache.layers[i]
            stack_experts = None if layer_experts is None else layer_experts[start:start + num]
            x, stack_output = jax.lax.scan(body, x, (state, windows[start:start + num], stack_cache, stack_experts))
            stack_outputs.append(stack_output)
        x = constrain(self.final_norm(x), RESIDUAL)
        if cache is not None:
            return x, DecodeCache(tuple(stack_outputs), key_mask, cache.index + t)
        return x if observe is None else (x, stack_outputs)

    def init_cache(self, batch: int, max_len: int) -> DecodeCache:
        """An empty ``DecodeCache`` of ``max_len`` slots (padded prompt + generated tokens) in the compute dtype.

        Each stack's entry is its attention module's ``init_cache(batch, max_len, dtype)`` with a leading layer axis.
        """
        dt = dtype_of(self.runtime.compute_dtype)
        layers = tuple(jax.tree.map(lambda a, n=num: jnp.zeros((n,) + a.shape, a.dtype),
                                    stack.attn.init_cache(batch, max_len, dt))
                       for stack, (_, _, num) in zip(self.stacks, self.config.stacks))
        return DecodeCache(layers, jnp.zeros((batch, max_len), jnp.int32), jnp.zeros((), jnp.int32))

    def logits(self, hidden):
        """LM head on hidden states [..., d] -> logits [..., vocab] (compute dtype)."""
        if self.config.tie_word_embeddings:
            return hidden @ self.embed[...].astype(hidden.dtype).T
        return hidden @ self.lm_head[...].astype(hidden.dtype)

    def __call__(self, input_ids, attention_mask=None, position_ids=None):
        return self.logits(self.hidden_states(input_ids, attention_mask, position_ids))

