"""Model summaries: family, structure, total and active parameter counts, bytes by dtype."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
from flax import nnx

from m2d_jax.models import ModelConfig, RuntimeConfig, abstract_model, load_runtime


def param_shapes(config: ModelConfig, runtime: RuntimeConfig | None = None
                 ) -> dict[tuple, tuple[tuple[int, ...], str]]:
    """Every parameter leaf's (shape, dtype), from the abstract model (no memory allocated)."""
    state = nnx.state(abstract_model(config, runtime), nnx.Param)
    return {tuple(k): (tuple(v.get_value().shape), str(v.get_value().dtype)) for k, v in state.flat_state()}


_EXPERT_LEAVES = ("gate_proj", "up_proj", "down_proj", "gate_bias", "up_bias", "down_bias")  # routed experts


def summarize(config: ModelConfig, runtime: RuntimeConfig | None = None) -> dict:
    """Counts for ``m2d info``. Active parameters count the k of E routed experts a token uses (embeddings and LM
    head included, as model cards do); ``runtime`` gives the parameter dtype (default float32) and the dispatch.
    With per-layer expert counts, the padded experts (and their router columns) are not counted: the totals are
    those of the real model."""
    runtime = runtime if runtime is not None else RuntimeConfig()
    total = 0
    slot: dict[str, int] = {}  # routed-expert / router leaf name -> its parameters per expert slot in one layer
    by_dtype: Counter = Counter()
    moe = config.moe
    for path, (shape, dtype) in param_shapes(config, runtime).items():
        n = int(np.prod(shape))
        total += n
        by_dtype[dtype] += n * np.dtype(dtype).itemsize
        if "moe" in path and path[-1] in _EXPERT_LEAVES + ("router", "router_bias"):  # [layers, E, ...] / [.., E]
            slot[path[-1]] = n // (shape[0] * moe.experts.num_experts)
    active = total
    if moe is not None:
        expert = sum(slot[name] for name in _EXPERT_LEAVES if name in slot)  # one routed expert
        real = sum(config.moe_layer_experts)  # real experts over all MoE layers (the rest is padding)
        total -= (len(config.moe_layers) * moe.experts.num_experts - real) * sum(slot.values())
        active = total - real * expert + len(config.moe_layers) * runtime.top_k_for(config) * expert
    embedding = config.vocab_size * config.hidden_size * (1 if config.tie_word_embeddings else 2)
    router = ""
    if moe is not None:
        r = moe.router
        router = (r.rule + (f" x{r.routed_scaling_factor}" if r.routed_scaling_factor != 1 else "")
                  + (f", group-limited {r.topk_group}/{r.n_group}" if r.topk_method != "greedy" else ""))
    return {
        "family": config.family,
        "layers": config.num_layers,
        "moe_layers": len(config.moe_layers),
        "dense_layers": config.num_layers - len(config.moe_layers),
        "hidden_size": config.hidden_size,
        "attention": _attention_summary(config),
        "experts": moe.experts.num_experts if moe else 0,
        **({"experts_per_layer": list(config.moe_layer_experts)} if moe and moe.experts.num_experts_per_layer else {}),
        "top_k": runtime.top_k_for(config) if moe else 0,
        "router": router,
        "expert_width": moe.experts.intermediate_size if moe else 0,
        "shared_expert_width": moe.experts.shared_size if moe else 0,
        "dense_ffn_width": config.ffn.intermediate_size,
        "norm_topk_prob": moe.router.norm_topk_prob if moe else False,
        "tied_embeddings": config.tie_word_embeddings,
        "vocab_size": config.vocab_size,
        "total_params": total,
        "active_params": active,
        "active_non_embedding_params": active - embedding,
        "bytes_by_dtype": dict(by_dtype),
        "moe_dispatch": runtime.moe_dispatch,
    }


def _attention_summary(c: ModelConfig) -> str:
    a, m = c.attention, c.attention.mla
    if m is not None:
        q = "q full" if m.q_lora_rank is None else f"q_lora {m.q_lora_rank}"
        text = (f"MLA {a.num_heads} heads, {q}, kv_lora {m.kv_lora_rank}, qk {m.qk_nope_head_dim}+"
                f"{m.qk_rope_head_dim}, v {m.v_head_dim}")
    else:
        text = f"{a.num_heads} q heads / {a.num_kv_heads} kv heads x {a.head_dim}"
    extras = [f"sliding window {a.sliding_window} on {a.layer_types.count('sliding_attention')} layers"
              if "sliding_attention" in a.layer_types else "", "sinks" if a.sinks else "",
              f"rope {c.rope.type}" if c.rope.type != "default" else ""]
    return ", ".join([text] + [e for e in extras if e])


def load_config(path: str | Path) -> tuple[ModelConfig, str]:
    """The architecture of an m2d_jax checkpoint or an HF directory (config only: no weights are read), and what
    kind of path it was (for HF: with its on-disk storage, e.g. MXFP4-quantized experts)."""
    from m2d_jax import checkpoint
    from m2d_jax.hf import hf_model_config, read_hf_config

    if checkpoint.is_m2d_checkpoint(path):
        return checkpoint.read_config(path)[0], "m2d_jax checkpoint"
    hf, _ = read_hf_config(path)
    quant = (hf.get("quantization_config") or {}).get("quant_method")
    storage = hf.get("dtype") or hf.get("torch_dtype") or "unspecified dtype"
    return hf_model_config(path), f"HF checkpoint ({storage}{f', {quant} experts' if quant else ''})"


def default_runtime(path: str | Path) -> RuntimeConfig:
    """The runtime ``from_pretrained(path)`` builds the model with when given no flags (the stored parameter dtype
    of an m2d_jax checkpoint; float32 for an HF import). Reads no weights."""
    from m2d_jax import checkpoint
    from m2d_jax.hf.load import HF_IMPORT_DTYPE

    stored = checkpoint.read_config(path)[1] if checkpoint.is_m2d_checkpoint(path) else HF_IMPORT_DTYPE
    return load_runtime(stored)


def format_summary(summary: dict) -> str:
    def human(n: int) -> str:
        for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
            if n >= scale:
                return f"{n / scale:.2f}{unit}"
        return str(n)

    lines = []
    for key, value in summary.items():
        if key.endswith("params"):
            value = f"{value:,} ({human(value)})"
        elif key == "bytes_by_dtype":
            value = ", ".join(f"{d}: {b:,} B" for d, b in value.items())
        lines.append(f"{key:<28}{value}")
    return "\n".join(lines)
