"""openai/gpt-oss-20b: the hub ``config.json`` values (``GptOssConfig`` fields), as data.

24 layers alternating sliding-window (128) and full attention with sinks, 32 experts top-4 with biases and the
clamped SwiGLU (limit 7), YaRN RoPE (factor 32), MXFP4-quantised experts on disk. The published total is 20.9B
(3.6B active); ``tests/test_plan.py`` checks the exact count. The paper's student keeps k = 4 groups.
"""

from ml_collections import ConfigDict

STUDENT_GROUPS = 4  # k: the teacher's top-4


def get_config() -> ConfigDict:
    return ConfigDict(dict(
        model_type="gpt_oss",
        vocab_size=201088,
        hidden_size=2880,
        intermediate_size=2880,
        num_hidden_layers=24,
        num_attention_heads=64,
        num_key_value_heads=8,
        head_dim=64,
        hidden_act="silu",
        max_position_embeddings=131072,
        initial_context_length=4096,
        rms_norm_eps=1e-5,
        rope_theta=150000,
        rope_scaling=dict(rope_type="yarn", factor=32.0, original_max_position_embeddings=4096, beta_fast=32.0,
                          beta_slow=1.0, truncate=False),
        attention_bias=True,
        sliding_window=128,
        layer_types=["sliding_attention", "full_attention"] * 12,
        num_local_experts=32,
        num_experts_per_tok=4,
        experts_per_token=4,
        swiglu_limit=7.0,
        router_aux_loss_coef=0.9,
        tie_word_embeddings=False,
        quantization_config=dict(quant_method="mxfp4", modules_to_not_convert=[
            "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]),
    ))
