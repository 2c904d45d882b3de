"""``m2d plan``: each stage's own jitted step compiled ahead of time for a mesh config's TPU topology (abstract
parameters, the project's sharding rules): memory per chip, FITS / DOES NOT FIT, FLOPs and a step-time ESTIMATE."""

from m2d_jax.plan.models import load_model, model_config_names, student_config
from m2d_jax.plan.planner import DEFAULT_DISTILL_CONFIG, STAGES, PlanOptions, format_plan, plan, plan_once

__all__ = ["DEFAULT_DISTILL_CONFIG", "PlanOptions", "STAGES", "format_plan", "load_model", "model_config_names",
           "plan", "plan_once", "student_config"]
