"""Distillation: a sharded forward-KL train step over a device mesh (docs/METHOD.md §11), WSD schedule, grain input,
Orbax checkpoints with exact resume, JSONL / TensorBoard metrics. Also plain next-token LM training with a Switch
load-balancing loss for MoE students (``objective="lm"``); the objectives are strategy objects
(``distill/objectives.py``).

    from m2d_jax.distill import run
    run(config)   # configs/distill/base.py
"""

from m2d_jax.distill.loss import (forward_kl_sums, fused_forward_kl_sums, load_balance_loss, next_token_ce_sums,
                                  router_load_observer, token_forward_kl)
from m2d_jax.distill.objectives import OBJECTIVES, ForwardKLDistillation, LanguageModeling, Objective
from m2d_jax.distill.schedule import wsd_schedule
from m2d_jax.distill.sharding import LOGICAL_AXIS_RULES, MESH_AXES, make_mesh, param_shardings
from m2d_jax.distill.train import check_config, load_for_mesh, make_train_step, run

__all__ = ["LOGICAL_AXIS_RULES", "MESH_AXES", "OBJECTIVES", "ForwardKLDistillation", "LanguageModeling", "Objective",
           "check_config", "forward_kl_sums", "fused_forward_kl_sums", "load_balance_loss", "load_for_mesh", "make_mesh", "make_train_step",
           "next_token_ce_sums", "param_shardings", "router_load_observer", "run", "token_forward_kl",
           "wsd_schedule"]
