"""The model configuration every family maps onto: the architecture, and separately how it runs.

A ``ModelConfig`` describes what the decoder that ``m2d_jax.models.CausalLM`` builds computes: sizes, the per-layer
FFN kind (dense or MoE), and small nested specs for attention (``AttentionSpec``, with ``MLASpec`` for DeepSeek's
latent attention), rotary embeddings (``RopeSpec``), norms (``NormSpec``), the gated FFN unit (``FFNSpec``) and, for
MoE models, the router and experts (``MoESpec`` = ``RouterSpec`` + ``ExpertsSpec``; ``moe=None`` for dense models).
Family adapters in ``m2d_jax.hf`` translate an HF ``config.json`` into it; checkpoints store it as nested JSON.

A ``RuntimeConfig`` holds the choices that change how a model runs, not what it computes: parameter and compute
dtypes, the MoE dispatch and its buffer sizes, rematerialisation, and an expanded routing top-k' (0 = as trained).
It is not part of the architecture, so loaders accept it freely while the architecture stays what was saved.

Both are frozen and hashable because they are static structure under ``jax.jit``. Every spec validates itself in
``__post_init__`` and names the offending field.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

LAYER_TYPES = ("full_attention", "sliding_attention")  # per-layer attention kind
FFN_KINDS = ("dense", "moe")
ROUTERS = (
    "softmax_topk",  # full softmax over experts -> top-k -> optional renormalisation (Qwen3-MoE, OLMoE, Mixtral)
    "softmax_topk_scaled",  # DeepSeek-V2: float32 softmax -> (group-limited) top-k -> x routed_scaling_factor
    "topk_softmax",  # GPT-OSS: top-k over the (biased) logits -> softmax over the k selected
)
ATTENTIONS = ("gqa", "mla")  # grouped-query attention; DeepSeek multi-head latent attention (AttentionSpec.kind)
TOPK_METHODS = ("greedy", "group_limited_greedy")
ACTIVATIONS = ("silu", "clamped_swiglu")
DISPATCHES = ("auto", "capacity", "blocks", "ragged", "dense")
ATTENTION_KERNELS = ("auto", "xla", "splash")  # RuntimeConfig.attention (see m2d_jax.models.splash)
QK_NORMS = ("none", "head", "full")  # full: RMSNorm over the whole q / k projection (OLMoE)
# pre: x + f(norm(x)) (Llama and most families); post: x + norm(f(x)) (OLMo2, FlexOlmo: norms after attention / FFN)
NORM_PLACEMENTS = ("pre", "post")
ROPE_TYPES = ("default", "yarn")
DTYPES = ("float32", "bfloat16")


def _need(spec: object, cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(f"invalid {type(spec).__name__}: {msg}")


def _one_of(spec: object, field: str, choices: tuple[str, ...]) -> None:
    value = getattr(spec, field)
    _need(spec, value in choices, f"{field}={value!r} not in {choices}")


def _positive(spec: object, *fields: str) -> None:
    for field in fields:
        value = getattr(spec, field)
        _need(spec, value > 0, f"{field}={value!r} must be > 0")


class _Spec:
    """``replace`` and nested (de)serialisation shared by the frozen specs."""

    _nested: dict[str, type] = {}  # field -> spec class of a nested spec field (None allowed)
    _tuples: tuple[str, ...] = ()  # fields stored as tuples (JSON lists)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, _Spec):
                value = value.to_dict()
            elif f.name in self._tuples:
                value = list(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, d: dict, where: str | None = None):
        """Inverse of ``to_dict``; unknown or missing fields raise ``ValueError`` naming the dotted field."""
        where = where or cls.__name__
        if not isinstance(d, dict):
            raise ValueError(f"{where}: expected an object, got {d!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"{where}: unknown fields {unknown} (known: {sorted(names)})")
        values = dict(d)
        for name, spec in cls._nested.items():
            if values.get(name) is not None:
                values[name] = spec.from_dict(values[name], f"{where}.{name}")
        for name in cls._tuples:
            if name in values:
                values[name] = tuple(values[name])
        try:
            return cls(**values)
        except TypeError as err:  # a missing required field
            raise ValueError(f"{where}: {err}") from err


@dataclasses.dataclass(frozen=True)
class MLASpec(_Spec):
    """DeepSeek multi-head latent attention: low-rank queries (optional) and one compressed key/value latent."""
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    q_lora_rank: int | None = None  # None: queries from a plain projection

    def __post_init__(self):
        _positive(self, "kv_lora_rank", "qk_rope_head_dim", "v_head_dim")
        _need(self, self.qk_nope_head_dim >= 0, f"qk_nope_head_dim={self.qk_nope_head_dim} must be >= 0")
        _need(self, self.q_lora_rank is None or self.q_lora_rank > 0,
              f"q_lora_rank={self.q_lora_rank!r} must be None or > 0")


@dataclasses.dataclass(frozen=True)
class AttentionSpec(_Spec):
    """Attention of every layer: heads, per-layer full/sliding window, projection options; ``mla`` for MLA."""
    num_heads: int
    num_kv_heads: int
    head_dim: int  # MLA: qk_nope_head_dim + qk_rope_head_dim
    layer_types: tuple[str, ...]  # per layer, one of LAYER_TYPES
    sliding_window: int | None = None
    bias: bool = False  # biases on the q/k/v/o projections
    qk_norm: str = "head"  # one of QK_NORMS
    clip_qkv: float | None = None  # clamp q, k, v to [-clip, clip] after the projections (OLMoE)
    sinks: bool = False  # one learned sink logit per head in the softmax (GPT-OSS)
    mla: MLASpec | None = None

    _nested = {"mla": MLASpec}
    _tuples = ("layer_types",)

    def __post_init__(self):
        _positive(self, "num_heads", "num_kv_heads", "head_dim")
        _need(self, self.num_heads % self.num_kv_heads == 0,
              f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        _need(self, set(self.layer_types) <= set(LAYER_TYPES),
              f"layer_types={self.layer_types} must be in {LAYER_TYPES}")
        _one_of(self, "qk_norm", QK_NORMS)
        if "sliding_attention" in self.layer_types:
            _need(self, self.sliding_window is not None and self.sliding_window > 0,
                  f"sliding_window={self.sliding_window!r}: sliding_attention layers need sliding_window > 0")
        if self.mla is not None:
            _need(self, self.head_dim == self.mla.qk_nope_head_dim + self.mla.qk_rope_head_dim,
                  f"head_dim={self.head_dim} must equal mla.qk_nope_head_dim + mla.qk_rope_head_dim = "
                  f"{self.mla.qk_nope_head_dim + self.mla.qk_rope_head_dim}")

    @property
    def kind(self) -> str:
        """One of ATTENTIONS."""
        return "gqa" if self.mla is None else "mla"


@dataclasses.dataclass(frozen=True)
class RopeSpec(_Spec):
    type: str = "default"  # one of ROPE_TYPES
    theta: float = 10000.0
    params: tuple[tuple[str, Any], ...] = ()  # type-specific parameters (YaRN factor...), sorted (key, value)

    def __post_init__(self):
        _one_of(self, "type", ROPE_TYPES)
        _positive(self, "theta")

    @property
    def param(self) -> dict:
        return dict(self.params)

    def to_dict(self) -> dict:
        return {**super().to_dict(), "params": dict(self.params)}

    @classmethod
    def from_dict(cls, d: dict, where: str | None = None) -> "RopeSpec":
        d = dict(d) if isinstance(d, dict) else d
        if isinstance(d, dict) and isinstance(d.get("params"), dict):
            d["params"] = tuple(sorted(d["params"].items()))
        return super().from_dict(d, where)


@dataclasses.dataclass(frozen=True)
class NormSpec(_Spec):
    eps: float = 1e-6
    weight_in_float32: bool = False  # RMSNorm multiplies its weight before the cast back (GPT-OSS, OLMo2)
    placement: str = "pre"  # one of NORM_PLACEMENTS: where each layer's two norms sit around attention and FFN

    def __post_init__(self):
        _positive(self, "eps")
        _one_of(self, "placement", NORM_PLACEMENTS)


@dataclasses.dataclass(frozen=True)
class FFNSpec(_Spec):
    """The gated unit of every FFN (dense layers, shared and routed experts) and the dense layers' width."""
    intermediate_size: int  # width of dense FFN layers
    activation: str = "silu"  # silu(g)*u, or GPT-OSS's clamped (u+1)*g*sigmoid(alpha*g); one of ACTIVATIONS
    swiglu_alpha: float = 1.702  # clamped_swiglu only
    swiglu_limit: float = 7.0  # clamped_swiglu only
    bias: bool = False  # biases on dense FFN / shared-expert projections (DeepSeek mlp_bias)

    def __post_init__(self):
        _positive(self, "intermediate_size")
        _one_of(self, "activation", ACTIVATIONS)


@dataclasses.dataclass(frozen=True)
class RouterSpec(_Spec):
    top_k: int  # experts per token, as trained
    rule: str = "softmax_topk"  # one of ROUTERS
    norm_topk_prob: bool = False  # softmax_topk: renormalise the k selected probabilities
    bias: bool = False  # a bias on the router logits (GPT-OSS)
    routed_scaling_factor: float = 1.0  # every rule: applied weights x factor (DeepSeek rho; FlexOlmo k/(k+1))
    topk_method: str = "greedy"  # one of TOPK_METHODS
    n_group: int = 1  # group_limited_greedy: experts in n_group groups, the best topk_group compete
    topk_group: int = 1

    def __post_init__(self):
        _positive(self, "top_k")
        _one_of(self, "rule", ROUTERS)
        _one_of(self, "topk_method", TOPK_METHODS)


@dataclasses.dataclass(frozen=True)
class ExpertsSpec(_Spec):
    """The routed experts of every MoE layer (``num_experts`` E of them, stacked), optional shared experts.

    ``num_experts_per_layer``: the real routed-expert count E_l of each MoE layer (in ``ModelConfig.moe_layers``
    order) when they differ (FlexOlmo's per-layer counts); E = max E_l and every layer is padded to E experts, the
    padded ones (ids E_l..E-1) with zero weights and router logits masked to -inf, so they are never routed to (see
    docs/METHOD.md §1, "Per-layer expert counts"). Empty (the default; also what equal counts normalise to): every
    MoE layer has E real experts.
    """
    num_experts: int
    intermediate_size: int  # width of each routed expert
    bias: bool = False  # biases on the routed experts' projections (GPT-OSS)
    shared_size: int = 0  # total width of the always-on shared experts (DeepSeek, FlexOlmo variants), 0 = none
    shared_scale: float = 1.0  # weight of the shared experts' output: 1 (DeepSeek), 1/(k+1) (FlexOlmo shared_mlp)
    num_experts_per_layer: tuple[int, ...] = ()  # per MoE layer: its real routed experts E_l; () = all E

    _tuples = ("num_experts_per_layer",)

    def __post_init__(self):
        _positive(self, "num_experts", "intermediate_size", "shared_scale")
        _need(self, self.shared_size >= 0, f"shared_size={self.shared_size} must be >= 0")
        counts = self.num_experts_per_layer
        _need(self, all(isinstance(n, int) and 0 < n <= self.num_experts for n in counts)
              and (not counts or max(counts) == self.num_experts),
              f"num_experts_per_layer={list(counts)} must be counts in [1, num_experts={self.num_experts}] whose "
              f"maximum is num_experts")
        if counts and min(counts) == self.num_experts:  # equal counts: the unpadded form
            object.__setattr__(self, "num_experts_per_layer", ())

    def to_dict(self) -> dict:
        out = super().to_dict()
        if not self.num_experts_per_layer:  # absent when unpadded: every other model's JSON and hash unchanged
            del out["num_experts_per_layer"]
        return out


@dataclasses.dataclass(frozen=True)
class MoESpec(_Spec):
    router: RouterSpec
    experts: ExpertsSpec

    _nested = {"router": RouterSpec, "experts": ExpertsSpec}

    def __post_init__(self):
        r, e = self.router, self.experts
        _need(self, r.top_k <= e.num_experts,
              f"router.top_k={r.top_k} must be <= experts.num_experts={e.num_experts}")
        if e.num_experts_per_layer:
            _need(self, r.top_k <= min(e.num_experts_per_layer),
                  f"router.top_k={r.top_k} must be <= every MoE layer's experts "
                  f"(experts.num_experts_per_layer={list(e.num_experts_per_layer)})")
            _need(self, r.topk_method == "greedy",
                  f"router.topk_method={r.topk_method!r}: per-layer expert counts need greedy top-k")
        if r.topk_method == "group_limited_greedy":
            _need(self, e.num_experts % r.n_group == 0 and 0 < r.topk_group <= r.n_group,
                  f"router.topk_method='group_limited_greedy' needs experts.num_experts % router.n_group == 0 "
                  f"and 0 < router.topk_group <= router.n_group (got num_experts={e.num_experts}, "
                  f"n_group={r.n_group}, topk_group={r.topk_group})")


@dataclasses.dataclass(frozen=True)
class ModelConfig(_Spec):
    """The architecture: everything that decides what the model computes (and nothing about how it runs)."""
    family: str  # HF model_type of the checkpoint this model corresponds to, e.g. "qwen3_moe", "qwen3"
    vocab_size: int
    hidden_size: int
    num_layers: int
    ffn_kinds: tuple[str, ...]  # per layer, one of FFN_KINDS
    attention: AttentionSpec
    ffn: FFNSpec
    moe: MoESpec | None = None  # router and experts of the MoE layers; None for dense models
    rope: RopeSpec = RopeSpec()
    norm: NormSpec = NormSpec()
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 32768

    _nested = {"attention": AttentionSpec, "ffn": FFNSpec, "moe": MoESpec, "rope": RopeSpec, "norm": NormSpec}
    _tuples = ("ffn_kinds",)

    def __post_init__(self):
        _positive(self, "vocab_size", "hidden_size", "num_layers", "max_position_embeddings")
        _need(self, len(self.attention.layer_types) == self.num_layers,
              f"attention.layer_types has {len(self.attention.layer_types)} entries, "
              f"expected num_layers={self.num_layers}")
        _need(self, len(self.ffn_kinds) == self.num_layers,
              f"ffn_kinds has {len(self.ffn_kinds)} entries, expected num_layers={self.num_layers}")
        _need(self, set(self.ffn_kinds) <= set(FFN_KINDS), f"ffn_kinds={self.ffn_kinds} must be in {FFN_KINDS}")
        _need(self, self.is_moe == (self.moe is not None),
              "moe must be given exactly when ffn_kinds has a 'moe' layer "
              f"(ffn_kinds={self.ffn_kinds}, moe={'set' if self.moe is not None else None})")
        if self.moe is not None and self.moe.experts.num_experts_per_layer:
            counts = self.moe.experts.num_experts_per_layer
            _need(self, len(counts) == len(self.moe_layers),
                  f"moe.experts.num_experts_per_layer has {len(counts)} entries, expected one per MoE layer "
                  f"({len(self.moe_layers)})")

    # ---- derived structure -------------------------------------------------------------------------------
    @property
    def is_moe(self) -> bool:
        return "moe" in self.ffn_kinds

    @property
    def moe_layers(self) -> tuple[int, ...]:
        """Global indices of the MoE layers, in order (row i of calibration statistics is layer moe_layers[i])."""
        return tuple(i for i, kind in enumerate(self.ffn_kinds) if kind == "moe")

    @property
    def moe_layer_experts(self) -> tuple[int, ...]:
        """Real routed experts E_l of each MoE layer (``moe_layers`` order); ``moe.experts.num_experts`` is their
        maximum, the padded size every layer is stored with."""
        experts = self.moe.experts
        return experts.num_experts_per_layer or (experts.num_experts,) * len(self.moe_layers)

    @property
    def layer_experts(self) -> tuple[int, ...]:
        """Per decoder layer: its real routed experts E_l (0 for a dense layer)."""
        per_moe_layer = dict(zip(self.moe_layers, self.moe_layer_experts)) if self.is_moe else {}
        return tuple(per_moe_layer.get(i, 0) for i in range(self.num_layers))

    @property
    def rope_dim(self) -> int:
        """Number of rotated dimensions per head (MLA rotates only its qk_rope part)."""
        mla = self.attention.mla
        return self.attention.head_dim if mla is None else mla.qk_rope_head_dim

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

    def structure_hash(self) -> str:
        """sha256 of the whole architecture (calibration statistics record it to check they belong to a model)."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()


@dataclasses.dataclass(frozen=True)
class RuntimeConfig(_Spec):
    """How a model runs: none of it changes what the model computes (up to dtype rounding), none of it is saved
    as architecture, and all of it may be chosen at load time."""
    param_dtype: str = "float32"  # one of DTYPES
    compute_dtype: str = "float32"  # one of DTYPES
    moe_dispatch: str = "auto"  # one of DISPATCHES (see m2d_jax.models.moe)
    capacity_factor: float = 1.25  # "capacity" dispatch: per-expert buffer = ceil(tokens * k / E * factor)
    moe_block_size: int = 256  # "blocks" dispatch: rows per block
    moe_blocks_per_step: int = 32  # "blocks" dispatch: blocks per batched matmul
    remat: bool = False  # rematerialise each scanned layer in the backward pass
    top_k: int = 0  # > 0: route every token to this many experts (expanded teacher top-k'); 0 = as trained
    attention: str = "auto"  # one of ATTENTION_KERNELS: "splash" = fused Pallas TPU kernel; "auto" = it on TPU if
    # the model's attention is supported (m2d_jax.models.splash.attention_kernel), else "xla" (scores materialised)

    def __post_init__(self):
        _one_of(self, "param_dtype", DTYPES)
        _one_of(self, "compute_dtype", DTYPES)
        _one_of(self, "moe_dispatch", DISPATCHES)
        _one_of(self, "attention", ATTENTION_KERNELS)
        _positive(self, "capacity_factor", "moe_block_size", "moe_blocks_per_step")
        _need(self, self.top_k >= 0, f"top_k={self.top_k} must be >= 0 (0 = as trained)")

    def top_k_for(self, config: ModelConfig) -> int:
        """Experts per token this model routes to: ``top_k`` if set, else the router's trained top-k."""
        if config.moe is None:
            raise ValueError(f"the {config.family} model has no MoE layers: it has no routing top-k")
        k = self.top_k or config.moe.router.top_k
        fewest = min(config.moe_layer_experts)
        if k > fewest:
            smallest = " in its smallest MoE layer" if config.moe.experts.num_experts_per_layer else ""
            raise ValueError(f"invalid RuntimeConfig: top_k={k} exceeds the model's {fewest} experts{smallest}")
        return k


RUNTIME_FIELDS = tuple(f.name for f in dataclasses.fields(RuntimeConfig))


def load_runtime(stored_dtype: str, dtype: str | None = None, runtime: RuntimeConfig | None = None,
                 **fields) -> RuntimeConfig:
    """The runtime a loader builds its model with, the same for every loader (HF import, m2d_jax checkpoint).

    Either a whole ``runtime`` or runtime field keywords (``moe_dispatch="dense"``, ``top_k=4`` ...), not both.
    ``dtype`` sets the parameter and compute dtype (default ``stored_dtype``, what the checkpoint holds); explicit
    ``param_dtype`` / ``compute_dtype`` keywords take precedence. Anything that is not a runtime field (an
    architecture field such as ``num_layers``) is a ``TypeError``: the architecture is what was saved.
    """
    unknown = sorted(set(fields) - set(RUNTIME_FIELDS))
    if unknown:
        raise TypeError(f"unknown runtime field(s) {unknown} (runtime fields: {', '.join(RUNTIME_FIELDS)}); "
                        f"the architecture cannot be changed at load time")
    if runtime is not None:
        if fields or dtype is not None:
            raise TypeError("give either runtime=RuntimeConfig(...) or dtype / runtime field keywords, not both")
        return runtime
    dtype = dtype or stored_dtype
    return RuntimeConfig(**{"param_dtype": dtype, "compute_dtype": dtype, **fields})
