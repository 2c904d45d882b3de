"""Pieces shared by family adapters: a config.json reader and the key-map rules common to several families."""

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
