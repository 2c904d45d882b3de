"""Qwen/Qwen3-30B-A3B: the hub ``config.json`` values (transformers ``Qwen3MoeConfig`` fields), as data.

Every field below is the value of the published config.json (the `architectures`, token ids and transformers
version are left out: they do not describe the architecture). The counts in ``tests/test_plan.py`` check them against
the published totals (30.5B parameters, 3.3B active). The paper's student (docs/METHOD.md §9, §11) keeps k = 8 groups.
"""

from ml_collections import ConfigDict

STUDENT_GROUPS = 8  # k: groups per layer of the paper's dense student (its active size: top-8 of 128)


def get_config() -> ConfigDict:
    return ConfigDict(dict(
        model_type="qwen3_moe",
        vocab_size=151936,
        hidden_size=2048,
        intermediate_size=6144,
        num_hidden_layers=48,
        num_attention_heads=32,
        num_key_value_heads=4,
        head_dim=128,
        hidden_act="silu",
        max_position_embeddings=40960,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        rope_scaling=None,
        attention_bias=False,
        use_sliding_window=False,
        sliding_window=None,
        max_window_layers=48,
        decoder_sparse_step=1,
        moe_intermediate_size=768,
        num_experts=128,
        num_experts_per_tok=8,
        norm_topk_prob=True,
        mlp_only_layers=[],
        router_aux_loss_coef=0.001,
        tie_word_embeddings=False,
        torch_dtype="bfloat16",
    ))
