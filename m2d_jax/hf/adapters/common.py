"""Pieces shared by family adapters: a config.json reader and the key-map rules common to several families."""

from __future__ import annotations

import abc
from typing import Any

from m2d_jax.hf.keymap import Flat, FusedGateUp, Linear, Rule, StackedLinear, rule
from m2d_jax.errors import CheckpointError
from m2d_jax.models.config import ROPE_TYPES, ModelConfig

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
        params = dict(self.get("rope_parameters") or {})
        scaling = self.hf.get("rope_scaling")
        if scaling:
            params.update(scaling)
        if "type" in params and "rope_type" not in params:
            params["rope_type"] = params.pop("type")
        params.setdefault("rope_type", "default")
        params.setdefault("rope_theta", self.get("rope_theta", default=10000.0))
        if params["rope_type"] not in ROPE_TYPES:
            field = "rope_scaling" if scaling else "rope_parameters"
            self.fail(field, f"unsupported RoPE type {params['rope_type']!r} "
                             f"(supported for this family: {ROPE_TYPES})")
        return params

    def check_quantization(self, supported: tuple[str, ...] = ()):
        method = (self.hf.get("quantization_config") or {}).get("quant_method")
        if method is not None and method not in supported:
            self.fail("quantization_config", f"unsupported quantization method {method!r} "
                                             f"(supported for this family: {supported or 'none'})")
        return method

    def common_fields(self) -> dict:
        """``ModelConfig`` fields (nested specs as dicts) that every decoder family spells the same way in
        config.json; adapters complete ``attention`` and ``ffn`` and add ``ffn_kinds`` / ``moe``."""
        heads, hidden = int(self.get("num_attention_heads")), int(self.get("hidden_size"))
        rope = self.rope()
        return dict(
            family=self.hf["model_type"], vocab_size=int(self.get("vocab_size")), hidden_size=hidden,
            num_layers=int(self.get("num_hidden_layers")),
            max_position_embeddings=int(self.get("max_position_embeddings")),
            tie_word_embeddings=bool(self.get("tie_word_embeddings", default=False)),
            attention=dict(num_heads=heads, num_kv_heads=int(self.get("num_key_value_heads", default=heads)),
                           head_dim=int(self.get("head_dim", default=hidden // heads)),
                           bias=bool(self.get("attention_bias", default=False))),
            ffn=dict(intermediate_size=int(self.get("intermediate_size"))),
            rope=dict(theta=float(rope.pop("rope_theta")), type=rope.pop("rope_type"), params=rope),
            norm=dict(eps=float(self.get("rms_norm_eps"))))

    def build(self, **fields) -> ModelConfig:
        """The ``ModelConfig`` of nested field dicts; an invalid value is a ``CheckpointError`` naming this file."""
        try:
            return ModelConfig.from_dict(fields)
        except (ValueError, TypeError) as err:
            raise CheckpointError(f"{self.source}: {err}") from err


def common_hf_fields(config: ModelConfig) -> dict:
    """config.json fields every decoder family spells the same way (the inverse of ``ConfigReader.common_fields``),
    in transformers-v5 style (``rope_parameters``)."""
    a = config.attention
    return dict(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.ffn.intermediate_size,
        num_hidden_layers=config.num_layers, num_attention_heads=a.num_heads, num_key_value_heads=a.num_kv_heads,
        head_dim=a.head_dim, hidden_act=config.ffn.activation, max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.norm.eps,
        rope_parameters={"rope_type": config.rope.type, "rope_theta": config.rope.theta, **config.rope.param},
        tie_word_embeddings=config.tie_word_embeddings, attention_bias=a.bias)


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
    if config.attention.bias:
        rules += [rule(pre + f"self_attn.{p}_proj.bias", f"attn/{p}_proj/bias", transform=Flat()) for p in "qkvo"]
    if config.attention.qk_norm in ("head", "full"):
        rules += [rule(pre + "self_attn.q_norm.weight", "attn/q_norm/scale"),
                  rule(pre + "self_attn.k_norm.weight", "attn/k_norm/scale")]
    if config.attention.sinks:
        rules.append(rule(pre + "self_attn.sinks", "attn/sinks"))
    return rules


def swiglu_mlp_rules(prefix: str, path: str, bias: bool = False) -> list[Rule]:
    rules = [rule(prefix + f"{p}_proj.weight", f"{path}/{p}_proj/kernel", transform=Linear(1))
             for p in ("gate", "up", "down")]
    if bias:
        rules += [rule(prefix + f"{p}_proj.bias", f"{path}/{p}_proj/bias") for p in ("gate", "up", "down")]
    return rules


def expert_rules(prefix: str, layout: str, names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
                 ) -> list[Rule]:
    """Routed experts: ``per_expert`` (hub files, what save_pretrained writes; ``names`` of the gate/up/down
    modules, e.g. Mixtral's w1/w3/w2) or ``fused`` (transformers-v5 in-memory layout)."""
    if layout == "per_expert":
        return [rule(prefix + "experts.{expert}." + f"{name}.weight", f"moe/{p}_proj", transform=Linear(1))
                for name, p in zip(names, ("gate", "up", "down"))]
    if layout == "fused":
        return [rule(prefix + "experts.gate_up_proj", "moe/gate_proj", "moe/up_proj", transform=FusedGateUp()),
                rule(prefix + "experts.down_proj", "moe/down_proj", transform=StackedLinear())]
    raise ValueError(f"unknown expert layout {layout!r}")


class DecoderAdapter(abc.ABC):
    """A family: what a new family implements to be imported, converted and exported.

    Declare ``model_types`` (the HF ``model_type`` values it reads), ``architectures`` (model_type -> the HF class
    name written on export) and ``expert_layouts`` (on-disk layouts of routed experts it reads; ``[0]`` is the hub
    layout that export writes), and implement ``config_from_hf``, ``config_to_hf`` and ``layer_rules``. The global
    (non-layer) keys are shared by every family (``global_rules``).
    """

    model_types: tuple[str, ...]
    architectures: dict[str, str]
    expert_layouts: tuple[str, ...] = ("per_expert", "fused")

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        abstract = any(getattr(getattr(cls, name), "__isabstractmethod__", False)
                       for name in DecoderAdapter.__abstractmethods__)
        if not abstract:  # a concrete family: its declarations must be complete
            for name in ("model_types", "architectures", "expert_layouts"):
                if not getattr(cls, name, None):
                    raise TypeError(f"family adapter {cls.__name__} must declare {name}")
            missing = sorted(set(cls.model_types) - set(cls.architectures))
            if missing:
                raise TypeError(f"family adapter {cls.__name__}: no architectures entry for {missing}")

    @abc.abstractmethod
    def config_from_hf(self, hf: dict, source: str) -> ModelConfig:
        """The architecture of a raw config.json dict (``source`` names the file in every ``CheckpointError``)."""

    @abc.abstractmethod
    def config_to_hf(self, config: ModelConfig) -> dict:
        """The inverse: a config.json dict for the family's transformers class (no custom code needed)."""

    @abc.abstractmethod
    def layer_rules(self, config: ModelConfig, kind: str, expert_layout: str) -> list[Rule]:
        """Key-map rules of one decoder layer of FFN ``kind`` ("dense" or "moe") in ``expert_layout``."""

    def global_rules(self, config: ModelConfig) -> list[Rule]:
        rules = [rule("model.embed_tokens.weight", "embed"), rule("model.norm.weight", "final_norm/scale")]
        if not config.tie_word_embeddings:
            rules.append(rule("lm_head.weight", "lm_head", transform=Linear(1)))
        return rules
