"""``m2d train-teacher configs/teachers/dense_active.py``: the acceptance baseline (not shipped), a dense Qwen3 of the
MoE teacher's ACTIVE parameter count (FFN width = top-k x expert width), trained like it on the same tokens."""

from ml_collections import ConfigDict

from m2d_jax.config_utils import load_config


def get_config() -> ConfigDict:
    config = load_config("teachers/dense")
    moe = load_config("teachers/moe").model
    config.model.intermediate_size = moe.num_experts_per_tok * moe.moe_intermediate_size
    return config
