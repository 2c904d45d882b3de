"""The one model configuration every family maps onto.

A ``ModelConfig`` describes the decoder that ``m2d_jax.models.CausalLM`` builds: sizes, the attention variant,
the per-layer FFN kind (dense or MoE), the router rule and the runtime choices (dtypes, MoE dispatch). Family
adapters in ``m2d_jax.hf`` translate an HF ``config.json`` into it; checkpoints store it as JSON. It is frozen and
hashable because it is static structure under ``jax.jit``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

ATTENTION_KINDS = ("full_attention", "sliding_attention")
FFN_KINDS = ("dense", "moe")
ROUTERS = (
    "softmax_topk",  # full softmax over experts -> top-k -> optional renormalisation (Qwen3-MoE, OLMoE, Mixtral)
    "softmax_topk_scaled",  # DeepSeek-V2: float32 softmax -> (group-limited) top-k -> x routed_scaling_factor
    "topk_softmax",  # GPT-OSS: top-k over the (biased) logits -> softmax over the k selected
)
ATTENTIONS = ("gqa", "mla")  # grouped-query attention; DeepSeek multi-head latent attention
TOPK_METHODS = ("greedy", "group_limited_greedy")
ACTIVATIONS = ("silu", "clamped_swiglu")
DISPATCHES = ("auto", "capacity", "blocks", "ragged", "dense")
QK_NORMS = ("none", "head", "full")  # full: RMSNorm over the whole q / k projection (OLMoE)
DTYPES = ("float32", "bfloat16")
# fields that change how the model runs, not what it computes: excluded from ``structure_hash``
RUNTIME_FIELDS = frozenset({"dtype", "compute_dtype", "moe_dispatch", "capacity_factor", "moe_block_size",
                            "moe_blocks_per_step", "remat"})


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    family: str  # HF model_type of the checkpoint this model corresponds to, e.g. "qwen3_moe", "qwen3"
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int  # width of dense FFN layers
    layer_types: tuple[str, ...]  # per layer, one of ATTENTION_KINDS
    ffn_kinds: tuple[str, ...]  # per layer, one of FFN_KINDS
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_params: tuple[tuple[str, Any], ...] = ()  # extra rope parameters (type-specific), sorted (key, value)
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    qk_norm: str = "head"
    clip_qkv: float | None = None  # clamp q, k, v to [-clip, clip] after the projections (OLMoE)
    attention: str = "gqa"
    attention_sinks: bool = False  # one learned sink logit per head in the softmax (GPT-OSS)
    # multi-head latent attention (attention="mla"); head_dim is then qk_nope_head_dim + qk_rope_head_dim
    q_lora_rank: int | None = None
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    norm_weight_in_float32: bool = False  # RMSNorm multiplies its weight before the cast back (GPT-OSS)
    hidden_act: str = "silu"  # the gated unit of every FFN: silu(g)*u, or GPT-OSS's clamped (u+1)*g*sigmoid(a*g)
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    mlp_bias: bool = False  # biases on dense FFN / shared-expert projections (DeepSeek mlp_bias)
    # MoE
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    router: str = "softmax_topk"
    router_bias: bool = False
    expert_bias: bool = False  # biases on routed experts' projections (GPT-OSS)
    routed_scaling_factor: float = 1.0
    topk_method: str = "greedy"
    n_group: int = 1
    topk_group: int = 1
    shared_expert_size: int = 0  # total width of the always-on shared experts (DeepSeek), 0 = none
    # runtime
    dtype: str = "float32"  # parameter dtype
    compute_dtype: str = "float32"
    moe_dispatch: str = "auto"
    capacity_factor: float = 1.25  # "capacity" dispatch: per-expert buffer = ceil(tokens * k / E * factor)
    moe_block_size: int = 256  # "blocks" dispatch: rows per block
    moe_blocks_per_step: int = 32  # "blocks" dispatch: blocks per batched matmul
    remat: bool = False  # rematerialise each scanned layer in the backward pass

    def __post_init__(self):
        def need(cond, msg):
            if not cond:
                raise ValueError(f"invalid ModelConfig: {msg}")

        need(len(self.layer_types) == self.num_layers, f"layer_types has {len(self.layer_types)} entries, "
             f"expected num_layers={self.num_layers}")
        need(len(self.ffn_kinds) == self.num_layers, f"ffn_kinds has {len(self.ffn_kinds)} entries, "
             f"expected num_layers={self.num_layers}")
        need(set(self.layer_types) <= set(ATTENTION_KINDS), f"layer_types must be in {ATTENTION_KINDS}")
        need(set(self.ffn_kinds) <= set(FFN_KINDS), f"ffn_kinds must be in {FFN_KINDS}")
        need(self.num_heads % self.num_kv_heads == 0,
             f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        need(self.qk_norm in QK_NORMS, f"qk_norm={self.qk_norm!r} not in {QK_NORMS}")
        need(self.attention in ATTENTIONS, f"attention={self.attention!r} not in {ATTENTIONS}")
        need(self.topk_method in TOPK_METHODS, f"topk_method={self.topk_method!r} not in {TOPK_METHODS}")
        need(self.hidden_act in ACTIVATIONS, f"hidden_act={self.hidden_act!r} not in {ACTIVATIONS}")
        if self.attention == "mla":
            need(self.kv_lora_rank > 0 and self.qk_rope_head_dim > 0 and self.v_head_dim > 0,
                 "MLA needs kv_lora_rank, qk_rope_head_dim and v_head_dim > 0")
            need(self.head_dim == self.qk_nope_head_dim + self.qk_rope_head_dim,
                 "MLA head_dim must equal qk_nope_head_dim + qk_rope_head_dim")
        if self.topk_method == "group_limited_greedy":
            need(self.num_experts % self.n_group == 0 and 0 < self.topk_group <= self.n_group,
                 f"group-limited top-k needs num_experts % n_group == 0 and 0 < topk_group <= n_group "
                 f"(got num_experts={self.num_experts}, n_group={self.n_group}, topk_group={self.topk_group})")
        need(self.router in ROUTERS, f"router={self.router!r} not in {ROUTERS}")
        need(self.moe_dispatch in DISPATCHES, f"moe_dispatch={self.moe_dispatch!r} not in {DISPATCHES}")
        need(self.dtype in DTYPES and self.compute_dtype in DTYPES, f"dtypes must be in {DTYPES}")
        need(self.capacity_factor > 0, "capacity_factor must be > 0")
        need(self.moe_block_size > 0 and self.moe_blocks_per_step > 0, "MoE block sizes must be > 0")
        if "sliding_attention" in self.layer_types:
            need(self.sliding_window is not None and self.sliding_window > 0,
                 "sliding_attention layers need sliding_window > 0")
        if "moe" in self.ffn_kinds:
            need(self.num_experts > 0 and 0 < self.num_experts_per_tok <= self.num_experts,
                 f"MoE layers need 0 < num_experts_per_tok={self.num_experts_per_tok} <= "
                 f"num_experts={self.num_experts}")
            need(self.moe_intermediate_size > 0, "MoE layers need moe_intermediate_size > 0")

    # ---- derived structure -------------------------------------------------------------------------------
    @property
    def is_moe(self) -> bool:
        return "moe" in self.ffn_kinds

    @property
    def moe_layers(self) -> tuple[int, ...]:
        """Global indices of the MoE layers, in order (row i of calibration statistics is layer moe_layers[i])."""
        return tuple(i for i, kind in enumerate(self.ffn_kinds) if kind == "moe")

    @property
    def rope_dim(self) -> int:
        """Number of rotated dimensions per head (MLA rotates only its qk_rope part)."""
        return self.qk_rope_head_dim if self.attention == "mla" else self.head_dim

    @property
    def rope_param(self) -> dict:
        return dict(self.rope_params)

    @property
    def stacks(self) -> tuple[tuple[str, int, int], ...]:
        """Contiguous runs of layers with the same FFN kind: (kind, first_layer, num_layers).

        Each run is one scanned stack of identically-shaped layers, so compile time does not grow with depth.
        """
        runs: list[list] = []
        for i, kind in enumerate(self.ffn_kinds):
            if runs and runs[-1][0] == kind:
                runs[-1][2] += 1
            else:
                runs.append([kind, i, 1])
        return tuple(tuple(r) for r in runs)

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def structure_hash(self) -> str:
        """sha256 of the structural fields (what the model computes). Runtime fields (dtype, dispatch...) are
        excluded, and so are fields at their default value, so a field added later does not change the hash of
        existing models (calibration statistics record it to check they belong to a model)."""
        d = self.to_dict()
        for f in dataclasses.fields(self):
            if f.name in RUNTIME_FIELDS:
                d.pop(f.name)
            elif f.default is not dataclasses.MISSING:
                try:
                    at_default = self.replace(**{f.name: f.default}).to_dict()[f.name]
                except ValueError:  # the default is invalid for this config: it cannot be the current value either
                    continue
                if d[f.name] == at_default:
                    d.pop(f.name)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()

    # ---- serialisation -------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["rope_params"] = dict(self.rope_params)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ValueError(f"unknown ModelConfig fields {unknown}")
        d = dict(d)
        for key in ("layer_types", "ffn_kinds"):
            d[key] = tuple(d[key])
        d["rope_params"] = tuple(sorted((d.get("rope_params") or {}).items()))
        return cls(**d)
