"""Shared by tests/test_distill_*.py: a tiny Qwen3-MoE teacher and Qwen3 dense student (same vocabulary) built with
transformers, a BPE tokenizer trained on the embedded corpus, and a small config over them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from conftest import corpus_documents

from m2d_jax.config_utils import load_config
from m2d_jax.data import train_bpe_tokenizer
from m2d_jax.hf.oracle import make_hf_checkpoint

VOCAB = 320  # byte-level BPE needs > 256
TEACHER = dict(model_type="qwen3_moe", vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=2, num_key_value_heads=1, head_dim=16, moe_intermediate_size=16, num_experts=4,
               num_experts_per_tok=2, norm_topk_prob=True, max_position_embeddings=128, tie_word_embeddings=False)
STUDENT = dict(model_type="qwen3", vocab_size=VOCAB, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
               num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=128,
               tie_word_embeddings=False)


def build_models(root: Path) -> dict[str, Path]:
    """{"teacher", "student", "tokenizer", "data"} under ``root``: the tokenizer is copied into both models; data is
    a jsonl of the real-text documents the tokenizer was trained on."""
    root = Path(root)
    tok_dir = root / "tokenizer"
    docs = corpus_documents(60)
    train_bpe_tokenizer(docs, VOCAB, tok_dir)
    data = root / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    out = {"tokenizer": tok_dir, "data": data}
    for name, hf_config, seed in (("teacher", TEACHER, 1), ("student", STUDENT, 2)):
        d = make_hf_checkpoint(hf_config, root / name, seed=seed, init_std=0.2)
        for f in tok_dir.iterdir():
            shutil.copy(f, d / f.name)
        out[name] = d
    return out


def as_overrides(config, prefix="") -> list[str]:
    """A config as ``--config.KEY=VALUE`` command-line overrides."""
    out = []
    for key, value in config.items():
        if hasattr(value, "items"):
            out += as_overrides(value, f"{prefix}{key}.")
        else:
            out.append(f"--config.{prefix}{key}={value!r}" if not isinstance(value, str) else
                       f"--config.{prefix}{key}={value}")
    return out


def tiny_config(models: dict[str, Path], workdir: Path, **changes):
    """configs/distill/base.py shrunk to the tiny models: 8 sequences of 32 tokens per step, checkpoints every 2."""
    config = load_config("distill/base")
    config.teacher.path = str(models["teacher"])
    config.teacher.dtype = "float32"
    config.student.path = str(models["student"])
    config.data.files = (str(models["data"]),)
    config.data.seq_len = 32
    config.data.batch_size = 8
    config.loss.chunk = 8
    config.steps = 6
    config.schedule.warmup_steps = 2
    config.schedule.decay_steps = 2
    config.optimizer.learning_rate = 3e-3
    config.checkpoint.every = 2
    config.logging.every = 1
    config.logging.progress = False
    config.workdir = str(workdir)
    for key, value in changes.items():
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config
