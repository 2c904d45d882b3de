"""Perplexity with the WikiText-2 protocol (docs/METHOD.md §12.1).

Documents are joined with "\\n\\n" and tokenised once (no BOS, no EOS). Windows of ``seq_len`` tokens start every
``stride`` tokens; window ``[begin, end)`` predicts its tokens ``max(previous end, begin + 1) .. end - 1``, so with
``stride == seq_len`` windows are disjoint (the first token of each window is context only) and with
``stride < seq_len`` every token after the first is scored exactly once, with up to ``seq_len - 1`` tokens of
context. PPL = exp(total NLL / scored tokens).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path
from typing import Sequence

import jax
import numpy as np

from m2d_jax.data import DataError
from m2d_jax.distributed import stage_mesh
from m2d_jax.eval.scoring import target_logprobs

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    nll: float  # total negative log-likelihood (nats) over the scored tokens
    tokens: int  # scored (predicted) tokens
    windows: int
    seq_len: int
    stride: int

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def perplexity_windows(num_tokens: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored token) of each window over a stream of ``num_tokens`` tokens."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    if not 0 < stride <= seq_len:
        raise ValueError(f"stride must be in [1, seq_len={seq_len}], got {stride}")
    windows, prev_end = [], 0
    for begin in range(0, num_tokens, stride):
        end = min(begin + seq_len, num_tokens)
        first = max(prev_end, begin + 1)
        if first < end:
            windows.append((begin, end, first))
        prev_end = end
        if end == num_tokens:
            break
    return windows


def protocol_tokens(docs: Sequence[str], tokenizer) -> np.ndarray:
    """The token stream the protocol scores: the documents joined with "\\n\\n", tokenised once (no BOS, no EOS)."""
    (ids,) = tokenizer.encode_batch(["\n\n".join(docs)])
    return np.asarray(ids, np.int32)


def perplexity(model, tokens: np.ndarray, seq_len: int = 2048, stride: int | None = None,
               batch_size: int = 8, mesh=None, progress: bool = True) -> PerplexityResult:
    """Token-level perplexity of ``model`` on one token stream ``tokens`` [N] (see the module docstring).

    Windows are batched as [batch_size, seq_len] (the last window right-padded, the last batch padded with empty
    rows), so the forward compiles once. With a ``mesh`` (the model's parameters placed on it), each batch is split
    over the mesh's batch axes, every process placing its own rows (``distributed.global_batch``), and the forward
    keeps every activation's batch sharded; every process gets the log-probabilities of the whole batch and so the
    same result.
    """
    stride = seq_len if stride is None else stride
    max_pos = model.config.max_position_embeddings
    if seq_len > max_pos:
        raise ValueError(f"seq_len={seq_len} exceeds the model's max_position_embeddings={max_pos}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    tokens = np.asarray(tokens, np.int32)
    if tokens.ndim != 1 or len(tokens) < 2:
        raise DataError(f"need a token stream of at least 2 tokens, got shape {tokens.shape}")
    windows = perplexity_windows(len(tokens), seq_len, stride)
    num_rows = -(-len(windows) // batch_size) * batch_size
    inputs = np.zeros((num_rows, seq_len), np.int32)
    targets = np.zeros((num_rows, seq_len), np.int32)
    mask = np.zeros((num_rows, seq_len), np.int32)
    scored = np.zeros((num_rows, seq_len), bool)  # position j of a row predicts token begin + j + 1
    for row, (begin, end, first) in enumerate(windows):
        n = end - begin
        inputs[row, :n] = tokens[begin:end]
        targets[row, :n - 1] = tokens[begin + 1:end]
        mask[row, :n] = 1
        scored[row, first - begin - 1:n - 1] = True

    from tqdm import tqdm

    nll, start = 0.0, time.perf_counter()
    for i in tqdm(range(0, num_rows, batch_size), desc="perplexity", unit="batch",
                  disable=not progress or jax.process_index() != 0):
        rows = slice(i, i + batch_size)
        logprob, _ = target_logprobs(model, inputs[rows], targets[rows], mask[rows], mesh=mesh)
        nll -= float(np.sum(logprob.astype(np.float64), where=scored[rows]))
    count = int(scored.sum())
    elapsed = time.perf_counter() - start
    log.info("perplexity: %d windows, %d scored tokens in %.1fs (%.0f tokens/s)", len(windows), count, elapsed,
             mask.sum() / max(elapsed, 1e-9))
    return PerplexityResult(ppl=math.exp(nll / count), nll=nll, tokens=count, windows=len(windows),
                            seq_len=seq_len, stride=stride)


def evaluate_perplexity(model_path: str | Path, files: Sequence[str | Path], seq_len: int = 2048,
                        stride: int | None = None, batch_size: int = 8, dtype: str = "float32",
                        text_field: str = "text", tokenizer_path: str | Path | None = None, mesh=None,
                        **config_overrides) -> PerplexityResult:
    """``m2d eval ppl``: load the model, read local text/jsonl/parquet ``files``, join the documents with "\\n\\n",
    tokenise once with the model directory's tokenizer (or ``tokenizer_path``) and compute ``perplexity``.

    ``mesh`` (a ``Mesh`` or axis sizes; default in a multi-process run: all devices on ``fsdp``,
    ``distributed.stage_mesh``) imports the model sharded onto it and splits every batch over it. Every process
    tokenises the whole stream (the windows depend on all of it) and places its own rows of each batch."""
    from m2d_jax.data import load_tokenizer, read_documents
    from m2d_jax.pipeline import load_model

    docs = read_documents(files, text_field=text_field)
    tokenizer = load_tokenizer(tokenizer_path or model_path)
    mesh = stage_mesh(mesh)
    model = load_model(model_path, dtype, mesh, **config_overrides)
    max_pos = model.config.max_position_embeddings
    if seq_len > max_pos:  # before tokenising a large corpus
        raise ValueError(f"--seq-len {seq_len} exceeds the model's max_position_embeddings={max_pos}")
    ids = protocol_tokens(docs, tokenizer)
    log.info("perplexity data: %d documents, %d tokens", len(docs), len(ids))
    return perplexity(model, ids, seq_len=seq_len, stride=stride, batch_size=batch_size, mesh=mesh)
