"""GPT-OSS (``gpt_oss``): attention with q/k/v/o biases and learned sinks, alternating sliding-window / full layers,
YaRN RoPE; router with bias, top-k over logits then softmax over the k; experts with biases, interleaved
``gate_up_proj`` stored input-major [E, H, 2I], clamped SwiGLU; RMSNorm weight applied in float32.

Real releases store experts in MXFP4 (``*_blocks`` / ``*_scales``, ``quantization_config.quant_method: mxfp4``);
import dequantizes them tensor by tensor. The dense student form is the same class with ``num_local_experts = 1``
and top-1 (softmax over one logit = 1).
"""

from __future__ import annotations

from m2d_jax.hf.adapters.common import ConfigReader, DecoderAdapter, common_hf_fields, llama_attention_rules
from m2d_jax.hf.keymap import InterleavedGateUp, Linear, Rule, rule
from m2d_jax.models.config import ModelConfig


class GptOssAdapter(DecoderAdapter):
    model_types = ("gpt_oss",)
    architectures = {"gpt_oss": "GptOssForCausalLM"}
    expert_layouts = ("fused_input_major",)
    quantization_methods = ("mxfp4",)
    defaults = dict(vocab_size=201088, hidden_size=2880, intermediate_size=2880, num_hidden_layers=36,
                    num_attention_heads=64, num_key_value_heads=8, head_dim=64, sliding_window=128,
                    max_position_embeddings=131072, rms_norm_eps=1e-5, num_experts_per_tok=4, num_local_experts=128,
                    swiglu_alpha=1.702, swiglu_limit=7.0, attention_bias=True,
                    rope_parameters={"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                                     "truncate": False, "original_max_position_embeddings": 4096})

    def config_from_hf(self, hf: dict, source: str) -> ModelConfig:
        r = ConfigReader(hf, source, self.defaults)
        r.check_quantization(self.quantization_methods)
        fields = r.common_fields()
        layers = fields["num_layers"]
        layer_types = r.get("layer_types") or ["sliding_attention" if (i + 1) % 2 else "full_attention"
                                               for i in range(layers)]
        if len(layer_types) != layers:
            r.fail("layer_types", f"{len(layer_types)} entries for num_hidden_layers={layers}")
        width = fields["ffn"]["intermediate_size"]  # GPT-OSS's intermediate_size is the expert width
        fields["attention"].update(layer_types=layer_types, sliding_window=int(r.get("sliding_window")),
                                   qk_norm="none", sinks=True)
        fields["norm"].update(weight_in_float32=True)
        fields["ffn"].update(activation="clamped_swiglu", swiglu_alpha=float(r.get("swiglu_alpha")),
                             swiglu_limit=float(r.get("swiglu_limit")))
        moe = dict(router=dict(top_k=int(r.get("num_experts_per_tok")), rule="topk_softmax", bias=True),
                   experts=dict(num_experts=int(r.get("num_local_experts", "num_experts")), intermediate_size=width,
                                bias=True))
        return r.build(**fields, ffn_kinds=["moe"] * layers, moe=moe)

    def config_to_hf(self, config: ModelConfig) -> dict:
        """config.json of ``GptOssForCausalLM`` (the inverse of ``config_from_hf``; the 1-expert student too)."""
        router, experts = config.moe.router, config.moe.experts
        return dict(common_hf_fields(config), model_type="gpt_oss", architectures=[self.architectures["gpt_oss"]],
                    hidden_act="silu", intermediate_size=experts.intermediate_size,
                    layer_types=list(config.attention.layer_types), sliding_window=config.attention.sliding_window,
                    num_local_experts=experts.num_experts, num_experts_per_tok=router.top_k,
                    swiglu_alpha=config.ffn.swiglu_alpha, swiglu_limit=config.ffn.swiglu_limit)

    def layer_rules(self, config: ModelConfig, kind: str, expert_layout: str = "fused_input_major") -> list[Rule]:
        mlp = "model.layers.{layer}.mlp."
        return llama_attention_rules(config) + [
            rule(mlp + "router.weight", "moe/router", transform=Linear(1)),
            rule(mlp + "router.bias", "moe/router_bias"),
            rule(mlp + "experts.gate_up_proj", "moe/gate_proj", "moe/up_proj", transform=InterleavedGateUp()),
            rule(mlp + "experts.gate_up_proj_bias", "moe/gate_bias", "moe/up_bias", transform=InterleavedGateUp()),
            rule(mlp + "experts.down_proj", "moe/down_proj"),
            rule(mlp + "experts.down_proj_bias", "moe/down_bias"),
        ]
