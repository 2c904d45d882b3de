"""The one decoder that serves every family: embeddings -> scanned stacks of layers -> norm -> LM head."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from m2d_jax.models.config import ModelConfig
from m2d_jax.models.layers import MLP, Attention, RMSNorm, dtype_of, make_attention_mask, param, rope_cos_sin
from m2d_jax.models.moe import MoE


class DecoderLayer(nnx.Module):
    """Pre-norm block: x + attn(norm(x)), then + ffn(norm(x)); the FFN is dense or MoE (``kind``)."""

    def __init__(self, config: ModelConfig, kind: str, rngs: nnx.Rngs):
        dt = dtype_of(config.dtype)
        self.kind = kind
        self.input_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dt, rngs)
        self.attn = Attention(config, rngs)
        self.post_attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dt, rngs)
        if kind == "moe":
            self.moe = MoE(config, rngs)
        else:
            self.mlp = MLP(config, config.intermediate_size, rngs)

    def __call__(self, x, cos, sin, mask, observe=None):
        """x: [B, T, d] -> (x', the MoE observation or None)."""
        x = x + self.attn(self.input_norm(x), cos, sin, mask)
        h = self.post_attn_norm(x)
        if self.kind == "moe":
            y, observation = self.moe(h, observe)
            return x + y, observation
        return x + self.mlp(h), None


def _stacked_layers(config: ModelConfig, kind: str, num: int, rngs: nnx.Rngs) -> DecoderLayer:
    """``num`` layers with parameters stacked on a leading ``layers`` axis."""

    @nnx.split_rngs(splits=num)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(r):
        return DecoderLayer(config, kind, r)

    return make(rngs)


class CausalLM(nnx.Module):
    """Decoder-only causal LM. ``model(input_ids, attention_mask=None) -> logits [batch, seq, vocab]``."""

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        dt = dtype_of(config.dtype)
        self.config = config
        self.embed = param(rngs, (config.vocab_size, config.hidden_size), ("vocab", "embed"), dt)
        self.stacks = nnx.List([_stacked_layers(config, kind, num, rngs) for kind, _, num in config.stacks])
        self.final_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dt, rngs)
        if not config.tie_word_embeddings:
            self.lm_head = param(rngs, (config.hidden_size, config.vocab_size), ("embed", "vocab"), dt)

    def hidden_states(self, input_ids, attention_mask=None, position_ids=None, observe=None):
        """Final-norm hidden states [B, T, d].

        ``attention_mask`` [B, T] is 1 for real tokens (left or right padding); ``position_ids`` default to
        0..T-1 as in transformers. ``observe(view: MoEView) -> pytree`` is called inside every MoE layer of the
        same (jitted, scanned) forward; then ``(hidden, observations)`` is returned, with one entry per stack of
        ``config.stacks`` (None for dense stacks) whose leaves carry a leading layer axis. This is how calibration
        statistics and router losses are computed without a second pass or Python hooks.
        """
        c = self.config
        cdt = dtype_of(c.compute_dtype)
        b, t = input_ids.shape
        if attention_mask is None:
            attention_mask = jnp.ones((b, t), jnp.int32)
        if position_ids is None:
            position_ids = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        x = jnp.take(self.embed[...], input_ids, axis=0).astype(cdt)
        cos, sin = rope_cos_sin(c, position_ids, cdt)
        windows = jnp.asarray([c.sliding_window if lt == "sliding_attention" else 0 for lt in c.layer_types],
                              jnp.int32)  # [L]
        observations = []
        for stack, (kind, start, num) in zip(self.stacks, c.stacks):
            graphdef, state = nnx.split(stack)

            def body(h, xs, graphdef=graphdef):
                layer_state, window = xs  # one layer's params; its sliding window (0 = full attention)
                mask = make_attention_mask(attention_mask, t, window)
                return nnx.merge(graphdef, layer_state)(h, cos, sin, mask, observe)

            if c.remat:
                body = jax.checkpoint(body, prevent_cse=False)
            x, observation = jax.lax.scan(body, x, (state, windows[start:start + num]))
            observations.append(observation)
        x = self.final_norm(x)
        return x if observe is None else (x, observations)

    def logits(self, hidden):
        """LM head on hidden states [..., d] -> logits [..., vocab] (compute dtype)."""
        if self.config.tie_word_embeddings:
            return hidden @ self.embed[...].astype(hidden.dtype).T
        return hidden @ self.lm_head[...].astype(hidden.dtype)

    def __call__(self, input_ids, attention_mask=None, position_ids=None):
        return self.logits(self.hidden_states(input_ids, attention_mask, position_ids))

