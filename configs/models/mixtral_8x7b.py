"""mistralai/Mixtral-8x7B-v0.1: the hub ``config.json`` values (``MixtralConfig`` fields), as data.

32 layers, GQA 32/8, 8 experts top-2 (renormalised), no sliding window. The published total is 46.7B (12.9B
active); ``tests/test_plan.py`` checks the exact count. The student keeps k = 2 groups.
"""

from ml_collections import ConfigDict

STUDENT_GROUPS = 2  # k: the teacher's top-2


def get_config() -> ConfigDict:
    return ConfigDict(dict(
        model_type="mixtral",
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        hidden_act="silu",
        max_position_embeddings=32768,
        rms_norm_eps=1e-5,
        rope_theta=1000000.0,
        sliding_window=None,
        num_local_experts=8,
        num_experts_per_tok=2,
        router_aux_loss_coef=0.02,
        tie_word_embeddings=False,
        torch_dtype="bfloat16",
    ))
