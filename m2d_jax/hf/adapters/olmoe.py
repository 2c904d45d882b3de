"""OLMoE (``olmoe``) and Mixtral (``mixtral``): Llama-style attention with softmax -> top-k routing.

OLMoE: q/k RMSNorm over the whole projection, optional ``clip_qkv``, top-k renormalised iff ``norm_topk_prob``;
Mixtral: old on-disk names (``block_sparse_moe``, experts ``w1``/``w3``/``w2``), always renormalised, optional
sliding window on every layer. In both, ``intermediate_size`` is the expert width and every layer is MoE.
"""

from __future__ import annotations

from m2d_jax.hf.adapters.common import (ConfigReader, DecoderAdapter, common_hf_fields, expert_rules,
                                        llama_attention_rules)
from m2d_jax.hf.keymap import Linear, Rule, rule
from m2d_jax.models.config import ModelConfig


class OlmoeMixtralAdapter(DecoderAdapter):
    model_types = ("olmoe", "mixtral")
    architectures = {"olmoe": "OlmoeForCausalLM", "mixtral": "MixtralForCausalLM"}
    defaults = {
        "olmoe": dict(vocab_size=50304, hidden_size=2048, intermediate_size=2048, num_hidden_layers=16,
                      num_attention_heads=16, max_position_embeddings=4096, rms_norm_eps=1e-5,
                      num_experts_per_tok=8, num_experts=64),
        "mixtral": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                        rms_norm_eps=1e-5, num_experts_per_tok=2, num_local_experts=8),
    }

    def config_from_hf(self, hf: dict, source: str) -> ModelConfig:
        model_type = hf["model_type"]
        r = ConfigReader(hf, source, self.defaults[model_type])
        r.check_quantization()
        if r.get("hidden_act", default="silu") != "silu":
            r.fail("hidden_act", f"unsupported activation {r.get('hidden_act')!r} (expected 'silu')")
        fields = r.common_fields()
        layers, attention = fields["num_layers"], fields["attention"]
        router = dict(top_k=int(r.get("num_experts_per_tok")))
        if model_type == "olmoe":
            attention["head_dim"] = fields["hidden_size"] // attention["num_heads"]  # OLMoE has no head_dim field
            num_experts = int(r.get("num_experts", "num_local_experts"))
            attention.update(qk_norm="full", clip_qkv=r.get("clip_qkv"))
            router.update(norm_topk_prob=bool(r.get("norm_topk_prob", default=False)))
            sliding = None
        else:
            num_experts = int(r.get("num_local_experts", "num_experts"))
            attention.update(qk_norm="none")
            router.update(norm_topk_prob=True)
            sliding = r.get("sliding_window")
        layer_type = "full_attention" if sliding is None else "sliding_attention"
        attention.update(layer_types=[layer_type] * layers, sliding_window=sliding)
        experts = dict(num_experts=num_experts, intermediate_size=fields["ffn"]["intermediate_size"])
        return r.build(**fields, ffn_kinds=["moe"] * layers, moe=dict(router=router, experts=experts))

    def config_to_hf(self, config: ModelConfig) -> dict:
        """config.json of ``OlmoeForCausalLM`` / ``MixtralForCausalLM`` (the inverse of ``config_from_hf``)."""
        router, experts = config.moe.router, config.moe.experts
        hf = dict(common_hf_fields(config), model_type=config.family,
                  architectures=[self.architectures[config.family]], intermediate_size=experts.intermediate_size,
                  num_experts_per_tok=router.top_k)
        if config.family == "olmoe":
            del hf["head_dim"]  # OLMoE derives it from hidden_size / heads
            hf.update(num_experts=experts.num_experts, norm_topk_prob=router.norm_topk_prob,
                      clip_qkv=config.attention.clip_qkv)
        else:
            hf.update(num_local_experts=experts.num_experts, sliding_window=config.attention.sliding_window)
        return hf

    def layer_rules(self, config: ModelConfig, kind: str, expert_layout: str = "per_expert") -> list[Rule]:
        if config.family == "mixtral" and expert_layout == "per_expert":
            pre = "model.layers.{layer}.block_sparse_moe."
            names = ("w1", "w3", "w2")
        else:
            pre, names = "model.layers.{layer}.mlp.", ("gate_proj", "up_proj", "down_proj")
        return (llama_attention_rules(config) + [rule(pre + "gate.weight", "moe/router", transform=Linear(1))]
                + expert_rules(pre, expert_layout, names))
