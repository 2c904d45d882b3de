"""Jitted token scoring shared by perplexity and the lm-eval backend."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from m2d_jax.distill.loss import logits_layout, split_position_chunks
from m2d_jax.distributed import device_rows, to_host, traced_on

LOGITS_CHUNK = 2048  # tokens per LM-head chunk: bounds the float32 logits buffer to LOGITS_CHUNK x vocab


def length_buckets(max_len: int, smallest: int = 32) -> list[int]:
    """Padded lengths XLA compiles for: powers of two from ``smallest`` up to ``max_len`` (always included)."""
    buckets, n = [], smallest
    while n < max_len:
        buckets.append(n)
        n *= 2
    return buckets + [max_len]


def bucket_for(length: int, buckets: list[int]) -> int:
    for b in buckets:
        if length <= b:
            return b
    raise ValueError(f"length {length} exceeds the largest bucket {buckets[-1]}")


@functools.partial(jax.jit, static_argnames=("graphdef", "chunk", "mesh"))
def _target_logprobs(graphdef, state, inputs, targets, attention_mask, chunk, mesh=None):
    with traced_on(mesh):  # with a mesh: every activation keeps the batch sharded (distributed.traced_on)
        model = nnx.merge(graphdef, state)
        hidden = model.hidden_states(inputs, attention_mask)  # [B, T, d]
        b, t, _ = hidden.shape
        positions = max(1, min(chunk // b, t))  # sequence positions per LM-head chunk: about ``chunk`` tokens

        def score(args):
            hc, yc = args  # [B, c, d], [B, c]
            logits = logits_layout(model.logits(hc).astype(jnp.float32))  # [B, c, V]
            target = jnp.take_along_axis(logits, yc[..., None], axis=-1)[..., 0]
            return target - jax.nn.logsumexp(logits, axis=-1), jnp.argmax(logits, axis=-1) == yc

        # [chunks, B, c] -> [B, T]
        chunks = tuple(split_position_chunks(x, positions) for x in (hidden, targets))  # [chunks, B, c, ...]
        logprob, greedy = jax.lax.map(score, chunks)
        return tuple(jnp.moveaxis(x, 0, 1).reshape(b, -1)[:, :t] for x in (logprob, greedy))


def target_logprobs(model, inputs, targets, attention_mask, mesh=None) -> tuple[np.ndarray, np.ndarray]:
    """log p(targets[b, t] | inputs[b, :t+1]) float32 [B, T] and whether each target is the argmax, bool [B, T].

    One compilation per (B, T); the LM head runs on sequence chunks of about ``LOGITS_CHUNK`` tokens so the full
    float32 [B, T, vocab] logits are never materialised. With a ``mesh`` (the model's parameters placed on it), host
    rows are split over the mesh's batch axes (``distributed.global_batch``; B must divide over them), the forward
    keeps every activation's batch sharded, and every process gets the whole [B, T] result.
    """
    graphdef, state = nnx.split(model)
    batch = [device_rows(x, mesh, np.int32) for x in (inputs, targets, attention_mask)]
    logprob, greedy = _target_logprobs(graphdef, state, *batch, chunk=LOGITS_CHUNK, mesh=mesh)
    return to_host(logprob), to_host(greedy)
