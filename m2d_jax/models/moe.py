"""Mixture-of-Experts: routing rules and exact, pluggable expert dispatch.

Every dispatch strategy computes, for each (token, slot) assignment, the *unweighted* output of the chosen expert,
``expert_out[t, j] = f_{idx[t, j]}(x_t)`` [tokens, k, embed]; the block output is ``sum_j w[t, j] expert_out[t, j]``.
Returning per-assignment outputs keeps the combine step shared and gives calibration the routed experts' output norms
for free. No strategy ever drops a token:

- ``dense``: every expert on every token, then gather (reference; fastest for tiny E/k).
- ``capacity``: assignments sorted by expert into per-expert buffers of static capacity C, one batched matmul; if any
  expert receives more than C tokens, a ``lax.cond`` takes the exact ``dense`` path instead.
- ``ragged``: sorted assignments through ``jax.lax.ragged_dot`` (the grouped-matmul path on TPU/GPU).
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from m2d_jax.models.config import ModelConfig
from m2d_jax.models.layers import dtype_of, glu_activation, param


class ExpertWeights(NamedTuple):
    gate: jax.Array  # [E, embed, mlp]
    up: jax.Array  # [E, embed, mlp]
    down: jax.Array  # [E, mlp, embed]


class Routing(NamedTuple):
    """What the router decided for each token (all [tokens, ...])."""
    logits: jax.Array  # [T, E] router logits (compute dtype)
    probs: jax.Array  # [T, E] full softmax over all experts, float32
    top_idx: jax.Array  # [T, k] selected experts, int32
    top_weight: jax.Array  # [T, k] routing weights actually applied (compute dtype)


def route_softmax_topk(logits, k: int, norm_topk_prob: bool) -> Routing:
    """Softmax over all experts (float32) -> top-k -> renormalise over the k iff ``norm_topk_prob``."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    top_p, top_idx = jax.lax.top_k(probs, k)
    if norm_topk_prob:
        top_p = top_p / jnp.sum(top_p, axis=-1, keepdims=True)
    return Routing(logits, probs, top_idx.astype(jnp.int32), top_p.astype(logits.dtype))


def default_dispatch() -> str:
    """``capacity`` on CPU (fastest exact path there), ``ragged`` on TPU/GPU (grouped matmul kernels)."""
    return "capacity" if jax.default_backend() == "cpu" else "ragged"


def expert_outputs(strategy: str, x, top_idx, experts: ExpertWeights, act: Callable, capacity_factor: float = 1.25):
    """Unweighted outputs of the selected experts. x: [T, d]; top_idx: [T, k] -> [T, k, d]."""
    if strategy == "auto":
        strategy = default_dispatch()
    if strategy == "dense":
        return _dense_outputs(x, top_idx, experts, act)
    if strategy == "capacity":
        return _capacity_outputs(x, top_idx, experts, act, capacity_factor)
    if strategy == "ragged":
        return _ragged_outputs(x, top_idx, experts, act)
    raise ValueError(f"unknown MoE dispatch {strategy!r} (expected auto, capacity, ragged or dense)")


def _dense_outputs(x, top_idx, experts: ExpertWeights, act):
    gate = jnp.einsum("td,edm->etm", x, experts.gate)
    up = jnp.einsum("td,edm->etm", x, experts.up)
    out = jnp.einsum("etm,emd->etd", act(gate, up), experts.down)  # [E, T, d]
    tokens = jnp.arange(x.shape[0])[:, None]
    return out[top_idx, tokens]  # [T, k, d]


def _sort_assignments(top_idx, num_experts: int):
    """Assignments (token, slot) flattened and sorted by expert (stable).

    Returns order [A] (flat assignment index of each sorted position), sorted_expert [A], group_sizes [E].
    """
    flat_expert = top_idx.reshape(-1)  # [A = T*k]
    order = jnp.argsort(flat_expert, stable=True)
    group_sizes = jnp.bincount(flat_expert, length=num_experts)
    return order, flat_expert[order], group_sizes


def capacity(num_tokens: int, k: int, num_experts: int, capacity_factor: float) -> int:
    """Static per-expert buffer size: ceil(T*k/E * factor), at most T (an expert sees a token at most once)."""
    return max(1, min(num_tokens, math.ceil(num_tokens * k / num_experts * capacity_factor)))


def _capacity_outputs(x, top_idx, experts: ExpertWeights, act, capacity_factor):
    t, k = top_idx.shape
    e = experts.gate.shape[0]
    cap = capacity(t, k, e, capacity_factor)
    order, sorted_expert, group_sizes = _sort_assignments(top_idx, e)
    group_start = jnp.cumsum(group_sizes) - group_sizes  # [E]
    pos = jnp.arange(t * k) - group_start[sorted_expert]  # position of each sorted assignment in its group
    slot = jnp.where(pos < cap, sorted_expert * cap + pos, e * cap)  # e*cap: overflow sink (never read back)

    def buffered(x):
        x_pad = jnp.concatenate([x, jnp.zeros((1, x.shape[1]), x.dtype)])  # row t: empty slot
        slot_token = jnp.full((e * cap + 1,), t, jnp.int32).at[slot].set((order // k).astype(jnp.int32))
        xb = x_pad[slot_token[:-1]].reshape(e, cap, -1)  # [E, C, d]
        h = act(jnp.einsum("ecd,edm->ecm", xb, experts.gate), jnp.einsum("ecd,edm->ecm", xb, experts.up))
        yb = jnp.einsum("ecm,emd->ecd", h, experts.down).reshape(e * cap, -1)  # [E*C, d]
        y_sorted = yb[jnp.minimum(slot, e * cap - 1)]  # [A, d]
        return _unsort(y_sorted, order).reshape(t, k, -1)

    if cap >= t:  # no expert can overflow: skip the runtime check
        return buffered(x)
    return jax.lax.cond(jnp.max(group_sizes) > cap, lambda x: _dense_outputs(x, top_idx, experts, act), buffered, x)


def _ragged_outputs(x, top_idx, experts: ExpertWeights, act):
    t, k = top_idx.shape
    order, _, group_sizes = _sort_assignments(top_idx, experts.gate.shape[0])
    xs = x[order // k]  # [A, d] tokens in expert order
    gs = group_sizes.astype(jnp.int32)
    h = act(jax.lax.ragged_dot(xs, experts.gate, gs), jax.lax.ragged_dot(xs, experts.up, gs))
    y_sorted = jax.lax.ragged_dot(h, experts.down, gs)
    return _unsort(y_sorted, order).reshape(t, k, -1)


def _unsort(y_sorted, order):
    return jnp.zeros_like(y_sorted).at[order].set(y_sorted, unique_indices=True)


class MoE(nnx.Module):
    """Routed SwiGLU experts stacked on a leading expert axis, with a linear router."""

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        c, dt = config, dtype_of(config.dtype)
        self.config = config
        e, d, m = c.num_experts, c.hidden_size, c.moe_intermediate_size
        self.router = param(rngs, (d, e), ("embed", "exp"), dt)
        self.gate_proj = param(rngs, (e, d, m), ("exp", "embed", "mlp"), dt)
        self.up_proj = param(rngs, (e, d, m), ("exp", "embed", "mlp"), dt)
        self.down_proj = param(rngs, (e, m, d), ("exp", "mlp", "embed"), dt)

    def route(self, x) -> Routing:
        c = self.config
        logits = x @ self.router[...].astype(x.dtype)  # [T, E]
        return route_softmax_topk(logits, c.num_experts_per_tok, c.norm_topk_prob)

    def __call__(self, x):
        """x: [B, T, d] -> (y [B, T, d], Routing over the flattened B*T tokens)."""
        c = self.config
        b, t, d = x.shape
        flat = x.reshape(b * t, d)
        routing = self.route(flat)
        experts = ExpertWeights(*(w[...].astype(x.dtype) for w in (self.gate_proj, self.up_proj, self.down_proj)))
        outs = expert_outputs(c.moe_dispatch, flat, routing.top_idx, experts, glu_activation(c.hidden_act),
                              c.capacity_factor)  # [B*T, k, d]
        y = jnp.einsum("tk,tkd->td", routing.top_weight, outs)
        return y.reshape(b, t, d), routing
