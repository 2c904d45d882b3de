"""deepseek-ai/DeepSeek-V2-Lite: the hub ``config.json`` values (``DeepseekV2Config`` fields), as data.

MLA attention without a query low-rank (q_lora_rank null), 64 routed experts (top-6, softmax, greedy, not
renormalised) + 2 shared experts, layer 0 dense, YaRN RoPE. The published total is 15.7B parameters (2.4B active);
``tests/test_plan.py`` checks the exact count. The paper's student keeps k = 6 groups (+ the shared experts).
"""

from ml_collections import ConfigDict

STUDENT_GROUPS = 6  # k: the teacher's top-6


def get_config() -> ConfigDict:
    return ConfigDict(dict(
        model_type="deepseek_v2",
        vocab_size=102400,
        hidden_size=2048,
        intermediate_size=10944,  # the dense layer 0
        num_hidden_layers=27,
        num_attention_heads=16,
        num_key_value_heads=16,
        hidden_act="silu",
        max_position_embeddings=163840,
        rms_norm_eps=1e-6,
        rope_theta=10000,
        rope_scaling=dict(type="yarn", factor=40, original_max_position_embeddings=4096, beta_fast=32, beta_slow=1,
                          mscale=0.707, mscale_all_dim=0.707),
        attention_bias=False,
        q_lora_rank=None,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        first_k_dense_replace=1,
        moe_layer_freq=1,
        moe_intermediate_size=1408,
        n_routed_experts=64,
        n_shared_experts=2,
        num_experts_per_tok=6,
        norm_topk_prob=False,
        routed_scaling_factor=1.0,
        scoring_func="softmax",
        topk_method="greedy",
        n_group=1,
        topk_group=1,
        aux_loss_alpha=0.001,
        seq_aux=True,
        tie_word_embeddings=False,
        torch_dtype="bfloat16",
    ))
