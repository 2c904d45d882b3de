"""Distillation and language-modelling losses, computed in sequence chunks.

Logits are never materialised for the whole batch: hidden states [B, S, d] are cut into chunks of ``chunk`` positions
and a ``lax.scan`` computes the LM heads and the loss per chunk under ``jax.checkpoint``, so the live logits are
O(B * chunk * V) in the forward and the backward pass (the chunk's logits are recomputed for its gradient). With
vocab 151,936 at seq 2048 the full float32 logits of teacher and student would be tens of GB.

Every loss returns (sum over valid tokens, number of valid tokens) so that micro-batches combine into the exact
token mean of the whole batch.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

Head = Callable[[jax.Array], jax.Array]  # hidden [..., d] -> logits [..., V]


def token_forward_kl(teacher_logits, student_logits, temperature: float = 1.0):
    """KL(p_T || p_S) per position, float32: sum_v p_T(v) (log p_T(v) - log p_S(v)), p = softmax(logits / T).

    teacher_logits, student_logits: [..., V] -> [...].
    """
    t_logp = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
    s_logp = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
    return jnp.sum(jnp.exp(t_logp) * (t_logp - s_logp), axis=-1)


def _chunked_sums(per_chunk: Callable, xs: tuple, mask, chunk: int):
    """Sum of ``per_chunk(*xs_chunk, mask_chunk) -> scalar`` over sequence chunks, and the valid-token count.

    xs: arrays [B, S, ...]; mask [B, S]. ``chunk`` <= 0 or >= S means one chunk (no scan). S is padded with masked
    positions to a multiple of ``chunk``.
    """
    mask = mask.astype(jnp.float32)
    count = jnp.sum(mask)
    s = mask.shape[1]
    if chunk <= 0 or chunk >= s:
        return per_chunk(*xs, mask), count
    pad = -s % chunk
    n = (s + pad) // chunk

    def split(x):  # [B, S, ...] -> [n, B, chunk, ...]
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return jnp.moveaxis(x.reshape((x.shape[0], n, chunk) + x.shape[2:]), 1, 0)

    @jax.checkpoint
    def body(total, chunk_xs):
        *x, m = chunk_xs
        return total + per_chunk(*x, m), None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), tuple(map(split, xs)) + (split(mask),))
    return total, count


def forward_kl_sums(student_hidden, teacher_hidden, mask, student_head: Head, teacher_head: Head,
                    temperature: float = 1.0, chunk: int = 0):
    """(sum of per-token KL(p_T || p_S) over valid positions, number of valid positions), both float32 scalars.

    student_hidden [B, S, d_S], teacher_hidden [B, S, d_T] (final-norm hidden states), mask [B, S] (1 = valid).
    The teacher's logits are under ``stop_gradient``. Loss = temperature**2 * sum / count (``kl_loss``).
    """

    def per_chunk(hs, ht, m):
        t_logits = jax.lax.stop_gradient(teacher_head(ht))  # [B, c, V]
        return jnp.sum(token_forward_kl(t_logits, student_head(hs), temperature) * m)

    return _chunked_sums(per_chunk, (student_hidden, teacher_hidden), mask, chunk)


def next_token_ce_sums(hidden, input_ids, mask, head: Head, chunk: int = 0):
    """(sum of next-token cross-entropy over valid (position, next position) pairs, their number).

    hidden [B, S, d], input_ids [B, S], mask [B, S]. Position i predicts token i+1; the pair is valid when both are
    real tokens. The last position has no label.
    """
    labels = jnp.pad(input_ids[:, 1:], [(0, 0), (0, 1)])  # [B, S]
    pair_mask = next_token_pairs(mask)

    def per_chunk(h, y, m):
        logp = jax.nn.log_softmax(head(h).astype(jnp.float32), axis=-1)  # [B, c, V]
        return -jnp.sum(jnp.take_along_axis(logp, y[..., None], axis=-1)[..., 0] * m)

    return _chunked_sums(per_chunk, (hidden, labels), pair_mask, chunk)


def next_token_pairs(mask):
    """[B, S] 1 where position i and its label position i+1 are both real tokens (0 at the last position)."""
    return mask * jnp.pad(mask[:, 1:], [(0, 0), (0, 1)])


def router_load_observer(token_mask):
    """An ``observe`` hook for ``model.hidden_states`` giving each MoE layer's (dispatch fraction f [E], mean router
    probability P [E]) over the valid tokens. ``token_mask`` [B, S] (1 = valid), flattened like the hook's tokens."""
    flat_mask = token_mask.reshape(-1).astype(jnp.float32)  # [T]

    def observe(view):
        probs, top_idx = view.routing.probs, view.routing.top_idx  # [T, E] f32, [T, k]
        e, k = probs.shape[-1], top_idx.shape[-1]
        n = jnp.maximum(jnp.sum(flat_mask), 1.0)
        assigned = jnp.sum(jax.nn.one_hot(top_idx, e, dtype=jnp.float32), axis=1)  # [T, E] 0/1
        fraction = jnp.sum(assigned * flat_mask[:, None], axis=0) / (n * k)  # [E], sums to 1
        mean_prob = jnp.sum(probs * flat_mask[:, None], axis=0) / n  # [E], sums to 1
        return fraction, mean_prob

    return observe


def load_balance_loss(observations) -> jax.Array:
    """Switch-Transformer auxiliary loss E * sum_e f_e P_e, averaged over MoE layers (1.0 when perfectly balanced).

    ``observations``: the per-stack outputs of ``router_load_observer`` (None for dense stacks), each leaf with a
    leading layer axis. 0.0 for a model without MoE layers.
    """
    per_layer = [f.shape[-1] * jnp.sum(f * p, axis=-1) for obs in observations if obs is not None
                 for f, p in [obs]]  # each [layers_in_stack]
    if not per_layer:
        return jnp.zeros((), jnp.float32)
    return jnp.mean(jnp.concatenate(per_layer))
