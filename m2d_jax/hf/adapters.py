"""Family adapters: the small declarative difference between HF families.

An adapter turns a raw ``config.json`` dict into a ``ModelConfig`` and lists the key-map rules of its on-disk
layout(s). Raw JSON is parsed here (not through transformers' config classes) so that import never loads torch;
missing keys take the defaults of the transformers config class, and both hub-style (``rope_theta`` /
``rope_scaling``, ``num_experts``) and transformers-v5 (``rope_parameters``, ``num_local_experts``) names are read.
"""

from __future__ import annotations

from typing import Any

from m2d_jax.hf.keymap import Flat, FusedGateUp, Linear, Rule, StackedLinear, rule
from m2d_jax.hf.safetensors_io import CheckpointError
from m2d_jax.models.config import ModelConfig
from m2d_jax.models.layers import SUPPORTED_ROPE_TYPES

# Checkpoint keys that carry no parameters (old exports saved RoPE buffers).
IGNORED_KEY_SUFFIXES = ("rotary_emb.inv_freq",)


class ConfigReader:
    """Reads fields of one config.json with class defaults, naming the file in every error."""

    def __init__(self, hf: dict, source: str, defaults: dict[str, Any]):
        self.hf, self.source, self.defaults = hf, source, defaults

    def get(self, *names: str, default: Any = None) -> Any:
        for name in names:
            if name in self.hf and self.hf[name] is not None:
                return self.hf[name]
        return self.defaults.get(names[0], default)

    def fail(self, field: str, msg: str):
        raise CheckpointError(f"{self.source}: field {field!r}: {msg}")

    def rope(self) -> dict:
        """v5 ``rope_parameters`` or v4 ``rope_theta`` + ``rope_scaling`` -> one dict with rope_type, rope_theta."""
        params = dict(self.hf.get("rope_parameters") or {})
        scaling = self.hf.get("rope_scaling")
        if scaling:
            params.update(scaling)
        if "type" in params and "rope_type" not in params:
            params["rope_type"] = params.pop("type")
        params.setdefault("rope_type", "default")
        params.setdefault("rope_theta", self.get("rope_theta", default=10000.0))
        if params["rope_type"] not in SUPPORTED_ROPE_TYPES:
            field = "rope_scaling" if scaling else "rope_parameters"
            self.fail(field, f"unsupported RoPE type {params['rope_type']!r} "
                             f"(supported for this family: {SUPPORTED_ROPE_TYPES})")
        return params


def llama_attention_rules(config: ModelConfig) -> list[Rule]:
    """q/k/v/o projections (+ biases) and the two layer norms, in the Llama/Qwen key layout."""
    pre = "model.layers.{layer}."
    rules = [
        rule(pre + "input_layernorm.weight", "input_norm/scale"),
        rule(pre + "post_attention_layernorm.weight", "post_attn_norm/scale"),
        rule(pre + "self_attn.q_proj.weight", "attn/q_proj/kernel", transform=Linear(1)),
        rule(pre + "self_attn.k_proj.weight", "attn/k_proj/kernel", transform=Linear(1)),
        rule(pre + "self_attn.v_proj.weight", "attn/v_proj/kernel", transform=Linear(1)),
        rule(pre + "self_attn.o_proj.weight", "attn/o_proj/kernel", transform=Linear(2)),
    ]
    if config.attention_bias:
        rules += [rule(pre + f"self_attn.{p}_proj.bias", f"attn/{p}_proj/bias", transform=Flat()) for p in "qkvo"]
    if config.qk_norm == "head":
        rules += [rule(pre + "self_attn.q_norm.weight", "attn/q_norm/scale"),
                  rule(pre + "self_attn.k_norm.weight", "attn/k_norm/scale")]
    return rules


def swiglu_mlp_rules(prefix: str, path: str) -> list[Rule]:
    return [rule(prefix + f"{p}_proj.weight", f"{path}/{p}_proj/kernel", transform=Linear(1))
            for p in ("gate", "up", "down")]


def expert_rules(prefix: str, layout: str) -> list[Rule]:
    """Routed experts: ``per_expert`` (hub files, what save_pretrained writes) or ``fused`` (v5 in-memory)."""
    if layout == "per_expert":
        return [rule(prefix + "experts.{expert}." + f"{p}_proj.weight", f"moe/{p}_proj", transform=Linear(1))
                for p in ("gate", "up", "down")]
    if layout == "fused":
        return [rule(prefix + "experts.gate_up_proj", "moe/gate_proj", "moe/up_proj", transform=FusedGateUp()),
                rule(prefix + "experts.down_proj", "moe/down_proj", transform=StackedLinear())]
    raise ValueError(f"unknown expert layout {layout!r}")


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


ADAPTERS = {t: a for a in (Qwen3Adapter(),) for t in a.model_types}


def adapter_for(model_type: str | None, source: str):
    if model_type not in ADAPTERS:
        raise CheckpointError(f"{source}: unsupported model_type {model_type!r} "
                              f"(supported: {', '.join(sorted(ADAPTERS))})")
    return ADAPTERS[model_type]
