"""Model FLOPs for MFU, and the metrics sinks: JSONL and TensorBoard event files (process 0 only)."""

from __future__ import annotations

import json
from pathlib import Path

import jax

from m2d_jax.models import ModelConfig


def forward_flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Matmul FLOPs of one token's forward pass: attention projections, attention over the mean causal context
    ((seq+1)/2 keys), the FFN (k routed experts + router for MoE layers), and the LM head."""
    d, h, kv, hd = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
    projections = 2 * d * (2 * h * hd + 2 * kv * hd)
    attention = 2 * 2 * h * hd * (seq_len + 1) / 2
    total = 0.0
    for kind in config.ffn_kinds:
        if kind == "moe":
            ffn = config.num_experts_per_tok * 3 * 2 * d * config.moe_intermediate_size + 2 * d * config.num_experts
        else:
            ffn = 3 * 2 * d * config.intermediate_size
        total += projections + attention + ffn
    return total + 2 * d * config.vocab_size


def train_flops_per_token(student: ModelConfig, teacher: ModelConfig | None, seq_len: int) -> float:
    """Student forward + backward (3x forward) plus the teacher forward (none for plain LM training)."""
    flops = 3 * forward_flops_per_token(student, seq_len)
    return flops + (forward_flops_per_token(teacher, seq_len) if teacher is not None else 0.0)


class MetricsWriter:
    """``metrics.jsonl`` (one JSON object per logged step) and TensorBoard scalars under ``tensorboard/``."""

    def __init__(self, workdir: str | Path, tensorboard: bool = True):
        self.enabled = jax.process_index() == 0
        self._jsonl = self._tb = None
        if not self.enabled:
            return
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(workdir / "metrics.jsonl", "a", buffering=1)
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(workdir / "tensorboard"))

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        if self._tb is not None:
            for name, value in metrics.items():
                self._tb.add_scalar(f"train/{name}", value, step)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
