"""The observed forward: one jitted pass of the teacher whose MoE layers report their routing and expert outputs
(``MoEView``) and are reduced to ``StatSums`` on device; ``accumulate`` streams batches into float64 host sums.

Everything is derived from what the MoE layer exposes to its observer: ``routing.probs`` (full softmax),
``routing.top_idx`` / ``routing.top_weight`` (the family's own routing rule, never re-implemented here),
``expert_out`` (routed outputs: norms for free) and ``experts`` + ``act`` (all E experts evaluated on the Gram
subsample with ``all_expert_outputs``, one [E, chunk, d] block at a time).

Precision: each batch's sums are float32 reductions on device over at most ``batch * seq`` tokens (relative error
bounded by ~``n * 2^-24`` of the sum of magnitudes in the worst case, ~``sqrt(n) * 2^-24`` typically; the Gram uses
``Precision.HIGHEST``); batches are accumulated in float64 on host, so the error does not grow with the number of
batches.
"""

from __future__ import annotations

import functools
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np

from m2d_jax.calibration.sampling import gram_positions, gram_slots
from m2d_jax.calibration.types import StatSums
from m2d_jax.distributed import device_rows, to_host, traced_on
from m2d_jax.models import all_expert_outputs
from m2d_jax.models.layers import constrain


def _layer_sums(view, valid, gram_index, gram_valid, chunk: int):
    """Per-layer sums from one MoE layer's ``MoEView``. valid [T] float32; gram_index/gram_valid [S]."""
    routing = view.routing
    e = routing.probs.shape[-1]
    hi = jax.lax.Precision.HIGHEST
    keep = valid[:, None] > 0  # [T, 1]; jnp.where, not a product, so nothing computed on padding can leak (NaN)
    probs = jnp.where(keep, routing.probs.astype(jnp.float32), 0.0)  # [T, E]
    onehot = jax.nn.one_hot(routing.top_idx, e, dtype=jnp.float32)  # [T, k, E]
    selected = jnp.where(keep, jnp.sum(onehot, axis=1), 0.0)  # [T, E]
    weight = jnp.where(keep, jnp.einsum("tk,tke->te", routing.top_weight.astype(jnp.float32), onehot), 0.0)
    routed_norm = jnp.linalg.norm(view.expert_out.astype(jnp.float32), axis=-1)  # [T, k]
    norm = jnp.where(keep, jnp.einsum("tk,tke->te", routed_norm, onehot), 0.0)  # [T, E], 0 where not selected
    logits = jnp.where(keep, routing.logits.astype(jnp.float32), 0.0)  # [T, E]

    # the expert weights gathered once per layer (whole but for the expert axis), not once per Gram chunk
    experts = jax.tree.map(lambda w: constrain(w, ("exp",) + (None,) * (w.ndim - 1)), view.experts)
    act = view.act
    x_sub = view.x[gram_index].reshape(-1, chunk, view.x.shape[-1])  # [S/chunk, chunk, d]
    mask_sub = gram_valid.astype(jnp.float32).reshape(-1, chunk)  # [S/chunk, chunk]
    real = jnp.ones((e,), bool) if view.real_experts is None else view.real_experts  # [E]: padded experts give 0

    def gram_chunk(carry, xs):
        gram, out_sum, out_norm = carry
        xc, mc = xs  # [chunk, d], [chunk]
        # the chunk's tokens split like a batch (under a sharded step): every device runs the experts on its tokens
        # with the weights gathered, instead of all-reducing partial [E, chunk, d] outputs over the sharded d
        xc, mc = constrain(xc, ("batch", "embed")), constrain(mc, ("batch",))
        f = jnp.where(real[:, None, None] & (mc[None, :, None] > 0),
                      all_expert_outputs(experts, act, xc).astype(jnp.float32), 0.0)  # [E, chunk, d]
        f = constrain(f, ("exp", "batch", "embed"))
        flat = f.reshape(f.shape[0], -1)  # [E, chunk * d]: one plain GEMM (a 3-D contraction is transposed first)
        gram = gram + jnp.matmul(flat, flat.T, precision=hi)
        return (gram, out_sum + f.sum(1), out_norm + jnp.linalg.norm(f, axis=-1).sum(1)), None

    d = view.x.shape[-1]
    init = (jnp.zeros((e, e), jnp.float32), jnp.zeros((e, d), jnp.float32), jnp.zeros((e,), jnp.float32))
    (gram, out_sum, out_norm), _ = jax.lax.scan(gram_chunk, init, (x_sub, mask_sub))
    return StatSums(
        tokens=valid.sum(),
        selected_count=selected.sum(0),
        sum_preselect_prob=probs.sum(0),
        sum_applied_weight=weight.sum(0),
        sum_selected_prob=(selected * probs).sum(0),
        sum_selected_prob_norm=(probs * norm).sum(0),
        sum_selected_weight_norm=(weight * norm).sum(0),
        sum_selected_norm=norm.sum(0),
        router_logit_moment=jnp.einsum("te,tf->ef", logits, logits, precision=hi),
        gram=gram,
        sum_output=out_sum,
        sum_output_norm=out_norm,
        gram_tokens=mask_sub.sum(),
    )


@functools.lru_cache(maxsize=8)
def observed_forward(graphdef, chunk: int, mesh=None):
    """The jitted calibration step of a model structure: ``run(state, input_ids, attention_mask, gram_index,
    gram_valid) -> StatSums`` [num_moe_layers, ...] (``batch_sums`` runs it; ``m2d plan`` compiles it abstractly).
    With a ``mesh`` it is traced under ``distributed.traced_on(mesh)``: every activation keeps the batch sharded."""
    from flax import nnx

    @jax.jit
    def run(state, input_ids, attention_mask, gram_index, gram_valid):
        with traced_on(mesh):
            model = nnx.merge(graphdef, state)
            valid = attention_mask.reshape(-1).astype(jnp.float32)  # [B*T]
            observe = functools.partial(_layer_sums, valid=valid, gram_index=gram_index, gram_valid=gram_valid,
                                        chunk=chunk)
            _, observations = model.hidden_states(input_ids, attention_mask, observe=observe)
            per_stack = [o for o in observations if o is not None]
            return jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0), *per_stack)

    return run


def batch_sums(model, input_ids, attention_mask, gram_index, gram_valid, chunk: int = 256, mesh=None):
    """One jitted observed forward -> StatSums of float32 device arrays [num_moe_layers, ...].

    input_ids/attention_mask [B, T] (host rows, or arrays already placed); gram_index [S] int (flattened b*T + t
    positions of the Gram subsample) and gram_valid [S] (0 for unused slots); S must be a multiple of
    ``min(chunk, S)``. With a ``mesh`` (the model's parameters placed on it) host rows are split over its batch axes
    (``distributed.global_batch``) and the forward keeps every activation's batch sharded.
    """
    from flax import nnx

    if not model.config.is_moe:
        raise ValueError(f"{model.config.family} model has no MoE layers to calibrate")
    gram_index = np.asarray(gram_index, np.int32)
    chunk = max(1, min(chunk, len(gram_index)))
    if len(gram_index) % chunk:
        raise ValueError(f"{len(gram_index)} Gram slots is not a multiple of the chunk {chunk}")
    graphdef, state = nnx.split(model)
    ids, mask = (device_rows(x, mesh, np.int32) for x in (input_ids, attention_mask))
    return observed_forward(graphdef, chunk, mesh)(state, ids, mask, jnp.asarray(gram_index),
                                                   jnp.asarray(gram_valid, jnp.int32))


def accumulate(model, batches: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]], num_seqs: int,
               gram_tokens: int, seed: int = 0, chunk: int = 256, progress=None, mesh=None) -> StatSums:
    """Float64 host sums over ``batches`` of (input_ids [B, T], attention_mask [B, T], seq_ids [B]).

    ``num_seqs`` is the size of the whole calibration set (all shards), which fixes each sequence's Gram quota.
    ``progress`` (a tqdm bar or None) is advanced by the valid tokens of each batch. ``mesh``: the teacher's mesh
    (see ``batch_sums``; every process places its own rows of each batch).
    """
    c = model.config
    total = StatSums.zeros(len(c.moe_layers), c.moe.experts.num_experts, c.hidden_size)
    pending = None  # the previous batch's device result: fetched after the next batch is dispatched

    def fetch(result, tokens):
        nonlocal total
        total = total + StatSums(*(to_host(x).astype(np.float64) for x in result))
        if progress is not None:
            progress.update(tokens)

    for ids, mask, seq_ids in batches:
        slots = gram_slots(ids.shape[0], num_seqs, gram_tokens, ids.shape[1], chunk)
        index, valid = gram_positions(mask, seq_ids, num_seqs, gram_tokens, seed, slots)
        result = batch_sums(model, ids, mask, index, valid, chunk, mesh), int(np.asarray(mask).sum())
        if pending is not None:
            fetch(*pending)
        pending = result
    if pending is not None:
        fetch(*pending)
    return total
