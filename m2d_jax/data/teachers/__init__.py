"""The teachers the project trains and ships (``m2d train-teacher configs/teachers/NAME.py`` re-creates each).

Each is an HF checkpoint directory (config.json, model.safetensors, tokenizer.json; transformers loads it with no
custom code) plus ``training.json``, the record of its training run (tokens, steps, time, final train loss,
held-out perplexity, per-layer expert load). Both share one byte-level BPE tokenizer trained on the corpus' train
split (``m2d_jax.data.corpus``):

    moe     Qwen3-MoE class (Qwen3MoeForCausalLM)
    dense   Qwen3 dense class (Qwen3ForCausalLM) of about the MoE's total parameter count, trained on the same tokens

``moe/acceptance.json`` is the training record of the MoE teacher's acceptance baseline, a dense Qwen3 of its
ACTIVE parameter count trained on the same tokens (``configs/teachers/dense_active.py``; its weights are not shipped).
"""

from __future__ import annotations

from pathlib import Path

from m2d_jax.errors import DataError

TEACHERS = ("moe", "dense")
TEACHERS_DIR = Path(__file__).parent
TRAINING_RECORD = "training.json"
ACCEPTANCE_RECORD = "acceptance.json"  # in moe/: the dense-active-size baseline's training record


def teacher_dir(name: str) -> Path:
    """The HF directory of the shipped teacher ``name`` ("moe" | "dense")."""
    if name not in TEACHERS:
        raise DataError(f"teacher {name!r}: expected one of {TEACHERS}")
    path = TEACHERS_DIR / name
    if not (path / "config.json").is_file():
        raise DataError(f"{path}: shipped teacher {name!r} is missing (m2d train-teacher configs/teachers/{name}.py "
                        f"--out {path})")
    return path
