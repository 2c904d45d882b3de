"""Model summaries: family, structure, total and active parameter counts, bytes by dtype."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
from flax import nnx

from m2d_jax.models import ModelConfig, abstract_model


def param_shapes(config: ModelConfig) -> dict[tuple, tuple[tuple[int, ...], str]]:
    """Every parameter leaf's (shape, dtype), from the abstract model (no memory allocated)."""
    state = nnx.state(abstract_model(config), nnx.Param)
    return {tuple(k): (tuple(v.get_value().shape), str(v.get_value().dtype)) for k, v in state.flat_state()}


def summarize(config: ModelConfig) -> dict:
    """Counts for ``m2d info``. Active parameters count the k of E routed experts a token uses (embeddings and LM
    head included, as model cards do)."""
    total, routed = 0, 0
    by_dtype: Counter = Counter()
    for path, (shape, dtype) in param_shapes(config).items():
        n = int(np.prod(shape))
        total += n
        by_dtype[dtype] += n * np.dtype(dtype).itemsize
        if "moe" in path and path[-1] in ("gate_proj", "up_proj", "down_proj", "gate_bias", "up_bias", "down_bias"):
            routed += n
    active = total
    if config.is_moe:
        active = total - routed + routed * config.num_experts_per_tok // config.num_experts
    embedding = config.vocab_size * config.hidden_size * (1 if config.tie_word_embeddings else 2)
    return {
        "family": config.family,
        "layers": config.num_layers,
        "moe_layers": sum(k == "moe" for k in config.ffn_kinds),
        "dense_layers": sum(k == "dense" for k in config.ffn_kinds),
        "hidden_size": config.hidden_size,
        "attention": _attention_summary(config),
        "experts": config.num_experts,
        "top_k": config.num_experts_per_tok,
        "router": config.router + (f" x{config.routed_scaling_factor}" if config.routed_scaling_factor != 1 else "")
        + (f", group-limited {config.topk_group}/{config.n_group}" if config.topk_method != "greedy" else ""),
        "expert_width": config.moe_intermediate_size,
        "shared_expert_width": config.shared_expert_size,
        "dense_ffn_width": config.intermediate_size,
        "norm_topk_prob": config.norm_topk_prob,
        "tied_embeddings": config.tie_word_embeddings,
        "vocab_size": config.vocab_size,
        "total_params": total,
        "active_params": active,
        "active_non_embedding_params": active - embedding,
        "bytes_by_dtype": dict(by_dtype),
        "moe_dispatch": config.moe_dispatch,
    }


def _attention_summary(c: ModelConfig) -> str:
    if c.attention == "mla":
        q = "q full" if c.q_lora_rank is None else f"q_lora {c.q_lora_rank}"
        text = (f"MLA {c.num_heads} heads, {q}, kv_lora {c.kv_lora_rank}, qk {c.qk_nope_head_dim}+"
                f"{c.qk_rope_head_dim}, v {c.v_head_dim}")
    else:
        text = f"{c.num_heads} q heads / {c.num_kv_heads} kv heads x {c.head_dim}"
    extras = [f"sliding window {c.sliding_window} on {c.layer_types.count('sliding_attention')} layers"
              if "sliding_attention" in c.layer_types else "", "sinks" if c.attention_sinks else "",
              f"rope {c.rope_type}" if c.rope_type != "default" else ""]
    return ", ".join([text] + [e for e in extras if e])


def load_config(path: str | Path) -> tuple[ModelConfig, str]:
    """The ModelConfig of an m2d_jax checkpoint or an HF directory, and what kind of path it was (for HF: with
    its on-disk storage, e.g. MXFP4-quantized experts)."""
    from m2d_jax import checkpoint
    from m2d_jax.hf import hf_model_config, read_hf_config

    if checkpoint.is_m2d_checkpoint(path):
        return ModelConfig.from_dict(checkpoint.read_record(path)["config"]), "m2d_jax checkpoint"
    hf, _ = read_hf_config(path)
    quant = (hf.get("quantization_config") or {}).get("quant_method")
    storage = hf.get("dtype") or hf.get("torch_dtype") or "unspecified dtype"
    return hf_model_config(path), f"HF checkpoint ({storage}{f', {quant} experts' if quant else ''})"


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
