"""FlexOlmo (``flex_olmo``) with its dense form OLMo2 (``olmo2``), and the pre-norm, no-q/k-norm variants of the
EMO / StdMoE release (``flex_olmo_noqknorm_prenorm``, ``flex_olmo_noqknorm_prenorm_shared``) with their dense form
Llama (``llama``).

Stock FlexOlmo (transformers' ``FlexOlmoForCausalLM``) is OLMo2 with OLMoE-style experts: post-norm layers
(``post_attention_layernorm`` / ``post_feedforward_layernorm`` applied to the attention and FFN outputs), q/k RMSNorm
over the whole projection, softmax -> top-k (renormalised iff ``norm_topk_prob``), RMSNorm weight applied in
float32.

The pre-norm variants: ``pre_attention_layernorm`` -> attention -> residual, ``pre_feedforward_layernorm`` -> MoE
-> residual, no q/k norm, router logits in float32 softmax.

- ``flex_olmo_noqknorm_prenorm``: the last ``num_shared_experts`` (s) router experts are shared: the routed ones get a
  softmax over the first E - s logits and their top (k - s), the shared ones a softmax over the last s logits. With
  s = 1 the shared expert's weight is exactly 1, so it is read as an always-on shared expert (``moe/shared``, the
  DeepSeek path) and its router row is unused (``RouterUnusedRows``). s > 1 (token-dependent shared weights) is not
  supported. Optional per-layer ``num_experts_per_layer`` / ``num_shared_experts_per_layer``: 0 marks a dense layer
  of ``dense_intermediate_size``; MoE layers with different router-expert counts E_l are padded to the largest
  (``ExpertsSpec.num_experts_per_layer``: padded experts have zero weights, their logits are masked, and they have
  no keys on disk), and must share one shared count s.
- ``flex_olmo_noqknorm_prenorm_shared``: E routed experts (softmax -> top-k -> renormalised iff ``norm_topk_prob``)
  and a separate ``mlp.shared_mlp`` of ``shared_expert_intermediate_size``, mixed as a weighted average
  ``y = shared(x) / (k + 1) + routed(x) * k / (k + 1)``: ``shared_scale`` 1/(k+1), ``routed_scaling_factor``
  k/(k+1).
"""

from __future__ import annotations

import dataclasses

from m2d_jax.hf.adapters.common import (ConfigReader, DecoderAdapter, common_hf_fields, expert_rules,
                                        llama_attention_rules, swiglu_mlp_rules)
from m2d_jax.hf.keymap import Linear, Rule, RouterUnusedRows, rule
from m2d_jax.models.config import ModelConfig

_FLEX_DEFAULTS = dict(vocab_size=100352, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-6, rope_theta=500000.0,
                      num_experts_per_tok=5, num_experts=7, norm_topk_prob=False)


def _check_silu(r: ConfigReader) -> None:
    if r.get("hidden_act", default="silu") != "silu":
        r.fail("hidden_act", f"unsupported activation {r.get('hidden_act')!r} (expected 'silu')")


class FlexOlmoAdapter(DecoderAdapter):
    """Stock FlexOlmo (post-norm, full-projection q/k norm) and OLMo2, its dense student class."""

    model_types = ("flex_olmo", "olmo2")
    architectures = {"flex_olmo": "FlexOlmoForCausalLM", "olmo2": "Olmo2ForCausalLM"}
    defaults = {
        "flex_olmo": _FLEX_DEFAULTS,
        "olmo2": dict(vocab_size=50304, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, max_position_embeddings=2048, rms_norm_eps=1e-5),
    }

    def config_from_hf(self, hf: dict, source: str) -> ModelConfig:
        model_type = hf["model_type"]
        r = ConfigReader(hf, source, self.defaults[model_type])
        r.check_quantization()
        _check_silu(r)
        fields = r.common_fields()
        layers = fields["num_layers"]
        fields["attention"].update(layer_types=["full_attention"] * layers, qk_norm="full")
        fields["norm"].update(placement="post", weight_in_float32=True)
        if model_type == "olmo2":
            return r.build(**fields, ffn_kinds=["dense"] * layers)
        moe = dict(router=dict(top_k=int(r.get("num_experts_per_tok")), norm_topk_prob=bool(r.get("norm_topk_prob"))),
                   experts=dict(num_experts=int(r.get("num_experts", "num_local_experts")),
                                intermediate_size=fields["ffn"]["intermediate_size"]))
        return r.build(**fields, ffn_kinds=["moe"] * layers, moe=moe)

    def config_to_hf(self, config: ModelConfig) -> dict:
        """config.json of ``FlexOlmoForCausalLM`` / ``Olmo2ForCausalLM`` (the inverse of ``config_from_hf``)."""
        # pad_token_id: the class default (FlexOlmo's 100277) may lie outside a small vocabulary; export takes the
        # real special token ids from the tokenizer source's config.json
        hf = dict(common_hf_fields(config), model_type=config.family,
                  architectures=[self.architectures[config.family]], pad_token_id=None)
        if config.family == "flex_olmo":
            router, experts = config.moe.router, config.moe.experts
            hf.update(intermediate_size=experts.intermediate_size, num_experts=experts.num_experts,
                      num_experts_per_tok=router.top_k, norm_topk_prob=router.norm_topk_prob)
        return hf

    def layer_rules(self, config: ModelConfig, kind: str, expert_layout: str = "per_expert") -> list[Rule]:
        pre = "model.layers.{layer}."
        rules = [r for r in llama_attention_rules(config) if ".input_layernorm." not in r.hf]  # no pre-norms
        rules.append(rule(pre + "post_feedforward_layernorm.weight", "post_ffn_norm/scale"))
        if kind == "dense":
            return rules + swiglu_mlp_rules(pre + "mlp.", "mlp")
        return (rules + [rule(pre + "mlp.gate.weight", "moe/router", transform=Linear(1))]
                + expert_rules(pre + "mlp.", expert_layout))


class FlexOlmoPrenormAdapter(DecoderAdapter):
    """The EMO / StdMoE pre-norm, no-q/k-norm variants, and Llama, their dense student class."""

    model_types = ("flex_olmo_noqknorm_prenorm", "flex_olmo_noqknorm_prenorm_shared", "llama")
    architectures = {"flex_olmo_noqknorm_prenorm": "FlexOlmoNoQKNormPrenormForCausalLM",
                     "flex_olmo_noqknorm_prenorm_shared": "FlexOlmoNoQKNormPrenormSharedForCausalLM",
                     "llama": "LlamaForCausalLM"}
    expert_layouts = ("per_expert",)  # the fork's experts are a ModuleList of MLPs
    defaults = {
        "flex_olmo_noqknorm_prenorm": dict(_FLEX_DEFAULTS, num_shared_experts=0),
        "flex_olmo_noqknorm_prenorm_shared": _FLEX_DEFAULTS,
        "llama": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, max_position_embeddings=2048, rms_norm_eps=1e-6),
    }

    def config_from_hf(self, hf: dict, source: str) -> ModelConfig:
        model_type = hf["model_type"]
        r = ConfigReader(hf, source, self.defaults[model_type])
        r.check_quantization()
        _check_silu(r)
        fields = r.common_fields()
        layers = fields["num_layers"]
        fields["attention"].update(layer_types=["full_attention"] * layers, qk_norm="none")
        if model_type == "llama":
            fields["ffn"].update(bias=bool(r.get("mlp_bias", default=False)))
            return r.build(**fields, ffn_kinds=["dense"] * layers)
        fields["norm"].update(weight_in_float32=True)  # the fork's RMSNorm: (weight * normed).to(dtype)
        width, k = fields["ffn"]["intermediate_size"], int(r.get("num_experts_per_tok"))
        norm_topk = bool(r.get("norm_topk_prob"))
        if model_type == "flex_olmo_noqknorm_prenorm_shared":
            moe = dict(router=dict(top_k=k, norm_topk_prob=norm_topk, routed_scaling_factor=k / (k + 1)),
                       experts=dict(num_experts=int(r.get("num_experts")), intermediate_size=width,
                                    shared_size=int(r.get("shared_expert_intermediate_size", default=width)),
                                    shared_scale=1 / (k + 1)))
            return r.build(**fields, ffn_kinds=["moe"] * layers, moe=moe)
        ffn_kinds, router_experts, shared = self._layer_counts(r, layers)
        if "dense" in ffn_kinds:
            fields["ffn"]["intermediate_size"] = int(r.get("dense_intermediate_size", default=width))
        if "moe" not in ffn_kinds:
            return r.build(**fields, ffn_kinds=ffn_kinds)
        if shared > 1:
            r.fail("num_shared_experts", f"{shared} shared experts: only 0 or 1 is supported (with more, their "
                                         "weights are a token-dependent softmax, not a constant)")
        if shared and norm_topk:
            r.fail("norm_topk_prob", "true is unsupported with num_shared_experts > 0")
        if k <= shared:
            r.fail("num_experts_per_tok", f"{k} must exceed num_shared_experts={shared}")
        if k > min(router_experts):
            r.fail("num_experts_per_tok", f"{k} exceeds the {min(router_experts)} experts of the smallest MoE layer "
                                          f"(num_experts_per_layer)")
        routed = [n - shared for n in router_experts]  # per MoE layer
        moe = dict(router=dict(top_k=k - shared, norm_topk_prob=norm_topk),
                   experts=dict(num_experts=max(routed), intermediate_size=width, shared_size=shared * width,
                                num_experts_per_layer=routed))
        return r.build(**fields, ffn_kinds=ffn_kinds, moe=moe)

    @staticmethod
    def _layer_counts(r: ConfigReader, layers: int) -> tuple[list[str], list[int], int]:
        """(ffn_kinds, router experts E_l of each MoE layer, shared experts s) from the global or per-layer counts
        (0 = dense); s must be the same in every MoE layer."""
        experts = r.get("num_experts_per_layer") or [int(r.get("num_experts"))] * layers
        shared = r.get("num_shared_experts_per_layer") or [int(r.get("num_shared_experts"))] * layers
        for field, counts in (("num_experts_per_layer", experts), ("num_shared_experts_per_layer", shared)):
            if len(counts) != layers:
                r.fail(field, f"{len(counts)} entries for num_hidden_layers={layers}")
        if any(int(n) < 0 for n in experts):
            r.fail("num_experts_per_layer", f"{experts}: counts must be >= 0 (0 = a dense layer)")
        shared_counts = sorted({int(s) for e, s in zip(experts, shared) if e})
        if len(shared_counts) > 1:
            r.fail("num_shared_experts_per_layer", f"MoE layers with different shared counts {shared_counts}: "
                                                   "every MoE layer must have the same number of shared experts")
        return (["moe" if n else "dense" for n in experts], [int(n) for n in experts if n],
                shared_counts[0] if shared_counts else 0)

    def config_to_hf(self, config: ModelConfig) -> dict:
        """config.json of ``LlamaForCausalLM`` (the students) or of the fork's classes (the inverse of
        ``config_from_hf``)."""
        hf = dict(common_hf_fields(config), model_type=config.family,
                  architectures=[self.architectures[config.family]])
        if config.family == "llama":
            return dict(hf, mlp_bias=config.ffn.bias)
        router, experts = config.moe.router, config.moe.experts
        hf.update(intermediate_size=experts.intermediate_size, norm_topk_prob=router.norm_topk_prob)
        if config.family == "flex_olmo_noqknorm_prenorm_shared":
            return dict(hf, num_experts=experts.num_experts, num_experts_per_tok=router.top_k,
                        shared_expert_intermediate_size=experts.shared_size)
        shared = experts.shared_size // experts.intermediate_size
        per_layer_experts = [n + shared if n else 0 for n in config.layer_experts]
        return dict(hf, num_experts=experts.num_experts + shared, num_shared_experts=shared,
                    num_experts_per_tok=router.top_k + shared, dense_intermediate_size=config.ffn.intermediate_size,
                    num_experts_per_layer=per_layer_experts,
                    num_shared_experts_per_layer=[shared if n else 0 for n in per_layer_experts])

    def layer_rules(self, config: ModelConfig, kind: str, expert_layout: str = "per_expert") -> list[Rule]:
        pre = "model.layers.{layer}."
        rules = llama_attention_rules(config)
        if config.family != "llama":  # the fork's norm names
            rules = [dataclasses.replace(r, hf=r.hf.replace(".input_layernorm.", ".pre_attention_layernorm.")
                                         .replace(".post_attention_layernorm.", ".pre_feedforward_layernorm."))
                     for r in rules]
        mlp = pre + "mlp."
        if kind == "dense":
            return rules + swiglu_mlp_rules(mlp, "mlp", config.ffn.bias)
        experts = config.moe.experts
        if config.family == "flex_olmo_noqknorm_prenorm_shared":
            return (rules + [rule(mlp + "gate.weight", "moe/router", transform=Linear(1))]
                    + expert_rules(mlp, expert_layout) + swiglu_mlp_rules(mlp + "shared_mlp.", "moe/shared"))
        # the router holds the layer's E_l routed experts (padded to E in the model: expert_axis)
        if not experts.shared_size:
            return (rules + [rule(mlp + "gate.weight", "moe/router", transform=Linear(1), expert_axis=1)]
                    + expert_rules(mlp, expert_layout))
        # the one shared expert is the router's last expert, after the layer's E_l routed ones
        return (rules + [rule(mlp + "gate.weight", "moe/router", transform=RouterUnusedRows(1), expert_axis=1)]
                + expert_rules(mlp, expert_layout) + swiglu_mlp_rules(mlp + "experts.{num_routed}.", "moe/shared"))
