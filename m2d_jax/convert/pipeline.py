"""The conversion stage in memory: ``convert(teacher, stats, selection, recipe) -> student`` (docs/METHOD.md).

The ``Selection`` (``m2d_jax.scoring``) says which K experts each MoE layer keeps and their merge / DP weights; the
``ConversionRecipe`` how they become one dense FFN (k groups, the grouping, the DP scaling); the statistics supply
what grouping and DP scaling read (router-logit moment, mean expert outputs, routed mass, conditional
probabilities), derived once here. Reading and writing files is ``m2d_jax.pipeline``'s job.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from m2d_jax.calibration import CalibrationStats
from m2d_jax.convert.dense import LayerPlan
from m2d_jax.convert.plan import MEAN_OUTPUT, ROUTER_MOMENT, check_methods, plan_conversion
from m2d_jax.convert.student import build_dense_student, build_random_ffn_student
from m2d_jax.models import CausalLM


@dataclasses.dataclass(frozen=True)
class ConversionRecipe:
    """How the K selected experts of every MoE layer become one dense FFN: ``groups`` (k) groups formed by
    ``grouping`` (``GROUPINGS``), merged with the selection's weight scores and scaled by ``dp_scaling``
    (``DP_SCALINGS``). K need not be a multiple of k: round-robin groups differ in size by at most one, the
    clustering groupings give any sizes >= 1."""
    groups: int
    grouping: str = "round_robin"
    dp_scaling: str = "uniform"

    def __post_init__(self):
        check_methods(self.grouping, self.dp_scaling)
        if isinstance(self.groups, bool) or not isinstance(self.groups, (int, np.integer)) or self.groups < 1:
            raise ValueError(f"groups={self.groups!r}: expected an integer k >= 1")

    def to_dict(self) -> dict:
        return {"groups": int(self.groups), "grouping": self.grouping, "dp_scaling": self.dp_scaling}


def conversion_statistics(stats: CalibrationStats) -> dict[str, np.ndarray]:
    """What grouping and DP scaling read from the calibration sums, per MoE layer: Z = E_t[z z^T] [L, E, E],
    mu = E_U[f_e] [L, E, d], the routed mass E_t[sum_e w_e(t)] [L] (rho included) and CP [L, E]."""
    from m2d_jax.scoring import score

    sums = stats.sums
    return {ROUTER_MOMENT: sums.router_logit_moment / sums.tokens[:, None, None],
            MEAN_OUTPUT: sums.sum_output / np.maximum(sums.gram_tokens, 1)[:, None, None],
            "routed_mass": sums.sum_applied_weight.sum(-1) / sums.tokens,
            "conditional_prob": score(stats, "conditional_prob")}


def conversion_plans(teacher: CausalLM, stats: CalibrationStats, selection, recipe: ConversionRecipe
                     ) -> dict[int, LayerPlan]:
    """One ``LayerPlan`` per MoE layer (keyed by global layer index) after checking that ``stats`` were collected
    on ``teacher`` and ``selection`` was made from ``stats``."""
    config = teacher.config
    if not config.is_moe:
        raise ValueError(f"the {config.family} model has no MoE layers to convert")
    stats.check_model(config)
    selection.check_stats(stats)
    derived = conversion_statistics(stats)
    return plan_conversion(teacher, selection.selected, selection.weight_scores, recipe.groups, recipe.grouping,
                           recipe.dp_scaling, derived, routed_mass=derived["routed_mass"],
                           conditional_prob=derived["conditional_prob"])


def convert(teacher: CausalLM, stats: CalibrationStats, selection, recipe: ConversionRecipe,
            progress: bool = False) -> CausalLM:
    """The dense student of ``teacher``: the selected experts of every MoE layer grouped, merged, scaled and
    concatenated into the teacher family's dense (or one-expert) student form."""
    return build_dense_student(teacher, conversion_plans(teacher, stats, selection, recipe), recipe.groups, progress)


def convert_random_ffn(teacher: CausalLM, groups: int, seed: int = 0) -> CausalLM:
    """The random-FFN baseline: the student architecture of ``groups`` (k) groups with the teacher's embeddings,
    attention, norms and LM head, and a freshly initialised FFN (normal(0, 0.02), biases 0)."""
    e = min(teacher.config.moe_layer_experts) if teacher.config.is_moe else 0  # of the smallest MoE layer
    if not 1 <= groups <= e:
        raise ValueError(f"k={groups} groups: must be between 1 and the teacher's E={e} experts")
    return build_random_ffn_student(teacher, groups, seed)
