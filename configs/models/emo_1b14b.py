"""EMO / StdMoE 1B-active 14B-total (``allenai/Emo_1b14b_1T``, ``allenai/StdMoE_1b14b_1T``): the config.json
fields of the fork's ``flex_olmo_noqknorm_prenorm`` class, as data.

127 routed experts + 1 shared, 7 routed + the shared one per token: the shared expert is the router's last expert
(``num_shared_experts`` 1 of ``num_experts`` 128, ``num_experts_per_tok`` 8), read as E = 127 routed experts, k = 7,
and a shared block of width 1024 (docs/METHOD.md §1). The released config.json was not available here: the expert
counts and top-k are the published ones (128 experts, 1 shared, 8 active); the sizes are those of the OLMoE-1B-7B
recipe it was trained with (``olmoe-1B-7B`` train script, OLMoE tokenizer; no q/k norm, pre-norm blocks) and the
rest the fork's defaults (``rope_theta`` 5e5, ``rms_norm_eps`` 1e-6). The dense student (Llama, FFN width
7 * 1024 + 1024 = 8192) has 1,279,854,592 parameters (``m2d_jax.info.summarize``; tests/test_flexolmo.py).
"""

from ml_collections import ConfigDict

STUDENT_GROUPS = 7  # k: the 7 routed experts per token (the shared block is carried whole, not a group)


def get_config() -> ConfigDict:
    return ConfigDict(dict(
        model_type="flex_olmo_noqknorm_prenorm",
        architectures=["FlexOlmoNoQKNormPrenormForCausalLM"],
        vocab_size=50304,
        hidden_size=2048,
        intermediate_size=1024,  # width of each expert (routed and shared)
        num_hidden_layers=16,
        num_attention_heads=16,
        num_key_value_heads=16,
        hidden_act="silu",
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        rope_theta=500000.0,
        attention_bias=False,
        tie_word_embeddings=False,
        num_experts=128,  # 127 routed + the shared one (the last)
        num_shared_experts=1,
        num_experts_per_tok=8,  # 7 routed + the shared one
        norm_topk_prob=False,
    ))
