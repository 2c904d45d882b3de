"""allenai/OLMoE-1B-7B-0924: the hub ``config.json`` values (``OlmoeConfig`` fields), as data.

16 layers, 64 experts top-8 (not renormalised), full q/k RMSNorm, no QKV clipping. The published total is 6.9B
(1.3B active); ``tests/test_plan.py`` checks the exact count. The paper's student keeps k = 8 groups.
"""

from ml_collections import ConfigDict

STUDENT_GROUPS = 8  # k: the teacher's top-8


def get_config() -> ConfigDict:
    return ConfigDict(dict(
        model_type="olmoe",
        vocab_size=50304,
        hidden_size=2048,
        intermediate_size=1024,
        num_hidden_layers=16,
        num_attention_heads=16,
        num_key_value_heads=16,
        hidden_act="silu",
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        rope_scaling=None,
        attention_bias=False,
        clip_qkv=None,
        num_experts=64,
        num_experts_per_tok=8,
        norm_topk_prob=False,
        router_aux_loss_coef=0.01,
        tie_word_embeddings=False,
        torch_dtype="bfloat16",
    ))
