"""A tiny random Qwen3-MoE teacher (transformers ``Qwen3MoeConfig`` kwargs) for the demo and quick checks."""

from ml_collections import ConfigDict


def get_config() -> ConfigDict:
    return ConfigDict(dict(
        model_type="qwen3_moe",
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,  # width of dense (mlp_only) layers
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,  # != hidden_size / heads on purpose
        moe_intermediate_size=32,
        num_experts=16,
        num_experts_per_tok=4,
        norm_topk_prob=True,
        mlp_only_layers=[],
        decoder_sparse_step=1,
        max_position_embeddings=256,
        rope_theta=10000.0,
        tie_word_embeddings=False,
    ))
