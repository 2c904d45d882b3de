"""Tiny teachers shared by the conversion and export tests."""


def identity_teacher_config(norm_topk_prob=True):
    """E = k = 4 experts (all selected), a dense mlp_only layer narrower (96) than k*m = 128, GQA, untied."""
    return dict(model_type="qwen3_moe", vocab_size=128, hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, moe_intermediate_size=32, num_experts=4,
                num_experts_per_tok=4, norm_topk_prob=norm_topk_prob, mlp_only_layers=[1],
                max_position_embeddings=64, tie_word_embeddings=False)


# Teachers with E = k (every expert selected): name -> (HF config, student family, student FFN width)
IDENTITY_TEACHERS = {
    "qwen3_moe_norm": (dict(identity_teacher_config(True)), "qwen3", 4 * 32),
    "qwen3_moe_unnorm": (dict(identity_teacher_config(False)), "qwen3", 4 * 32),
    # MLA, 2 shared experts (width 32, appended with c = 1), dense layer 0 of width 80 < 4*16 + 32 (zero-padded),
    # un-normalised router with rho = 1.5
    "deepseek_v2": (dict(model_type="deepseek_v2", vocab_size=128, hidden_size=48, intermediate_size=80,
                         num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, moe_intermediate_size=16,
                         n_routed_experts=4, num_experts_per_tok=4, n_shared_experts=2, first_k_dense_replace=1,
                         routed_scaling_factor=1.5, kv_lora_rank=16, q_lora_rank=None, qk_nope_head_dim=8,
                         qk_rope_head_dim=8, v_head_dim=8, max_position_embeddings=64, tie_word_embeddings=False,
                         topk_method="greedy", norm_topk_prob=False), "deepseek_v2", 4 * 16 + 32),
    # router bias, expert biases, clamped SwiGLU, sinks, sliding/full layers; student = 1 expert of width 4*16
    "gpt_oss": (dict(model_type="gpt_oss", vocab_size=128, hidden_size=48, intermediate_size=16, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=12, num_local_experts=4,
                     num_experts_per_tok=4, sliding_window=8, layer_types=["sliding_attention", "full_attention"],
                     max_position_embeddings=64, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                     tie_word_embeddings=False, eos_token_id=0, pad_token_id=0, bos_token_id=0), "gpt_oss", 4 * 16),
    # OLMoE: full-projection q/k norm, clip_qkv, un-normalised top-k; student = OLMoE with 1 expert of width 4*16
    "olmoe": (dict(model_type="olmoe", vocab_size=128, hidden_size=48, intermediate_size=16, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=4,
                   norm_topk_prob=False, clip_qkv=2.0, max_position_embeddings=64, tie_word_embeddings=False,
                   eos_token_id=0, pad_token_id=0, bos_token_id=0), "olmoe", 4 * 16),
    # FlexOlmo: post-norm layers, full q/k norm, un-normalised top-k; student = OLMo2 (Olmo2ForCausalLM)
    "flex_olmo": (dict(model_type="flex_olmo", vocab_size=128, hidden_size=48, intermediate_size=16,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_experts=4,
                       num_experts_per_tok=4, norm_topk_prob=False, max_position_embeddings=64,
                       tie_word_embeddings=False, eos_token_id=0, pad_token_id=0), "olmo2", 4 * 16),
    # Mixtral: old on-disk names, always renormalised, sliding window; student = Mixtral with 1 expert
    "mixtral": (dict(model_type="mixtral", vocab_size=128, hidden_size=48, intermediate_size=16, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=12, num_local_experts=4,
                     num_experts_per_tok=4, sliding_window=8, max_position_embeddings=64,
                     tie_word_embeddings=False), "mixtral", 4 * 16),
}
