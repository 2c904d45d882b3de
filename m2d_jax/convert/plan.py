"""Per-layer conversion plans from a selection: grouping (docs/METHOD.md §5) -> merge weights (§6) -> DP scales (§7)."""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from m2d_jax.convert.dense import DP_SCALINGS, LayerPlan, plan_layer
from m2d_jax.convert.grouping import GROUPINGS, group_labels
from m2d_jax.convert.student import StudentRule, TeacherLayers, student_rule
from m2d_jax.models import CausalLM

# Calibration statistics read here (leading axis: MoE layers in order; docs/METHOD.md §2 names)
ROUTER_MOMENT = "router_logit_moment"  # Z [E, E] (finalised: divided by T)
MEAN_OUTPUT = "mean_output"  # mu [E, d]


def _stat(stats: Mapping | None, name: str, needed_by: str):
    if stats is None or name not in stats:
        raise ValueError(f"{needed_by} needs the calibration statistic {name!r}, which the statistics do not have "
                         f"(available: {sorted(stats) if stats is not None else 'none'})")
    return np.asarray(stats[name])


def expert_weight_gram(teacher: TeacherLayers, layer: int, rule: StudentRule, selected: np.ndarray) -> np.ndarray:
    """<theta_i, theta_j> for the selected experts, theta_e = (vec gate_e, vec up_e, vec down_e (+ biases)), placed in
    an [E, E] matrix (other entries 0). Computed on device, one parameter at a time: nothing is concatenated."""
    index = jnp.asarray(selected)
    gram = jnp.zeros((len(selected), len(selected)), jnp.float32)
    for path in rule.expert_paths.values():
        flat = teacher.get(layer, path)[index].reshape(len(selected), -1).astype(jnp.float32)  # [K, f]
        gram = gram + jnp.matmul(flat, flat.T, precision=jax.lax.Precision.HIGHEST)
    full = np.zeros((teacher.config.moe.experts.num_experts,) * 2)
    full[np.ix_(selected, selected)] = np.asarray(gram, np.float64)
    return full


def check_methods(grouping: str, dp_scaling: str) -> None:
    if grouping not in GROUPINGS:
        raise ValueError(f"unknown grouping {grouping!r} (expected one of {', '.join(GROUPINGS)})")
    if dp_scaling not in DP_SCALINGS:
        raise ValueError(f"unknown DP scaling {dp_scaling!r} (expected one of {', '.join(DP_SCALINGS)})")


def check_counts(num_experts: int, num_selected: int, k: int) -> None:
    if not 1 <= num_selected <= num_experts:
        raise ValueError(f"K={num_selected} selected experts per layer: must be between 1 and the teacher's "
                         f"E={num_experts} experts (of its smallest MoE layer)")
    if not 1 <= k <= num_selected:
        raise ValueError(f"k={k} groups: must be between 1 and K={num_selected} (the selected experts per layer)")


def plan_conversion(teacher: CausalLM, selected, weight_scores, k: int, grouping: str, dp_scaling: str,
                    stats: Mapping | None = None, routed_mass=None, conditional_prob=None) -> dict[int, LayerPlan]:
    """One ``LayerPlan`` per MoE layer (keyed by global layer index).

    selected [L_moe, K]: chosen experts per MoE layer, best first; weight_scores [L_moe, E]: scores for merge
    weights and proportional DP. ``routed_mass`` [L_moe]: E_t[sum_e w_e] per layer (needed only for un-normalised
    routers; rho for normalised ones). ``conditional_prob`` [L_moe, E]: needed only by the conditional_prob DP rule.
    ``stats`` supplies what the grouping method needs (Z for router_cluster / dominant_expert, mu for
    output_cluster).
    """
    config = teacher.config
    rule = student_rule(config.family)
    moe_layers = config.moe_layers
    selected = np.asarray(selected)
    weight_scores = np.asarray(weight_scores, np.float64)
    if selected.ndim != 2 or selected.shape[0] != len(moe_layers):
        raise ValueError(f"selected has shape {selected.shape}, expected [{len(moe_layers)} MoE layers, K]")
    if weight_scores.shape != (len(moe_layers), config.moe.experts.num_experts):
        raise ValueError(f"weight_scores has shape {weight_scores.shape}, expected "
                         f"[{len(moe_layers)}, {config.moe.experts.num_experts}]")
    check_methods(grouping, dp_scaling)
    check_counts(min(config.moe_layer_experts), selected.shape[1], k)
    for layer, row, real in zip(moe_layers, selected, config.moe_layer_experts):  # padded ids >= E_l: never merged
        if len(set(row.tolist())) != len(row) or row.min() < 0 or row.max() >= real:
            raise ValueError(f"selected experts {row.tolist()} of MoE layer {layer} must be distinct ids in "
                             f"[0, {real})")
    normalized = rule.normalized_router(config)
    if normalized:  # weights sum to rho (routed_scaling_factor: 1, or FlexOlmo shared_mlp's k/(k+1)) per token
        routed_mass = np.full(len(moe_layers), rule.routed_scaling_factor(config))
    elif routed_mass is None:
        raise ValueError(f"the {config.family} teacher's router weights are not normalised: DP scaling needs the "
                         f"mean routed mass per token from the calibration statistics")
    router_moment = mean_output = None
    if selected.shape[1] > k and grouping in ("router_cluster", "dominant_expert"):
        router_moment = _stat(stats, ROUTER_MOMENT, f"grouping {grouping!r}")
    if selected.shape[1] > k and grouping == "output_cluster":
        mean_output = _stat(stats, MEAN_OUTPUT, f"grouping {grouping!r}")
    layers = TeacherLayers(teacher)
    plans = {}
    for i, layer in enumerate(moe_layers):
        weight_gram = None
        if grouping == "weight_cluster" and selected.shape[1] > k:
            weight_gram = expert_weight_gram(layers, layer, rule, selected[i])
        labels = group_labels(grouping, selected[i], k, weight_gram=weight_gram,
                              router_moment=None if router_moment is None else router_moment[i],
                              mean_output=None if mean_output is None else mean_output[i])
        plans[layer] = plan_layer(labels, selected[i], weight_scores[i], dp_scaling, float(np.asarray(routed_mass)[i]),
                                  rule.uniform_rule, None if conditional_prob is None else conditional_prob[i],
                                  rule.routed_scaling_factor(config))
    return plans
