"""Training input: local text -> tokenizer -> packed windows -> grain (shuffled, sharded by process) -> global
arrays on the mesh, with an iterator state that checkpoints and restores exactly."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from m2d_jax.data import DataError, load_tokenizer, pack_documents, packed_dataset, read_documents, tokenize_documents
from m2d_jax.distill.sharding import batch_sharding

log = logging.getLogger(__name__)


def load_windows(files: Sequence[str], tokenizer_dir: str | Path, seq_len: int, text_field: str = "text"):
    """Packed token windows int32 [num_seqs, seq_len] of ``files`` (``"embedded:train"`` = the embedded corpus'
    train split)."""
    tokenizer = load_tokenizer(tokenizer_dir)
    tokens = tokenize_documents(read_documents(files, text_field), tokenizer)
    windows = pack_documents(tokens, seq_len)
    log.info("data: %d tokens -> %d windows of %d", len(tokens), len(windows), seq_len)
    return windows, tokenizer


class BatchStream:
    """Endless global batches {"input_ids", "attention_mask"}: int32 [batch, seq] sharded over (data, fsdp).

    Each process reads its own shard of the shuffled windows (``jax.process_index()`` of ``jax.process_count()``)
    and contributes ``batch_size / process_count`` rows. ``state()`` / ``restore(state)`` give exact resume.
    """

    def __init__(self, windows: np.ndarray, batch_size: int, seed: int, mesh: Mesh):
        local = batch_size // jax.process_count()
        if len(windows) < batch_size:
            raise DataError(f"only {len(windows)} packed sequences, fewer than config.data.batch_size={batch_size}")
        self._dataset = packed_dataset(windows, local, seed=seed, shard_index=jax.process_index(),
                                       shard_count=jax.process_count(), num_epochs=None)
        self._iterator = iter(self._dataset.to_iter_dataset())
        self._sharding = batch_sharding(mesh)

    def __next__(self) -> dict[str, jax.Array]:
        local = next(self._iterator)
        return {k: jax.make_array_from_process_local_data(self._sharding, v) for k, v in local.items()}

    def __iter__(self):
        return self

    def state(self) -> dict:
        return self._iterator.get_state()

    def restore(self, state: dict) -> None:
        self._iterator = iter(self._dataset.to_iter_dataset())
        self._iterator.set_state(state)
