"""DeepSeek-V2 / V2-Lite (``deepseek_v2``): MLA attention, shared experts, first_k_dense_replace dense layers,
float32 router with (group-limited) greedy top-k and routed_scaling_factor (no renormalisation in V2).

The dense student form is the same class with ``first_k_dense_replace = num_hidden_layers`` (every layer a dense
``DeepseekV2MLP`` of ``intermediate_size``), which this adapter loads like any other config.
"""

from __future__ import annotations

from m2d_jax.hf.adapters.common import (ConfigReader, DecoderAdapter, common_hf_fields, expert_rules,
                                        swiglu_mlp_rules)
from m2d_jax.hf.keymap import Linear, Rule, rule
from m2d_jax.models.config import ModelConfig


class DeepseekV2Adapter(DecoderAdapter):
    model_types = ("deepseek_v2",)
    architectures = {"deepseek_v2": "DeepseekV2ForCausalLM"}
    defaults = dict(vocab_size=102400, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                    num_attention_heads=32, max_position_embeddings=2048, rms_norm_eps=1e-6, first_k_dense_replace=0,
                    kv_lora_rank=512, q_lora_rank=1536, n_routed_experts=64, n_shared_experts=2,
                    qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, routed_scaling_factor=1.0,
                    topk_method="greedy", moe_intermediate_size=1407)
    topk_methods = ("greedy", "group_limited_greedy")

    def config_from_hf(self, hf: dict, source: str) -> ModelConfig:
        r = ConfigReader(hf, source, self.defaults)
        r.check_quantization()
        if r.get("hidden_act", default="silu") != "silu":
            r.fail("hidden_act", f"unsupported activation {r.get('hidden_act')!r} (expected 'silu')")
        fields = r.common_fields()
        layers, attention = fields["num_layers"], fields["attention"]
        topk_method = r.get("topk_method")
        if topk_method not in self.topk_methods:
            r.fail("topk_method", f"unsupported {topk_method!r} (supported: {self.topk_methods})")
        num_experts = int(r.get("n_routed_experts", "num_experts"))
        first_dense = int(r.get("first_k_dense_replace"))
        ffn_kinds = ["dense" if i < first_dense or num_experts == 0 else "moe" for i in range(layers)]
        nope, rope = int(r.get("qk_nope_head_dim")), int(r.get("qk_rope_head_dim"))
        moe_width = int(r.get("moe_intermediate_size"))
        moe = None
        if "moe" in ffn_kinds:
            if r.get("num_experts_per_tok") is None:
                r.fail("num_experts_per_tok", "must be set for a model with MoE layers")
            moe = dict(router=dict(top_k=int(r.get("num_experts_per_tok")), rule="softmax_topk_scaled",
                                   routed_scaling_factor=float(r.get("routed_scaling_factor")),
                                   topk_method=topk_method, n_group=int(r.get("n_group", default=1)),
                                   topk_group=int(r.get("topk_group", default=1))),
                       experts=dict(num_experts=num_experts, intermediate_size=moe_width,
                                    shared_size=moe_width * int(r.get("n_shared_experts", default=0) or 0)))
        q_lora = hf["q_lora_rank"] if "q_lora_rank" in hf else self.defaults["q_lora_rank"]  # null = no low-rank q
        attention.update(num_kv_heads=attention["num_heads"], head_dim=nope + rope,  # MLA: per-head k and v
                         layer_types=["full_attention"] * layers, qk_norm="none",
                         mla=dict(q_lora_rank=None if q_lora is None else int(q_lora),
                                  kv_lora_rank=int(r.get("kv_lora_rank")), qk_nope_head_dim=nope,
                                  qk_rope_head_dim=rope, v_head_dim=int(r.get("v_head_dim"))))
        fields["ffn"].update(bias=bool(r.get("mlp_bias", default=False)))
        return r.build(**fields, ffn_kinds=ffn_kinds, moe=moe)

    def config_to_hf(self, config: ModelConfig) -> dict:
        """config.json of ``DeepseekV2ForCausalLM`` (the inverse of ``config_from_hf``). Dense layers must come
        first (``first_k_dense_replace``); the all-dense student has ``first_k_dense_replace = num_hidden_layers``."""
        first_moe = config.ffn_kinds.index("moe") if config.is_moe else config.num_layers
        if any(kind != "moe" for kind in config.ffn_kinds[first_moe:]):
            raise ValueError(f"DeepSeek-V2 needs its dense layers first; ffn_kinds={config.ffn_kinds}")
        mla = config.attention.mla
        hf = dict(common_hf_fields(config), model_type="deepseek_v2",
                  architectures=[self.architectures["deepseek_v2"]], head_dim=mla.qk_rope_head_dim,
                  first_k_dense_replace=first_moe, kv_lora_rank=mla.kv_lora_rank, q_lora_rank=mla.q_lora_rank,
                  qk_nope_head_dim=mla.qk_nope_head_dim, qk_rope_head_dim=mla.qk_rope_head_dim,
                  v_head_dim=mla.v_head_dim, mlp_bias=config.ffn.bias)
        if config.is_moe:
            router, experts = config.moe.router, config.moe.experts
            hf.update(n_routed_experts=experts.num_experts, num_experts_per_tok=router.top_k,
                      moe_intermediate_size=experts.intermediate_size, norm_topk_prob=False,
                      n_shared_experts=experts.shared_size // experts.intermediate_size,
                      routed_scaling_factor=router.routed_scaling_factor, topk_method=router.topk_method,
                      n_group=router.n_group, topk_group=router.topk_group)
        return hf

    def layer_rules(self, config: ModelConfig, kind: str, expert_layout: str = "per_expert") -> list[Rule]:
        pre = "model.layers.{layer}."
        att = pre + "self_attn."
        rules = [rule(pre + "input_layernorm.weight", "input_norm/scale"),
                 rule(pre + "post_attention_layernorm.weight", "post_attn_norm/scale"),
                 rule(att + "kv_a_proj_with_mqa.weight", "attn/kv_a_proj/kernel", transform=Linear(1)),
                 rule(att + "kv_a_layernorm.weight", "attn/kv_a_norm/scale"),
                 rule(att + "kv_b_proj.weight", "attn/kv_b_proj/kernel", transform=Linear(1)),
                 rule(att + "o_proj.weight", "attn/o_proj/kernel", transform=Linear(2))]
        mla = config.attention.mla
        if mla.q_lora_rank is None:
            rules.append(rule(att + "q_proj.weight", "attn/q_proj/kernel", transform=Linear(1)))
        else:
            rules += [rule(att + "q_a_proj.weight", "attn/q_a_proj/kernel", transform=Linear(1)),
                      rule(att + "q_a_layernorm.weight", "attn/q_a_norm/scale"),
                      rule(att + "q_b_proj.weight", "attn/q_b_proj/kernel", transform=Linear(1))]
        if config.attention.bias:
            rules += [rule(att + "q_a_proj.bias", "attn/q_a_proj/bias")] if mla.q_lora_rank is not None else []
            rules += [rule(att + "kv_a_proj_with_mqa.bias", "attn/kv_a_proj/bias"),
                      rule(att + "o_proj.bias", "attn/o_proj/bias")]
        mlp = pre + "mlp."
        if kind == "dense":
            return rules + swiglu_mlp_rules(mlp, "mlp", config.ffn.bias)
        rules += [rule(mlp + "gate.weight", "moe/router", transform=Linear(1))] + expert_rules(mlp, expert_layout)
        if config.moe.experts.shared_size:
            rules += swiglu_mlp_rules(mlp + "shared_experts.", "moe/shared", config.ffn.bias)
        return rules
