"""transformers as the oracle: build tiny random HF checkpoints and compute reference logits.

Everything here imports torch lazily (it is only in the ``test`` extra); the pipeline itself never imports this.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _torch():
    try:
        import torch
    except ImportError as err:  # pragma: no cover - depends on the install
        raise ImportError("this needs torch (the reference implementation): pip install -e '.[test]'") from err
    return torch


def make_hf_checkpoint(hf_config: dict, out_dir: str | Path, seed: int = 0, max_shard_size: str | None = None,
                       init_std: float | None = None) -> Path:
    """A random transformers model from ``hf_config`` (must contain ``model_type``) saved with ``save_pretrained``.

    ``init_std`` overrides ``initializer_range`` so tiny random models have non-trivial logits.
    """
    torch = _torch()
    import transformers

    kwargs = dict(hf_config)
    model_type = kwargs.pop("model_type")
    if init_std is not None:
        kwargs["initializer_range"] = init_std
    config = transformers.AutoConfig.for_model(model_type, **kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    save_kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out_dir, **save_kwargs)
    return Path(out_dir)


def load_reference(path: str | Path):
    """The transformers model of a checkpoint directory in float32 with eager attention and experts."""
    torch = _torch()
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager", experts_implementation="eager").eval()


def reference_logits(model_or_path, input_ids: np.ndarray, attention_mask: np.ndarray | None = None,
                     position_ids: np.ndarray | None = None) -> np.ndarray:
    """float32 logits [batch, seq, vocab] from transformers."""
    torch = _torch()
    model = load_reference(model_or_path) if isinstance(model_or_path, (str, Path)) else model_or_path
    kwargs = {"input_ids": torch.tensor(np.array(input_ids), dtype=torch.long)}
    if attention_mask is not None:
        kwargs["attention_mask"] = torch.tensor(np.array(attention_mask), dtype=torch.long)
    if position_ids is not None:
        kwargs["position_ids"] = torch.tensor(np.array(position_ids), dtype=torch.long)
    with torch.no_grad():
        return model(**kwargs).logits.float().numpy()


def padded_batch(vocab_size: int, batch: int, seq: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random token ids and an attention mask with left padding on row 0 and right padding on row 1."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab_size, size=(batch, seq))
    mask = np.ones((batch, seq), np.int64)
    if batch > 0:
        mask[0, : seq // 3] = 0
    if batch > 1:
        mask[1, seq - seq // 4:] = 0
    return ids, mask
