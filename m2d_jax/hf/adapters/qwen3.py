"""Qwen3 dense (``qwen3``, the student family) and Qwen3-MoE (``qwen3_moe``)."""

from __future__ import annotations

from m2d_jax.hf.adapters.common import (ConfigReader, DecoderAdapter, common_hf_fields, expert_rules,
                                        llama_attention_rules, swiglu_mlp_rules)
from m2d_jax.hf.keymap import Linear, Rule, rule
from m2d_jax.models.config import ModelConfig


class Qwen3Adapter(DecoderAdapter):
    """Qwen3 dense (``qwen3``, the student family) and Qwen3-MoE (``qwen3_moe``)."""

    model_types = ("qwen3", "qwen3_moe")
    architectures = {"qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}
    defaults = {
        "qwen3": dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                      num_attention_heads=32, max_position_embeddings=32768, rms_norm_eps=1e-6,
                      sliding_window=4096, max_window_layers=28),
        "qwen3_moe": dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=24,
                          num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=32768,
                          rms_norm_eps=1e-6, sliding_window=4096, decoder_sparse_step=1, moe_intermediate_size=768,
                          num_experts_per_tok=8, num_experts=128),
    }

    def config_from_hf(self, hf: dict, source: str) -> ModelConfig:
        model_type = hf["model_type"]
        r = ConfigReader(hf, source, self.defaults[model_type])
        r.check_quantization()
        if r.get("hidden_act", default="silu") != "silu":
            r.fail("hidden_act", f"unsupported activation {r.get('hidden_act')!r} (expected 'silu')")
        fields = r.common_fields()
        layers = fields["num_layers"]
        sliding = r.get("sliding_window") if r.get("use_sliding_window", default=False) else None
        if model_type == "qwen3":
            layer_types = r.get("layer_types") or [
                "sliding_attention" if sliding is not None and i >= r.get("max_window_layers") else "full_attention"
                for i in range(layers)]
            ffn_kinds = ["dense"] * layers
            moe = None
        else:
            layer_types = ["sliding_attention" if sliding is not None else "full_attention"] * layers
            num_experts = int(r.get("num_experts", "num_local_experts"))
            step = int(r.get("decoder_sparse_step"))
            mlp_only = set(r.get("mlp_only_layers", default=[]))
            ffn_kinds = ["moe" if (i not in mlp_only and num_experts > 0 and (i + 1) % step == 0) else "dense"
                         for i in range(layers)]
            moe = None if "moe" not in ffn_kinds else dict(
                router=dict(top_k=int(r.get("num_experts_per_tok")),
                            norm_topk_prob=bool(r.get("norm_topk_prob", default=False))),
                experts=dict(num_experts=num_experts, intermediate_size=int(r.get("moe_intermediate_size"))))
        if len(layer_types) != layers:
            r.fail("layer_types", f"{len(layer_types)} entries for num_hidden_layers={layers}")
        fields["attention"].update(layer_types=layer_types, sliding_window=sliding, qk_norm="head")
        return r.build(**fields, ffn_kinds=ffn_kinds, moe=moe)

    def config_to_hf(self, config: ModelConfig) -> dict:
        """config.json of ``Qwen3ForCausalLM`` / ``Qwen3MoeForCausalLM`` for this model (the inverse of
        ``config_from_hf``); transformers loads it with no custom code."""
        a = config.attention
        sliding = [i for i, t in enumerate(a.layer_types) if t == "sliding_attention"]
        hf = dict(model_type=config.family, architectures=[self.architectures[config.family]],
                  **common_hf_fields(config), use_sliding_window=bool(sliding),
                  sliding_window=a.sliding_window if sliding else None)
        if config.family == "qwen3":
            hf.update(layer_types=list(a.layer_types),
                      max_window_layers=sliding[0] if sliding else config.num_layers)
        else:
            if sliding and len(sliding) != config.num_layers:
                raise ValueError("Qwen3-MoE has a sliding window on all layers or none; layer_types mixes both")
            router, experts = config.moe.router, config.moe.experts
            hf.update(num_experts=experts.num_experts, num_experts_per_tok=router.top_k,
                      moe_intermediate_size=experts.intermediate_size, norm_topk_prob=router.norm_topk_prob,
                      decoder_sparse_step=1,
                      mlp_only_layers=[i for i, kind in enumerate(config.ffn_kinds) if kind == "dense"])
        return hf

    def layer_rules(self, config: ModelConfig, kind: str, expert_layout: str = "per_expert") -> list[Rule]:
        pre = "model.layers.{layer}.mlp."
        rules = llama_attention_rules(config)
        if kind == "dense":
            return rules + swiglu_mlp_rules(pre, "mlp")
        return rules + [rule(pre + "gate.weight", "moe/router", transform=Linear(1))] + expert_rules(pre,
                                                                                                   expert_layout)
