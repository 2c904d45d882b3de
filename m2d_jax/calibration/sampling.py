"""The calibration set and its Gram subsample: which windows, which positions, in which batches.

The Gram subsample is a function of the data only: sequence ``i`` (its index in the calibration set) contributes
``floor((i+1) G/N) - floor(i G/N)`` valid positions drawn with ``default_rng([seed, i])``, so the subsample does not
depend on batching or sharding.
"""

from __future__ import annotations

import logging

import numpy as np

logger = logging.getLogger(__name__)


def calibration_windows(windows: np.ndarray, num_seqs: int, seed: int = 0) -> np.ndarray:
    """The calibration set: ``num_seqs`` of the packed token windows [N, T] chosen with ``seed``, in data order
    (all of them, with a warning, when there are fewer)."""
    if len(windows) < num_seqs:
        logger.warning("only %d sequences of %d tokens in the data (asked for %d): using all of them",
                       len(windows), windows.shape[1], num_seqs)
        num_seqs = len(windows)
    return windows[np.sort(np.random.default_rng(seed).permutation(len(windows))[:num_seqs])]


def gram_quota(seq_id: int, num_seqs: int, gram_tokens: int) -> int:
    """Gram positions owed by sequence ``seq_id`` of ``num_seqs`` (the quotas sum to ``gram_tokens``)."""
    return (seq_id + 1) * gram_tokens // num_seqs - seq_id * gram_tokens // num_seqs


def gram_slots(batch_size: int, num_seqs: int, gram_tokens: int, seq_len: int, chunk: int) -> int:
    """Static number of Gram slots per batch (a multiple of the chunk)."""
    most = min(-(-gram_tokens // num_seqs), seq_len) * batch_size
    c = max(1, min(chunk, most))
    return max(c, -(-most // c) * c)


def gram_positions(attention_mask, seq_ids, num_seqs: int, gram_tokens: int, seed: int, slots: int):
    """The Gram subsample of one batch: (index [slots] flattened positions, valid [slots]).

    attention_mask [B, T]; seq_ids [B] the rows' indices in the calibration set (-1 for filler rows).
    """
    mask = np.asarray(attention_mask)
    seq_len = mask.shape[1]
    picked = []
    for row, sid in enumerate(seq_ids):
        if sid < 0:
            continue
        positions = np.flatnonzero(mask[row])
        n = min(gram_quota(int(sid), num_seqs, gram_tokens), len(positions))
        chosen = np.sort(np.random.default_rng([seed, int(sid)]).choice(positions, n, replace=False))
        picked.append(row * seq_len + chosen)
    picked = np.concatenate(picked) if picked else np.zeros(0, np.int64)
    if len(picked) > slots:
        raise ValueError(f"batch needs {len(picked)} Gram slots, only {slots} available")
    index = np.zeros(slots, np.int32)
    index[:len(picked)] = picked
    return index, (np.arange(slots) < len(picked)).astype(np.int32)



def calibration_batches(windows: np.ndarray, batch_size: int, shard_index: int = 0, shard_count: int = 1):
    """(input_ids, attention_mask, seq_ids) batches of this shard, served by grain; the last batch is filled with
    masked rows (seq id -1) so every batch has the same static shape."""
    from m2d_jax.data import packed_dataset

    seq_ids = np.arange(len(windows))
    ds = packed_dataset(windows, batch_size, shuffle=False, shard_index=shard_index, shard_count=shard_count,
                        drop_remainder=False)
    ids_ds = packed_dataset(seq_ids[:, None], batch_size, shuffle=False, shard_index=shard_index,
                            shard_count=shard_count, drop_remainder=False)
    for batch, sid in zip(ds, ids_ds):
        ids, mask, sid = batch["input_ids"], batch["attention_mask"], sid["input_ids"][:, 0]
        short = batch_size - ids.shape[0]
        if short:
            ids = np.concatenate([ids, np.zeros((short, ids.shape[1]), ids.dtype)])
            mask = np.concatenate([mask, np.zeros((short, mask.shape[1]), mask.dtype)])
            sid = np.concatenate([sid, np.full(short, -1, sid.dtype)])
        yield ids, mask, sid
