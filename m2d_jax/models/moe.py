"""Mixture-of-Experts: routing rules and exact, pluggable expert dispatch.

Every dispatch strategy computes, for each (token, slot) assignment, the *unweighted* output of the chosen expert,
``expert_out[t, j] = f_{idx[t, j]}(x_t)`` [tokens, k, embed]; the block output is ``sum_j w[t, j] expert_out[t, j]``.
Returning per-assignment outputs keeps the combine step shared and gives calibration the routed experts' output norms
for free. No strategy ever drops a token:

- ``dense``: every expert on every token, then gather (reference; fastest for tiny E/k).
- ``capacity``: assignments sorted by expert into per-expert buffers of static capacity C, one batched matmul per
  round; experts that receive more than C tokens are finished in further rounds that run only when needed.
- ``blocks``: each expert's sorted assignments cut into fixed-size row blocks (one expert per block), processed a
  fixed number of blocks at a time with gathered expert weights: a block-sparse grouped matmul whose cost does not
  depend on routing skew (the CPU default).
- ``ragged``: sorted assignments through ``jax.lax.ragged_dot`` (the grouped-matmul path on TPU/GPU).
- ``auto`` (the default): ``blocks`` on CPU, ``ragged`` on TPU/GPU (``default_dispatch``).

These are ``m2d_jax.models.config.DISPATCHES``; ``RuntimeConfig.moe_dispatch`` chooses one.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from m2d_jax.models.config import DISPATCHES, ModelConfig, RuntimeConfig
from m2d_jax.models.layers import MLP, constrain, dtype_of, glu_activation, map_token_shards, param


class ExpertWeights(NamedTuple):
    """One layer's routed experts, stacked on a leading expert axis (the model's MoE layer, calibration's view of
    it, and the conversion's merge all use this one type). Biases are None for families without them."""
    gate: jax.Array  # [E, embed, mlp]
    up: jax.Array  # [E, embed, mlp]
    down: jax.Array  # [E, mlp, embed]
    gate_bias: jax.Array | None = None  # [E, mlp] (GPT-OSS)
    up_bias: jax.Array | None = None  # [E, mlp]
    down_bias: jax.Array | None = None  # [E, embed]


def expert_ffn(experts: ExpertWeights, act: Callable, xb):
    """Each expert on its own rows: xb [E, C, d] -> [E, C, d] (E may be a gathered subset of experts)."""
    gate = jnp.einsum("ecd,edm->ecm", xb, experts.gate)
    up = jnp.einsum("ecd,edm->ecm", xb, experts.up)
    if experts.gate_bias is not None:
        gate, up = gate + experts.gate_bias[:, None], up + experts.up_bias[:, None]
    out = jnp.einsum("ecm,emd->ecd", act(gate, up), experts.down)
    return out if experts.down_bias is None else out + experts.down_bias[:, None]


class Routing(NamedTuple):
    """What the router decided for each token (all [tokens, ...])."""
    logits: jax.Array  # [T, E] router logits (compute dtype)
    probs: jax.Array  # [T, E] full softmax over all experts, float32
    top_idx: jax.Array  # [T, k] selected experts, int32
    top_weight: jax.Array  # [T, k] routing weights actually applied (compute dtype)


class MoEView(NamedTuple):
    """What an observer sees inside one MoE layer (tokens flattened: T = batch * seq)."""
    x: jax.Array  # [T, d] MoE input (the normed residual; the raw residual in post-norm layers), compute dtype
    routing: Routing
    expert_out: jax.Array  # [T, k, d] unweighted outputs of the selected experts
    experts: ExpertWeights  # this layer's expert weights, compute dtype
    act: Callable  # the experts' gated activation phi(gate, up)
    real_experts: jax.Array | None = None  # [E] bool: the layer's real experts (per-layer counts), None = all


def route_softmax_topk(logits, k: int, norm_topk_prob: bool) -> Routing:
    """Softmax over all experts (float32) -> top-k -> renormalise over the k iff ``norm_topk_prob``."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    top_p, top_idx = jax.lax.top_k(probs, k)
    if norm_topk_prob:
        top_p = top_p / jnp.sum(top_p, axis=-1, keepdims=True)
    return Routing(logits, probs, top_idx.astype(jnp.int32), top_p.astype(logits.dtype))


def route_softmax_topk_scaled(logits, k: int, scaling: float, n_group: int = 1, topk_group: int = 1,
                              out_dtype=jnp.float32) -> Routing:
    """DeepSeek-V2: softmax over all experts -> top-k (group-limited: only experts of the ``topk_group`` groups
    with the highest max-probability compete) -> weights = p * ``routed_scaling_factor``, not renormalised."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)  # [T, E]
    candidates = probs
    if n_group > 1:
        t, e = probs.shape
        group_best = jnp.max(probs.reshape(t, n_group, e // n_group), axis=-1)  # [T, groups]
        _, keep = jax.lax.top_k(group_best, topk_group)
        group_mask = jnp.zeros((t, n_group), bool).at[jnp.arange(t)[:, None], keep].set(True)
        candidates = jnp.where(jnp.repeat(group_mask, e // n_group, axis=1), probs, 0.0)
    top_p, top_idx = jax.lax.top_k(candidates, k)
    return Routing(logits, probs, top_idx.astype(jnp.int32), (top_p * scaling).astype(out_dtype))


def route_topk_softmax(logits, k: int) -> Routing:
    """GPT-OSS: top-k over the logits, softmax over the k selected (``probs`` is still the full softmax)."""
    top_logits, top_idx = jax.lax.top_k(logits, k)
    weights = jax.nn.softmax(top_logits, axis=-1)
    return Routing(logits, jax.nn.softmax(logits.astype(jnp.float32), axis=-1), top_idx.astype(jnp.int32), weights)


def mask_padded_experts(rule: Callable[[jax.Array], Routing], logits, real_experts) -> Routing:
    """``rule(logits)`` with the padded experts (``real_experts`` [E] False; per-layer expert counts) removed: their
    logits are -inf inside the rule (probability exactly 0, never selected) and 0 in ``Routing.logits``."""
    if real_experts is None:
        return rule(logits)
    routing = rule(jnp.where(real_experts, logits, -jnp.inf))
    return routing._replace(logits=jnp.where(real_experts, logits, 0))


def default_dispatch(platform: str | None = None) -> str:
    """``blocks`` on CPU (fastest exact path there, whatever the routing skew), ``ragged`` on TPU/GPU (grouped
    matmul kernels). ``platform`` (default: jax's default backend) names the target, e.g. for an AOT compile."""
    return "blocks" if (platform or jax.default_backend()) == "cpu" else "ragged"


def expert_outputs(strategy: str, x, top_idx, experts: ExpertWeights, act: Callable, capacity_factor: float = 1.25,
                   block_size: int = 256, blocks_per_step: int = 32):
    """Unweighted outputs of the selected experts. x: [T, d]; top_idx: [T, k] -> [T, k, d]."""
    if strategy == "auto":
        strategy = default_dispatch()
    if strategy == "dense":
        return _dense_outputs(x, top_idx, experts, act)
    if strategy == "capacity":
        return _capacity_outputs(x, top_idx, experts, act, capacity_factor)
    if strategy == "ragged":
        return _ragged_outputs(x, top_idx, experts, act)
    if strategy == "blocks":
        return _block_outputs(x, top_idx, experts, act, block_size, blocks_per_step)
    raise ValueError(f"unknown MoE dispatch: moe_dispatch={strategy!r} not in {DISPATCHES}")


def all_expert_outputs(experts: ExpertWeights, act: Callable, x):
    """Every expert on the same tokens: x [T, d] -> [E, T, d] (dense dispatch, calibration's Gram subsample)."""
    return expert_ffn(experts, act, jnp.broadcast_to(x, (experts.gate.shape[0],) + x.shape))


def _dense_outputs(x, top_idx, experts: ExpertWeights, act):
    out = all_expert_outputs(experts, act, x)  # [E, T, d]
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
    """Sorted per-expert buffers of static capacity C, processed in rounds: round r takes each expert's
    assignments at positions [rC, (r+1)C) within its group. Round 0 always runs; later rounds run (``lax.cond``)
    only while some expert still has assignments left, so balanced routing costs one batched matmul and skewed
    routing costs E x (largest group) rows, never a dropped token."""
    t, k = top_idx.shape
    e, d = experts.gate.shape[0], x.shape[1]
    cap = capacity(t, k, e, capacity_factor)
    order, sorted_expert, group_sizes = _sort_assignments(top_idx, e)
    group_start = jnp.cumsum(group_sizes) - group_sizes  # [E]
    pos = jnp.arange(t * k) - group_start[sorted_expert]  # [A] position of each sorted assignment in its group
    sorted_token = (order // k).astype(jnp.int32)  # [A]
    x_pad = jnp.concatenate([x, jnp.zeros((1, d), x.dtype)])  # row t: what empty buffer slots read

    def run_round(r):
        in_round = (pos >= r * cap) & (pos < (r + 1) * cap)  # [A]
        slot = jnp.where(in_round, sorted_expert * cap + pos - r * cap, e * cap)  # e*cap: sink, never read back
        slot_token = jnp.full((e * cap + 1,), t, jnp.int32).at[slot].set(sorted_token)
        xb = x_pad[slot_token[:-1]].reshape(e, cap, d)  # [E, C, d]
        yb = expert_ffn(experts, act, xb).reshape(e * cap, d)  # [E*C, d]
        return jnp.where(in_round[:, None], yb[jnp.minimum(slot, e * cap - 1)], 0)  # [A, d]

    y_sorted = run_round(0)
    if cap < t:  # an expert may receive more than C tokens (at most t): further rounds, only if needed
        largest = jnp.max(group_sizes)
        y_sorted = jax.lax.fori_loop(
            1, -(-t // cap),
            lambda r, y: jax.lax.cond(r * cap < largest, lambda y: y + run_round(r), lambda y: y, y), y_sorted)
    return _unsort(y_sorted, order).reshape(t, k, -1)


def _block_outputs(x, top_idx, experts: ExpertWeights, act, block_size: int, blocks_per_step: int):
    """Block-sparse grouped matmul: each expert's sorted assignments are cut into blocks of ``block_size`` rows
    (the last one padded), so every block belongs to one expert; blocks are processed ``blocks_per_step`` at a
    time with their experts' weights gathered. Rows computed ~ T*k + E*block_size/2, whatever the imbalance.
    Steps past the last real block are skipped at run time (``lax.cond``)."""
    t, k = top_idx.shape
    e, d = experts.gate.shape[0], x.shape[1]
    a = t * k
    b = max(1, min(block_size, a))
    order, _, group_sizes = _sort_assignments(top_idx, e)
    sorted_token = (order // k).astype(jnp.int32)  # [A]
    group_start = jnp.cumsum(group_sizes) - group_sizes  # [E]
    expert_blocks = -(-group_sizes // b)  # [E] blocks per expert
    block_end = jnp.cumsum(expert_blocks)  # [E]
    num_blocks = block_end[-1]
    max_blocks = -(-a // b) + e  # static bound: sum_e ceil(n_e / b) <= A/b + E
    g = max(1, min(blocks_per_step, max_blocks))
    steps = -(-max_blocks // g)
    x_pad = jnp.concatenate([x, jnp.zeros((1, d), x.dtype)])  # row t: padding rows read zeros

    def run_step(i, y):
        block = i * g + jnp.arange(g)  # [G]
        expert = jnp.minimum(jnp.searchsorted(block_end, block, side="right"), e - 1)  # [G]
        local = block - (block_end[expert] - expert_blocks[expert])
        start = group_start[expert] + local * b
        length = jnp.where(block < num_blocks, jnp.minimum(b, group_sizes[expert] - local * b), 0)  # [G]
        row = jnp.minimum(start[:, None] + jnp.arange(b)[None, :], a - 1)  # [G, b] positions in sorted order
        valid = jnp.arange(b)[None, :] < length[:, None]
        xb = x_pad[jnp.where(valid, sorted_token[row], t)]  # [G, b, d]
        yb = expert_ffn(jax.tree.map(lambda w: w[expert], experts), act, xb)  # [G, b, d], weights of G experts
        return y.at[jnp.where(valid, order[row], a)].set(yb, mode="drop")  # straight to (token, slot) order

    y = jnp.zeros((a, d), x.dtype)  # [A, d] in flat (token, slot) order
    y = jax.lax.fori_loop(
        0, steps, lambda i, y: jax.lax.cond(i * g < num_blocks, lambda y: run_step(i, y), lambda y: y, y), y)
    return y.reshape(t, k, d)


def _ragged_outputs(x, top_idx, experts: ExpertWeights, act):
    t, k = top_idx.shape
    order, sorted_expert, group_sizes = _sort_assignments(top_idx, experts.gate.shape[0])
    xs = x[order // k]  # [A, d] tokens in expert order
    gs = group_sizes.astype(jnp.int32)
    gate, up = jax.lax.ragged_dot(xs, experts.gate, gs), jax.lax.ragged_dot(xs, experts.up, gs)
    if experts.gate_bias is not None:
        gate, up = gate + experts.gate_bias[sorted_expert], up + experts.up_bias[sorted_expert]
    y_sorted = jax.lax.ragged_dot(act(gate, up), experts.down, gs)
    if experts.down_bias is not None:
        y_sorted = y_sorted + experts.down_bias[sorted_expert]
    return _unsort(y_sorted, order).reshape(t, k, -1)


def _unsort(y_sorted, order):
    return jnp.zeros_like(y_sorted).at[order].set(y_sorted, unique_indices=True)


class MoE(nnx.Module):
    """Routed SwiGLU experts stacked on a leading expert axis, a linear router (+ bias), and optional always-on
    shared experts (one dense MLP of width ``experts.shared_size``, added with weight ``experts.shared_scale``: 1,
    or 1/(k+1) in FlexOlmo's shared_mlp variant, whose routed weights carry k/(k+1)). The runtime chooses the
    dispatch and may expand the routing to ``runtime.top_k`` experts per token."""

    def __init__(self, config: ModelConfig, runtime: RuntimeConfig, rngs: nnx.Rngs):
        dt = dtype_of(runtime.param_dtype)
        self.config, self.runtime = config, runtime
        self.top_k = runtime.top_k_for(config)
        router, experts = config.moe.router, config.moe.experts
        e, d, m = experts.num_experts, config.hidden_size, experts.intermediate_size
        self.router = param(rngs, (d, e), ("embed", "exp"), dt)
        if router.bias:
            self.router_bias = param(rngs, (e,), ("exp",), dt, init="zeros")
        self.gate_proj = param(rngs, (e, d, m), ("exp", "embed", "mlp"), dt)
        self.up_proj = param(rngs, (e, d, m), ("exp", "embed", "mlp"), dt)
        self.down_proj = param(rngs, (e, m, d), ("exp", "mlp", "embed"), dt)
        if experts.bias:
            self.gate_bias = param(rngs, (e, m), ("exp", "mlp"), dt, init="zeros")
            self.up_bias = param(rngs, (e, m), ("exp", "mlp"), dt, init="zeros")
            self.down_bias = param(rngs, (e, d), ("exp", "embed"), dt, init="zeros")
        if experts.shared_size:
            self.shared = MLP(config.ffn, d, experts.shared_size, dt, rngs)

    def route(self, x, real_experts=None) -> Routing:
        """x [T, d] -> the family's routing decision. ``real_experts`` [E] bool (per-layer expert counts): the
        others are padding (``mask_padded_experts``)."""
        r = self.config.moe.router
        if r.rule == "softmax_topk_scaled":  # DeepSeek computes router logits in float32
            logits = x.astype(jnp.float32) @ self.router[...].astype(jnp.float32)
            return mask_padded_experts(lambda z: route_softmax_topk_scaled(
                z, self.top_k, r.routed_scaling_factor, r.n_group if r.topk_method == "group_limited_greedy" else 1,
                r.topk_group, out_dtype=x.dtype), logits, real_experts)
        logits = x @ self.router[...].astype(x.dtype)  # [T, E]
        if r.bias:
            logits = logits + self.router_bias[...].astype(x.dtype)
        if r.rule == "topk_softmax":
            routing = mask_padded_experts(lambda z: route_topk_softmax(z, self.top_k), logits, real_experts)
        else:
            routing = mask_padded_experts(lambda z: route_softmax_topk(z, self.top_k, r.norm_topk_prob), logits,
                                          real_experts)
        if r.routed_scaling_factor != 1:  # FlexOlmo's shared_mlp variant: routed part weighted k/(k+1)
            routing = routing._replace(top_weight=routing.top_weight * r.routed_scaling_factor)
        return routing

    def expert_weights(self, dtype) -> ExpertWeights:
        names = ("gate_proj", "up_proj", "down_proj") + (("gate_bias", "up_bias", "down_bias")
                                                          if self.config.moe.experts.bias else ())
        return ExpertWeights(*(getattr(self, n)[...].astype(dtype) for n in names))

    def __call__(self, x, observe: Callable[[MoEView], object] | None = None, num_experts=None):
        """x: [B, T, d] -> (y [B, T, d], ``observe(view)`` or None). ``num_experts`` ([] int, per-layer expert
        counts): this layer's real experts E_l, the first E_l of the stacked E."""
        rt = self.runtime
        b, t, d = x.shape
        flat = constrain(x.reshape(b * t, d), ("batch", "embed"))  # [B*T, d] tokens, sharded like the batch
        real = None if num_experts is None else jnp.arange(self.config.moe.experts.num_experts) < num_experts  # [E]
        routing = Routing(*(constrain(a, ("batch", None)) for a in self.route(flat, real)))  # each [B*T, E | k]
        experts = self.expert_weights(x.dtype)
        act = glu_activation(self.config.ffn)
        outs = map_token_shards(  # [B*T, k, d], each batch shard's tokens dispatched on its own devices
            lambda x_, idx, w: expert_outputs(rt.moe_dispatch, x_, idx, w, act, rt.capacity_factor,
                                              rt.moe_block_size, rt.moe_blocks_per_step), (flat, routing.top_idx),
            experts)
        y = jnp.einsum("tk,tkd->td", routing.top_weight.astype(x.dtype), outs)
        spec = self.config.moe.experts
        if spec.shared_size:
            y = y + (self.shared(flat) if spec.shared_scale == 1 else spec.shared_scale * self.shared(flat))
        observation = observe(MoEView(flat, routing, outs, experts, act, real)) if observe is not None else None
        return constrain(y.reshape(b, t, d), ("batch", "seq", "embed")), observation
