"""Jitted token scoring shared by perplexity and the lm-eval backend."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from m2d_jax.distributed import to_host

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


@functools.partial(jax.jit, static_argnames=("graphdef", "chunk"))
def _target_logprobs(graphdef, state, inputs, targets, attention_mask, chunk):
    model = nnx.merge(graphdef, state)
    hidden = model.hidden_states(inputs, attention_mask)  # [B, T, d]
    b, t, d = hidden.shape
    n = b * t
    chunk = min(chunk, n)
    pad = -n % chunk
    h = jnp.pad(hidden.reshape(n, d), ((0, pad), (0, 0))).reshape(-1, chunk, d)  # [chunks, C, d]
    y = jnp.pad(targets.reshape(n), (0, pad)).reshape(-1, chunk)  # [chunks, C]

    def score(args):
        hc, yc = args
        logits = model.logits(hc).astype(jnp.float32)  # [C, V]
        target = jnp.take_along_axis(logits, yc[:, None], axis=-1)[:, 0]
        return target - jax.nn.logsumexp(logits, axis=-1), jnp.argmax(logits, axis=-1) == yc

    logprob, greedy = jax.lax.map(score, (h, y))
    return logprob.reshape(-1)[:n].reshape(b, t), greedy.reshape(-1)[:n].reshape(b, t)


def target_logprobs(model, inputs, targets, attention_mask) -> tuple[np.ndarray, np.ndarray]:
    """log p(targets[b, t] | inputs[b, :t+1]) float32 [B, T] and whether each target is the argmax, bool [B, T].

    One compilation per (B, T); the LM head runs on chunks of ``LOGITS_CHUNK`` tokens so the full float32
    [B, T, vocab] logits are never materialised.
    """
    graphdef, state = nnx.split(model)
    logprob, greedy = _target_logprobs(graphdef, state, jnp.asarray(inputs, jnp.int32),
                                       jnp.asarray(targets, jnp.int32), jnp.asarray(attention_mask, jnp.int32),
                                       chunk=LOGITS_CHUNK)
    return to_host(logprob), to_host(greedy)
