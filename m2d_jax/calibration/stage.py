"""The calibration stage in memory: a teacher and its calibration set -> ``CalibrationStats``."""

from __future__ import annotations

import logging
import time

import jax
import numpy as np

from m2d_jax.calibration.observe import accumulate
from m2d_jax.calibration.sampling import calibration_batches
from m2d_jax.calibration.types import FORMAT, CalibrationStats, config_hash
from m2d_jax.models import CausalLM

logger = logging.getLogger(__name__)


def calibrate(teacher: CausalLM, windows: np.ndarray, gram_tokens: int = 32768, batch_size: int = 8, seed: int = 0,
              gram_chunk: int = 256, shard_index: int = 0, shard_count: int = 1,
              show_progress: bool = False, mesh=None) -> CalibrationStats:
    """Statistics of ``teacher`` on the calibration set ``windows`` [N, T] (token ids, every position valid).

    The Gram subsample has ``min(gram_tokens, N * T)`` positions chosen with ``seed`` (see ``sampling``); this call
    processes shard ``shard_index`` of ``shard_count`` of the windows (combine the shards' results with
    ``combine_stats``). Tokenising text files into windows is ``m2d_jax.pipeline.calibrate_files``' job.

    With a ``mesh`` (the teacher's parameters placed on it, e.g. by ``distill.train.load_for_mesh``), each batch is
    split over the mesh's batch axes, every process placing its own rows (``distributed.global_batch``): the
    per-batch sums are reduced across devices and processes inside the jitted step, so every process of a
    multi-process run returns the same statistics of the whole batch. ``batch_size`` must divide over the batch
    axes.
    """
    from tqdm.auto import tqdm

    import m2d_jax

    config = teacher.config
    if not config.is_moe:
        raise ValueError(f"{config.family} model has no MoE layers to calibrate")
    windows = np.asarray(windows)
    if windows.ndim != 2 or windows.size == 0:
        raise ValueError(f"calibration windows must be a non-empty [sequences, seq_len] array, got {windows.shape}")
    if batch_size <= 0 or gram_tokens < 0 or not 0 <= shard_index < shard_count:
        raise ValueError(f"need batch_size > 0, gram_tokens >= 0 and 0 <= shard_index < shard_count "
                         f"(got {batch_size}, {gram_tokens}, {shard_index}, {shard_count})")
    if windows.min() < 0 or windows.max() >= config.vocab_size:
        raise ValueError(f"calibration windows hold token ids outside [0, {config.vocab_size}) of the model's vocab")
    num_seqs, seq_len = windows.shape
    gram_tokens = min(gram_tokens, num_seqs * seq_len)
    shard_tokens = len(range(shard_index, num_seqs, shard_count)) * seq_len
    start = time.perf_counter()
    quiet = not show_progress or jax.process_index() != 0  # one bar per run, on process 0
    with tqdm(total=shard_tokens, unit="tok", unit_scale=True, desc="calibrate", disable=quiet) as bar:
        sums = accumulate(teacher, calibration_batches(windows, batch_size, shard_index, shard_count), num_seqs,
                          gram_tokens, seed, gram_chunk, bar, mesh)
    seconds = time.perf_counter() - start
    logger.info("calibration: %d tokens in %.1f s (%.0f tokens/s, incl. compile)", sums.tokens[0], seconds,
                sums.tokens[0] / max(seconds, 1e-9))
    metadata = dict(
        format=FORMAT, m2d_jax_version=m2d_jax.__version__, config_hash=config_hash(config), family=config.family,
        num_experts=config.moe.experts.num_experts, num_experts_per_layer=list(config.moe_layer_experts),
        top_k=teacher.runtime.top_k_for(config),
        norm_topk_prob=config.moe.router.norm_topk_prob,
        hidden_size=config.hidden_size, moe_layers=list(config.moe_layers), seq_len=seq_len, num_seqs=num_seqs,
        seed=seed, gram_tokens_requested=gram_tokens, tokens_seen=int(sums.tokens[0]),
        gram_tokens_seen=int(sums.gram_tokens[0]), batch_size=batch_size, shards=[shard_index],
        shard_count=shard_count, seconds=seconds)
    return CalibrationStats(sums, metadata)
