"""``m2d train-teacher configs/teachers/dense.py``: the shipped dense teacher (Qwen3 class) of about the MoE
teacher's TOTAL parameter count (FFN width = experts x expert width), trained like it on the same tokens."""

from ml_collections import ConfigDict

from m2d_jax.config_utils import load_config


def get_config() -> ConfigDict:
    config = load_config("teachers/moe")
    moe = config.model
    config.model = ConfigDict(dict(model_type="qwen3", **{k: moe[k] for k in (
        "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
        "max_position_embeddings", "rope_theta", "rms_norm_eps", "tie_word_embeddings")},
        intermediate_size=moe.num_experts * moe.moe_intermediate_size))
    return config
