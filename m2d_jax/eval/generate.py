"""Autoregressive decoding with a KV cache: greedy, or temperature / top-p sampling.

Prompts are left-padded to a length bucket and the cache has a bucketed number of slots, so a run compiles one
prefill and one decode step per (batch, prompt bucket, cache bucket) shape, never per token or per prompt.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from m2d_jax.distributed import replicated_rows, to_host
from m2d_jax.eval.scoring import bucket_for, length_buckets

log = logging.getLogger(__name__)


def _select(logits, key, temperature, top_p):
    """Next tokens [B] from logits [B, V]: argmax when ``temperature`` == 0, else a top-p sample at temperature."""
    logits = logits.astype(jnp.float32)

    def sample():
        probs = jax.nn.softmax(logits / temperature, axis=-1)
        order = jnp.argsort(-probs, axis=-1)  # [B, V] most likely first
        sorted_probs = jnp.take_along_axis(probs, order, axis=-1)
        keep = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs < top_p  # the nucleus (always keeps the top token)
        choice = jax.random.categorical(key, jnp.where(keep, jnp.log(sorted_probs), -jnp.inf), axis=-1)
        return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)

    return jax.lax.cond(temperature > 0, sample, lambda: jnp.argmax(logits, axis=-1).astype(jnp.int32))


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
def _prefill(graphdef, state, cache, ids, mask, key, temperature, top_p):
    model = nnx.merge(graphdef, state)
    hidden, cache = model.hidden_states(ids, mask, cache=cache)
    return _select(model.logits(hidden[:, -1]), key, temperature, top_p), cache


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
def _decode_step(graphdef, state, cache, tokens, key, temperature, top_p):
    model = nnx.merge(graphdef, state)
    hidden, cache = model.hidden_states(tokens[:, None], jnp.ones_like(tokens)[:, None], cache=cache)
    return _select(model.logits(hidden[:, -1]), key, temperature, top_p), cache


def generate_tokens(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, temperature: float = 0.0,
                    top_p: float = 1.0, eos_ids: Sequence[int] = (), stop: Callable[[list[int]], bool] | None = None,
                    batch_size: int | None = None, pad_id: int = 0, seed: int = 0,
                    min_bucket: int = 32, mesh=None) -> list[list[int]]:
    """New tokens for each prompt (token ids), at most ``max_new_tokens``.

    A row stops after an ``eos_ids`` token (not included in its output) or when ``stop(row_tokens)`` is true (the
    tokens so far included; e.g. an ``until`` string appeared). ``batch_size`` pads the batch to a fixed size.
    With a ``mesh`` (the model's parameters placed on it, e.g. ``pipeline.load_model``; multi-host: every process
    calls this with the same prompts) the prompts, cache and sampling key are replicated on its devices and every
    process decodes the same tokens.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    max_pos = model.config.max_position_embeddings
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > max_pos:
        raise ValueError(f"prompt of {longest} tokens + {max_new_tokens} new tokens exceeds the model's "
                         f"max_position_embeddings={max_pos}")
    rows = batch_size or len(prompts)
    if rows < len(prompts):
        raise ValueError(f"batch_size={rows} is smaller than the {len(prompts)} prompts")
    prompt_len = bucket_for(longest, length_buckets(max_pos, min_bucket))
    cache_len = bucket_for(prompt_len + max_new_tokens, length_buckets(prompt_len + max_pos, min_bucket))
    ids = np.full((rows, prompt_len), pad_id, np.int32)
    mask = np.zeros((rows, prompt_len), np.int32)
    for i, p in enumerate(prompts):  # left padding: every row's last prompt token is at the same slot
        ids[i, prompt_len - len(p):] = p
        mask[i, prompt_len - len(p):] = 1
    ids[len(prompts):, -1], mask[len(prompts):, -1] = pad_id, 1  # filler rows: one token, output ignored

    graphdef, state = nnx.split(model)
    temperature, top_p = np.float32(temperature), np.float32(top_p)
    place = jnp.asarray if mesh is None else functools.partial(replicated_rows, mesh=mesh)
    key = jax.random.wrap_key_data(place(np.asarray(jax.random.key_data(jax.random.key(seed)))))
    cache = jax.tree.map(lambda a: place(np.zeros(a.shape, a.dtype)),
                         jax.eval_shape(lambda: model.init_cache(rows, cache_len)))  # the empty cache
    key, sub = jax.random.split(key)
    start = time.perf_counter()
    tokens, cache = _prefill(graphdef, state, cache, place(ids), place(mask), sub, temperature, top_p)
    outputs: list[list[int]] = [[] for _ in prompts]
    done = np.zeros(len(prompts), bool)
    eos = set(int(e) for e in eos_ids)
    for step in range(max_new_tokens):
        host = to_host(tokens)
        for i in np.flatnonzero(~done):
            if int(host[i]) in eos:
                done[i] = True
                continue
            outputs[i].append(int(host[i]))
            done[i] = stop is not None and stop(outputs[i])
        if done.all() or step == max_new_tokens - 1:
            break
        key, sub = jax.random.split(key)
        tokens, cache = _decode_step(graphdef, state, cache, tokens, sub, temperature, top_p)
    elapsed = time.perf_counter() - start
    log.info("generated %d tokens for %d prompts in %.2fs (%.1f tokens/s)", sum(map(len, outputs)), len(prompts),
             elapsed, sum(map(len, outputs)) / max(elapsed, 1e-9))
    return outputs


def generate(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 64, until: Sequence[str] = (),
             **kwargs) -> list[str]:
    """Text continuations of text ``prompts`` (an m2d_jax.data tokenizer), cut before the first ``until`` string."""
    encoded = tokenizer.encode_batch(list(prompts))

    def stop(row):
        return bool(until) and any(u in tokenizer.decode(row) for u in until)

    outs = generate_tokens(model, encoded, max_new_tokens, eos_ids=[tokenizer.eos_id], stop=stop, **kwargs)
    texts = []
    for row in outs:
        text = tokenizer.decode(row)
        for u in until:
            text = text.split(u)[0]
        texts.append(text)
    return texts
