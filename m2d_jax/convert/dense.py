"""Merging, down-projection (DP) scaling and concatenation into one dense FFN (docs/METHOD.md §6-§8).

One layer's plan is a merge matrix ``alpha`` [k, E] (row g holds the score-weighted averaging weights of group g's
members, zero elsewhere) and DP scales ``scales`` [k]. Merging is linear in the expert weights, so the dense FFN of
a layer is a pair of einsums over the stacked experts:

    gate_dense [d, k*m] = concat_g sum_e alpha[g, e] gate[e]          (+ shared gate appended, width m_s)
    down_dense [k*m, d] = concat_g scales[g] sum_e alpha[g, e] down[e] (+ shared down appended, scale 1)

and, because the gated activation acts neuron by neuron, ``dense(x) == sum_g scales[g] f~_g(x) + shared(x)`` exactly
(docs/METHOD.md §8). Biases (GPT-OSS) follow the same rule: gate/up biases are concatenated, down biases are summed with
the scales.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from m2d_jax.models.moe import ExpertWeights

DP_SCALINGS = ("uniform", "proportional")
UNIFORM_RULES = ("routing_mass", "conditional_prob")
HIGHEST = jax.lax.Precision.HIGHEST


class DenseFFN(NamedTuple):
    """One dense SwiGLU FFN of width W (a teacher's dense layer, shared experts, or the student's FFN)."""
    gate: jax.Array  # [d, W]
    up: jax.Array  # [d, W]
    down: jax.Array  # [W, d]
    gate_bias: jax.Array | None = None  # [W]
    up_bias: jax.Array | None = None  # [W]
    down_bias: jax.Array | None = None  # [d]

    @property
    def width(self) -> int:
        return self.gate.shape[-1]


class LayerPlan(NamedTuple):
    """How one MoE layer becomes dense: groups (global expert ids, best group first), alpha [k, E], scales [k]."""
    groups: tuple[tuple[int, ...], ...]
    alpha: np.ndarray  # [k, E] float64, rows sum to 1
    scales: np.ndarray  # [k] float64


def merge_matrix(groups: list[np.ndarray], weight_scores: np.ndarray) -> np.ndarray:
    """alpha [k, E]: alpha[g, e] = s_e / sum_{e' in M_g} s_e' for e in M_g (uniform within a group whose scores sum
    to 0). ``groups``: k arrays of global expert ids; ``weight_scores`` [E] (negative scores count as 0)."""
    s = np.clip(np.asarray(weight_scores, np.float64), 0.0, None)
    alpha = np.zeros((len(groups), s.shape[0]))
    for g, members in enumerate(groups):
        total = s[members].sum()
        alpha[g, members] = s[members] / total if total > 0 else 1.0 / len(members)
    return alpha


def dp_scales(mode: str, alpha: np.ndarray, weight_scores: np.ndarray, routed_mass: float,
              uniform_rule: str = "routing_mass", conditional_prob: np.ndarray | None = None,
              routed_scaling_factor: float = 1.0) -> np.ndarray:
    """DP scales c [k] (docs/METHOD.md §7).

    ``routed_mass`` is the expected total routing weight per token, E_t[sum_e w_e(t)]: 1 for normalised routers,
    rho * (mean selected softmax mass) for un-normalised ones, so that ``uniform`` c_g = routed_mass / k (= 1/k,
    or rho * w-bar per active slot) and ``proportional`` c_g = routed_mass * S_g / sum_h S_h, both keeping the
    teacher's total routing mass. ``uniform_rule="conditional_prob"`` (the released DeepSeek students) instead sets
    c_g = rho * sum_e alpha[g, e] CP_e.
    """
    if mode not in DP_SCALINGS:
        raise ValueError(f"unknown DP scaling {mode!r} (expected one of {', '.join(DP_SCALINGS)})")
    if uniform_rule not in UNIFORM_RULES:
        raise ValueError(f"unknown uniform DP rule {uniform_rule!r} (expected one of {', '.join(UNIFORM_RULES)})")
    k = alpha.shape[0]
    if mode == "proportional":
        membership = (alpha > 0).astype(np.float64)  # [k, E]
        group_score = membership @ np.clip(np.asarray(weight_scores, np.float64), 0.0, None)  # S_g [k]
        total = group_score.sum()
        share = group_score / total if total > 0 else np.full(k, 1.0 / k)
        return routed_mass * share
    if uniform_rule == "conditional_prob":
        if conditional_prob is None:
            raise ValueError("the conditional_prob DP rule needs the per-expert conditional probabilities")
        return routed_scaling_factor * (alpha @ np.asarray(conditional_prob, np.float64))
    return np.full(k, routed_mass / k)


def plan_layer(labels: np.ndarray, selected: np.ndarray, weight_scores: np.ndarray, mode: str, routed_mass: float,
               uniform_rule: str = "routing_mass", conditional_prob: np.ndarray | None = None,
               routed_scaling_factor: float = 1.0) -> LayerPlan:
    """Groups from grouping labels [K] of the selected experts [K]; groups ordered by S_g descending (ties: the
    group of the better-ranked expert first; the order does not change the function)."""
    selected = np.asarray(selected)
    k = int(labels.max()) + 1
    groups = [selected[labels == g] for g in range(k)]
    s = np.clip(np.asarray(weight_scores, np.float64), 0.0, None)
    first_rank = [int(np.flatnonzero(labels == g)[0]) for g in range(k)]
    order = sorted(range(k), key=lambda g: (-s[groups[g]].sum(), first_rank[g]))
    groups = [groups[g] for g in order]
    alpha = merge_matrix(groups, weight_scores)
    scales = dp_scales(mode, alpha, weight_scores, routed_mass, uniform_rule, conditional_prob,
                       routed_scaling_factor)
    return LayerPlan(tuple(tuple(int(e) for e in g) for g in groups), alpha, scales)


def _merge(alpha, stacked, spec: str):
    return None if stacked is None else jnp.einsum(spec, alpha, stacked.astype(jnp.float32), precision=HIGHEST)


@jax.jit
def concat_experts(experts: ExpertWeights, alpha, scales, shared: DenseFFN | None = None) -> DenseFFN:
    """The dense FFN of one layer (float32): k merged, scaled experts side by side, then the shared experts.

    alpha [k, E], scales [k]; result width k*m (+ m_s).
    """
    k = alpha.shape[0]
    _, d, m = experts.gate.shape
    alpha = alpha.astype(jnp.float32)
    scaled = alpha * scales.astype(jnp.float32)[:, None]  # [k, E]
    gate = _merge(alpha, experts.gate, "ge,edm->dgm").reshape(d, k * m)
    up = _merge(alpha, experts.up, "ge,edm->dgm").reshape(d, k * m)
    down = _merge(scaled, experts.down, "ge,emd->gmd").reshape(k * m, d)
    gate_bias = None if experts.gate_bias is None else _merge(alpha, experts.gate_bias, "ge,em->gm").reshape(-1)
    up_bias = None if experts.up_bias is None else _merge(alpha, experts.up_bias, "ge,em->gm").reshape(-1)
    down_bias = None
    if experts.down_bias is not None:
        down_bias = jnp.einsum("ge,ed->d", scaled, experts.down_bias.astype(jnp.float32), precision=HIGHEST)
    dense = DenseFFN(gate, up, down, gate_bias, up_bias, down_bias)
    return dense if shared is None else append_ffn(dense, shared)


def append_ffn(a: DenseFFN, b: DenseFFN) -> DenseFFN:
    """Two FFNs side by side (widths add): a(x) + b(x) as one float32 FFN. Down biases add; a missing bias is 0."""

    def f32(x, size):
        return jnp.zeros((size,), jnp.float32) if x is None else x.astype(jnp.float32)

    def side_by_side(x, y, axis):
        return jnp.concatenate([x.astype(jnp.float32), y.astype(jnp.float32)], axis=axis)

    def bias(x, y):  # [W_a] and [W_b] -> [W_a + W_b], None when neither has one
        return None if x is None and y is None else jnp.concatenate([f32(x, a.width), f32(y, b.width)])

    d = a.gate.shape[0]
    down_bias = None if a.down_bias is None and b.down_bias is None else f32(a.down_bias, d) + f32(b.down_bias, d)
    return DenseFFN(side_by_side(a.gate, b.gate, 1), side_by_side(a.up, b.up, 1), side_by_side(a.down, b.down, 0),
                    bias(a.gate_bias, b.gate_bias), bias(a.up_bias, b.up_bias), down_bias)


def scale_output(ffn: DenseFFN, scale: float) -> DenseFFN:
    """The FFN whose output is ``scale`` times ``ffn``'s (down projection and down bias scaled)."""
    if scale == 1:
        return ffn
    return ffn._replace(down=ffn.down * scale, down_bias=None if ffn.down_bias is None else ffn.down_bias * scale)


def pad_ffn(ffn: DenseFFN, width: int, where: str) -> DenseFFN:
    """Zero-pad a dense FFN to ``width`` neurons (zero gate/up rows, zero down columns: the same function,
    docs/METHOD.md §9).

    A wider FFN cannot be narrowed without changing the function: that is an error naming ``where``.
    """
    extra = width - ffn.width
    if extra < 0:
        raise ValueError(f"{where}: dense FFN of width {ffn.width} is wider than the student's FFN width {width} "
                         f"(k*m + m_s); choose more groups k so that the student is at least as wide")
    if extra == 0:
        return ffn
    pad_cols = lambda x: None if x is None else jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, extra)])  # noqa: E731
    return DenseFFN(pad_cols(ffn.gate), pad_cols(ffn.up), jnp.pad(ffn.down, [(0, extra), (0, 0)]),
                    pad_cols(ffn.gate_bias), pad_cols(ffn.up_bias), ffn.down_bias)
