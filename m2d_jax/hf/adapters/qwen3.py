"""Qwen3 dense (``qwen3``, the student family) and Qwen3-MoE (``qwen3_moe``)."""

from __future__ import annotations

from m2d_jax.hf.adapters.common import (ConfigReader, expert_rules, llama_attention_rules, swiglu_mlp_rules)
from m2d_jax.hf.keymap import Linear, Rule, rule
from m2d_jax.hf.safetensors_io import CheckpointError
from m2d_jax.models.config import ModelConfig


class Qwen3Adapter:
    """Qwen3 dense (``qwen3``, the student family) and Qwen3-MoE (``qwen3_moe``)."""

    model_types = ("qwen3", "qwen3_moe")
    architectures = {"qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}
    expert_layouts = ("per_expert", "fused")  # the first is the hub/on-disk layout, used for export
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
        act = r.get("hidden_act", default="silu")
        if act != "silu":
            r.fail("hidden_act", f"unsupported activation {act!r} (expected 'silu')")
        layers = int(r.get("num_hidden_layers"))
        heads = int(r.get("num_attention_heads"))
        hidden = int(r.get("hidden_size"))
        rope = r.rope()
        sliding = r.get("sliding_window") if r.get("use_sliding_window", default=False) else None
        if model_type == "qwen3":
            layer_types = r.get("layer_types") or [
                "sliding_attention" if sliding is not None and i >= r.get("max_window_layers") else "full_attention"
                for i in range(layers)]
            ffn_kinds = ["dense"] * layers
            moe = {}
        else:
            layer_types = ["sliding_attention" if sliding is not None else "full_attention"] * layers
            num_experts = int(r.get("num_experts", "num_local_experts"))
            step = int(r.get("decoder_sparse_step"))
            mlp_only = set(r.get("mlp_only_layers", default=[]))
            ffn_kinds = ["moe" if (i not in mlp_only and num_experts > 0 and (i + 1) % step == 0) else "dense"
                         for i in range(layers)]
            moe = dict(num_experts=num_experts, num_experts_per_tok=int(r.get("num_experts_per_tok")),
                       moe_intermediate_size=int(r.get("moe_intermediate_size")),
                       norm_topk_prob=bool(r.get("norm_topk_prob", default=False)))
        if len(layer_types) != layers:
            r.fail("layer_types", f"{len(layer_types)} entries for num_hidden_layers={layers}")
        try:
            return ModelConfig(
                family=model_type, vocab_size=int(r.get("vocab_size")), hidden_size=hidden, num_layers=layers,
                num_heads=heads, num_kv_heads=int(r.get("num_key_value_heads", default=heads)),
                head_dim=int(r.get("head_dim", default=hidden // heads)),
                intermediate_size=int(r.get("intermediate_size")), layer_types=tuple(layer_types),
                ffn_kinds=tuple(ffn_kinds), rms_norm_eps=float(r.get("rms_norm_eps")),
                max_position_embeddings=int(r.get("max_position_embeddings")),
                rope_theta=float(rope.pop("rope_theta")), rope_type=rope.pop("rope_type"),
                rope_params=tuple(sorted(rope.items())), sliding_window=sliding,
                tie_word_embeddings=bool(r.get("tie_word_embeddings", default=False)),
                attention_bias=bool(r.get("attention_bias", default=False)), qk_norm="head", hidden_act=act, **moe)
        except ValueError as err:
            raise CheckpointError(f"{source}: {err}") from err

    def global_rules(self, config: ModelConfig) -> list[Rule]:
        rules = [rule("model.embed_tokens.weight", "embed"), rule("model.norm.weight", "final_norm/scale")]
        if not config.tie_word_embeddings:
            rules.append(rule("lm_head.weight", "lm_head", transform=Linear(1)))
        return rules

    def layer_rules(self, config: ModelConfig, kind: str, expert_layout: str = "per_expert") -> list[Rule]:
        pre = "model.layers.{layer}.mlp."
        rules = llama_attention_rules(config)
        if kind == "dense":
            return rules + swiglu_mlp_rules(pre, "mlp")
        return rules + [rule(pre + "gate.weight", "moe/router", transform=Linear(1))] + expert_rules(pre,
                                                                                                   expert_layout)
