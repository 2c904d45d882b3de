"""The conversion stage: grouping, merging, DP scaling, concatenation, student assembly (docs/METHOD.md).

``convert(teacher, stats, selection, recipe) -> student`` in memory (``pipeline``); per-layer plans
(``plan_conversion``), groupings (``grouping``), merging and DP scaling (``dense``) and the student forms
(``student``) below it.
"""

from m2d_jax.convert.dense import DP_SCALINGS, DenseFFN, LayerPlan, concat_experts, plan_layer
from m2d_jax.convert.grouping import GROUPINGS, group_labels
from m2d_jax.convert.pipeline import (ConversionRecipe, conversion_plans, conversion_statistics, convert,
                                      convert_random_ffn)
from m2d_jax.convert.plan import plan_conversion
from m2d_jax.convert.student import STUDENT_RULES, StudentRule, build_dense_student, build_random_ffn_student

__all__ = ["DP_SCALINGS", "ConversionRecipe", "DenseFFN", "GROUPINGS", "LayerPlan", "STUDENT_RULES",
           "StudentRule", "build_dense_student", "build_random_ffn_student", "concat_experts", "conversion_plans",
           "conversion_statistics", "convert", "convert_random_ffn", "group_labels", "plan_conversion", "plan_layer"]
