"""Model FLOPs for MFU, and the metrics sinks: JSONL and TensorBoard event files (process 0 only)."""

from __future__ import annotations

import json
from pathlib import Path

import jax

from m2d_jax.models import ModelConfig


def mean_context(seq_len: int, window: int | None = None) -> float:
    """Mean number of keys a query attends to over a causal sequence of ``seq_len`` (within ``window`` if given)."""
    if window is None or window >= seq_len:
        return (seq_len + 1) / 2
    return (window * (window + 1) / 2 + (seq_len - window) * window) / seq_len


def attention_flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Matmul FLOPs of one token's attention in all layers: the projections (GQA q/k/v/o; MLA's low-rank query,
    compressed key/value latent, its per-head expansion and o) plus scores and weighted values over the mean causal
    context of each layer (sliding-window layers see at most the window)."""
    a, d = config.attention, config.hidden_size
    if a.mla is None:
        qk_dim = v_dim = a.head_dim
        projections = 2 * d * (2 * a.num_heads * a.head_dim + 2 * a.num_kv_heads * a.head_dim)
    else:
        m = a.mla
        qk_dim, v_dim = m.qk_nope_head_dim + m.qk_rope_head_dim, m.v_head_dim
        q = (2 * d * a.num_heads * qk_dim if m.q_lora_rank is None
             else 2 * d * m.q_lora_rank + 2 * m.q_lora_rank * a.num_heads * qk_dim)
        kv = 2 * d * (m.kv_lora_rank + m.qk_rope_head_dim) + 2 * m.kv_lora_rank * a.num_heads * (
            m.qk_nope_head_dim + v_dim)
        projections = q + kv + 2 * a.num_heads * v_dim * d
    total = 0.0
    for layer_type in a.layer_types:
        window = a.sliding_window if layer_type == "sliding_attention" else None
        total += projections + 2 * a.num_heads * (qk_dim + v_dim) * mean_context(seq_len, window)
    return total


def forward_flops_per_token(config: ModelConfig, seq_len: int, top_k: int = 0) -> float:
    """Matmul FLOPs (2 per multiply-add) of one token's forward pass: attention (``attention_flops_per_token``),
    each layer's FFN (dense; or router + the ``top_k`` routed experts (0 = as trained) + the shared experts), and
    the LM head."""
    d = config.hidden_size
    total = attention_flops_per_token(config, seq_len) + 2 * d * config.vocab_size
    for kind in config.ffn_kinds:
        if kind == "moe":
            experts = config.moe.experts
            k = top_k or config.moe.router.top_k
            total += (2 * d * experts.num_experts + k * 3 * 2 * d * experts.intermediate_size
                      + 3 * 2 * d * experts.shared_size)
        else:
            total += 3 * 2 * d * config.ffn.intermediate_size
    return total


def train_flops_per_token(student: ModelConfig, teacher: ModelConfig | None, seq_len: int,
                          teacher_top_k: int = 0) -> float:
    """Student forward + backward (3x forward) plus the teacher forward (routed to ``teacher_top_k`` experts per
    token, 0 = as trained; none for plain LM training)."""
    flops = 3 * forward_flops_per_token(student, seq_len)
    return flops + (forward_flops_per_token(teacher, seq_len, teacher_top_k) if teacher is not None else 0.0)


class MetricsWriter:
    """``metrics.jsonl`` (one JSON object per logged step) and TensorBoard scalars under ``tensorboard/``.

    A run resumed at ``resume_step`` first drops the rows a killed run logged after that step (they are logged
    again), so every step appears once."""

    def __init__(self, workdir: str | Path, tensorboard: bool = True, resume_step: int = 0):
        self.enabled = jax.process_index() == 0
        self._jsonl = self._tb = None
        if not self.enabled:
            return
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        path = workdir / "metrics.jsonl"
        if path.exists():
            from m2d_jax.artifacts import atomic_write

            kept = [row for row in path.read_text().splitlines() if row and json.loads(row)["step"] <= resume_step]
            atomic_write(path, lambda tmp: Path(tmp).write_text("".join(row + "\n" for row in kept)),
                         overwrite=True)
        self._jsonl = open(path, "a", buffering=1)
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
