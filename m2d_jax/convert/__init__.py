"""MoE -> dense conversion: grouping, merging, DP scaling, concatenation, student assembly (SPEC §5-§7)."""

from m2d_jax.convert.dense import DP_SCALINGS, DenseFFN, LayerPlan, concat_experts, plan_layer
from m2d_jax.convert.grouping import GROUPINGS, group_labels
from m2d_jax.convert.pipeline import convert, convert_random_ffn
from m2d_jax.convert.plan import plan_conversion
from m2d_jax.convert.student import STUDENT_RULES, StudentRule, build_dense_student, build_random_ffn_student

__all__ = ["DP_SCALINGS", "DenseFFN", "GROUPINGS", "LayerPlan", "STUDENT_RULES", "StudentRule",
           "build_dense_student", "build_random_ffn_student", "concat_experts", "convert", "convert_random_ffn",
           "group_labels", "plan_conversion", "plan_layer"]
