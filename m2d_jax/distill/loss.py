"""Distillation and language-modelling losses, computed in sequence chunks.

Logits are never materialised for the whole batch: hidden states [B, S, d] are cut into chunks of ``chunk`` positions
and a ``lax.scan`` computes the LM heads and the loss per chunk under ``jax.checkpoint``, so the live logits are
O(B * chunk * V) in the forward and the backward pass (the chunk's logits are recomputed for its gradient). With
vocab 151,936 at seq 2048 the full float32 logits of teacher and student would be tens of GB.

``fused_forward_kl_sums`` is the forward KL with the LM heads inside and its own gradient: each chunk's logits are
computed once, in the forward pass, together with the gradient with respect to the student's hidden states and head
kernel, so the backward pass only scales those by the incoming cotangent (no logits recomputed).

Every loss returns (sum over valid tokens, number of valid tokens) so that micro-batches combine into the exact
token mean of the whole batch. Under a sharded step (``distill.sharding.activation_sharding``) every chunk and its
logits keep the batch sharded over (data, fsdp) and the vocabulary over the tensor axis.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp

from m2d_jax.models.layers import constrain

Head = Callable[[jax.Array], jax.Array]  # hidden [..., d] -> logits [..., V]


def token_forward_kl(teacher_logits, student_logits, temperature: float = 1.0):
    """KL(p_T || p_S) per position, float32: sum_v p_T(v) (log p_T(v) - log p_S(v)), p = softmax(logits / T).

    teacher_logits, student_logits: [..., V] -> [...].
    """
    t_logp = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
    s_logp = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
    return jnp.sum(jnp.exp(t_logp) * (t_logp - s_logp), axis=-1)


def split_position_chunks(x, chunk: int):
    """[B, S, ...] -> [n, B, chunk, ...], S padded with zeros to n * chunk."""
    pad = -x.shape[1] % chunk
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    chunks = jnp.moveaxis(x.reshape((x.shape[0], -1, chunk) + x.shape[2:]), 1, 0)
    return constrain(chunks, (None, "batch", "seq") + (None,) * (x.ndim - 2))


def logits_layout(logits):
    """[B, c, V] logits of one chunk: batch over (data, fsdp), vocabulary over tensor."""
    return constrain(logits, ("batch", "seq", "vocab"))


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
    split = functools.partial(split_position_chunks, chunk=chunk)

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
        t_logits = logits_layout(jax.lax.stop_gradient(teacher_head(ht)))  # [B, c, V]
        return jnp.sum(token_forward_kl(t_logits, logits_layout(student_head(hs)), temperature) * m)

    return _chunked_sums(per_chunk, (student_hidden, teacher_hidden), mask, chunk)


def fused_forward_kl_sums(student_hidden, student_kernel, teacher_hidden, teacher_kernel, mask,
                          temperature: float = 1.0, chunk: int = 0):
    """``forward_kl_sums`` with the LM heads ``hidden @ kernel`` fused in and its own gradient (``jax.custom_vjp``).

    student_hidden [B, S, d_S], student_kernel [d_S, V] (a tied head passes ``embed.T``), teacher_hidden [B, S, d_T],
    teacher_kernel [d_T, V], mask [B, S] (1 = valid). The matmuls run in each model's hidden-state dtype (the
    kernel is cast to it, as ``CausalLM.logits`` does) with float32 results; softmax, KL and the gradient sums are
    float32. Under differentiation each chunk's logits are computed once: the forward pass also gives the gradient
    of the KL sum with respect to student_hidden and student_kernel, d/dz_S = (p_S - p_T) / T per valid position,
    and the backward pass scales it by the cotangent. Nothing flows to the teacher or the mask (zero cotangents).
    Live logits are O(B * chunk * V); the residuals are the gradients [B, S, d_S] and [d_S, V].
    """
    mask = mask.astype(jnp.float32)
    kl_sum = _fused_kl_sum(student_hidden, student_kernel, teacher_hidden, teacher_kernel, mask, temperature, chunk)
    return kl_sum, jnp.sum(mask)


def _kl_chunk(hs, ws, ht, wt, m, temperature: float, with_grads: bool):
    """One chunk: KL sum over its valid positions, and with ``with_grads`` its gradients (d hs [B, c, d_S] in hs's
    dtype, d ws [d_S, V] float32). hs [B, c, d_S], ht [B, c, d_T], m [B, c].

    One exponential per logit and model: with z = logits / T - max, e = exp(z) and Z = sum e, a position's
    KL = sum_v e_T (z_T - z_S) / Z_T - log Z_T + log Z_S (as sum_v p_T = 1) and d/dz_S = (e_S / Z_S - e_T / Z_T) / T.
    """
    ws = ws.astype(hs.dtype)
    t_logits = logits_layout(jnp.matmul(ht, wt.astype(ht.dtype), preferred_element_type=jnp.float32))  # [B, c, V]
    s_logits = logits_layout(jnp.matmul(hs, ws, preferred_element_type=jnp.float32))  # [B, c, V]
    z_t, z_s = (x / temperature - jnp.max(x / temperature, axis=-1, keepdims=True) for x in (t_logits, s_logits))
    e_t, e_s = jnp.exp(z_t), jnp.exp(z_s)  # [B, c, V]
    sum_t, sum_s = jnp.sum(e_t, axis=-1), jnp.sum(e_s, axis=-1)  # [B, c]
    per_position = jnp.sum(e_t * (z_t - z_s), axis=-1) / sum_t - jnp.log(sum_t) + jnp.log(sum_s)  # [B, c]
    valid = m > 0  # [B, c]
    kl = jnp.sum(jnp.where(valid, per_position, 0.0))
    if not with_grads:
        return kl
    scale_t, scale_s = (jnp.where(valid, 1.0 / (x * temperature), 0.0)[..., None] for x in (sum_t, sum_s))
    d_logits = logits_layout((e_s * scale_s - e_t * scale_t).astype(hs.dtype))  # [B, c, V], 0 at masked positions
    d_hidden = constrain(jnp.einsum("bcv,dv->bcd", d_logits, ws, preferred_element_type=jnp.float32).astype(hs.dtype),
                         ("batch", "seq", "embed"))
    d_kernel = jnp.einsum("bcd,bcv->dv", hs, d_logits, preferred_element_type=jnp.float32)  # [d_S, V]
    return kl, d_hidden, d_kernel


def _fused_kl_pass(hs, ws, ht, wt, mask, temperature: float, chunk: int, with_grads: bool):
    """KL sum over all chunks (a ``lax.scan`` when ``chunk`` splits S), and with ``with_grads`` its gradients."""
    s = mask.shape[1]
    # the LM-head kernels in the compute dtype, laid out (gathered, under a sharded step) once for all chunks
    ws, wt = (constrain(w.astype(h.dtype), ("embed", "vocab")) for w, h in ((ws, hs), (wt, ht)))
    if chunk <= 0 or chunk >= s:
        return _kl_chunk(hs, ws, ht, wt, mask, temperature, with_grads)

    def body(carry, xs):
        out = _kl_chunk(xs[0], ws, xs[1], wt, xs[2], temperature, with_grads)
        if not with_grads:
            return carry + out, None
        total, d_kernel = carry
        kl, d_hidden, d_kernel_chunk = out
        return (total + kl, d_kernel + d_kernel_chunk), d_hidden

    xs = tuple(split_position_chunks(x, chunk) for x in (hs, ht, mask))  # [n, B, chunk, ...]
    total = jnp.zeros((), jnp.float32)
    if not with_grads:
        return jax.lax.scan(body, total, xs)[0]
    (total, d_kernel), d_hidden = jax.lax.scan(body, (total, jnp.zeros(ws.shape, jnp.float32)), xs)
    d_hidden = constrain(jnp.moveaxis(d_hidden, 0, 1).reshape((hs.shape[0], -1, hs.shape[2]))[:, :s],
                         ("batch", "seq", "embed"))  # [B, S, d_S]
    return total, d_hidden, d_kernel


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _fused_kl_sum(hs, ws, ht, wt, mask, temperature, chunk):
    return _fused_kl_pass(hs, ws, ht, wt, mask, temperature, chunk, with_grads=False)


def _fused_kl_sum_fwd(hs, ws, ht, wt, mask, temperature, chunk):
    total, d_hidden, d_kernel = _fused_kl_pass(hs, ws, ht, wt, mask, temperature, chunk, with_grads=True)
    return total, (d_hidden, d_kernel.astype(ws.dtype))


def _fused_kl_sum_bwd(temperature, chunk, residuals, g):
    d_hidden, d_kernel = residuals
    return (g * d_hidden).astype(d_hidden.dtype), (g * d_kernel).astype(d_kernel.dtype), None, None, None


_fused_kl_sum.defvjp(_fused_kl_sum_fwd, _fused_kl_sum_bwd)


def next_token_ce_sums(hidden, input_ids, mask, head: Head, chunk: int = 0):
    """(sum of next-token cross-entropy over valid (position, next position) pairs, their number).

    hidden [B, S, d], input_ids [B, S], mask [B, S]. Position i predicts token i+1; the pair is valid when both are
    real tokens. The last position has no label.
    """
    labels = jnp.pad(input_ids[:, 1:], [(0, 0), (0, 1)])  # [B, S]
    pair_mask = next_token_pairs(mask)

    def per_chunk(h, y, m):
        logp = jax.nn.log_softmax(logits_layout(head(h)).astype(jnp.float32), axis=-1)  # [B, c, V]
        return -jnp.sum(jnp.take_along_axis(logp, y[..., None], axis=-1)[..., 0] * m)

    return _chunked_sums(per_chunk, (hidden, labels), pair_mask, chunk)


def next_token_pairs(mask):
    """[B, S] 1 where position i and its label position i+1 are both real tokens (0 at the last position)."""
    return mask * jnp.pad(mask[:, 1:], [(0, 0), (0, 1)])


def router_load_observer(token_mask):
    """An ``observe`` hook for ``model.hidden_states`` giving each MoE layer's (dispatch fraction f [E], mean router
    probability P [E], its real experts E_l []) over the valid tokens (E_l < E only for padded per-layer expert
    counts, whose padding has f = P = 0). ``token_mask`` [B, S] (1 = valid), flattened like the hook's tokens."""
    flat_mask = token_mask.reshape(-1).astype(jnp.float32)  # [T]

    def observe(view):
        probs, top_idx = view.routing.probs, view.routing.top_idx  # [T, E] f32, [T, k]
        e, k = probs.shape[-1], top_idx.shape[-1]
        n = jnp.maximum(jnp.sum(flat_mask), 1.0)
        assigned = jnp.sum(jax.nn.one_hot(top_idx, e, dtype=jnp.float32), axis=1)  # [T, E] 0/1
        fraction = jnp.sum(assigned * flat_mask[:, None], axis=0) / (n * k)  # [E], sums to 1
        mean_prob = jnp.sum(probs * flat_mask[:, None], axis=0) / n  # [E], sums to 1
        real = jnp.float32(e) if view.real_experts is None else jnp.sum(view.real_experts, dtype=jnp.float32)
        return fraction, mean_prob, real

    return observe


def load_balance_loss(observations) -> jax.Array:
    """Switch-Transformer auxiliary loss E_l * sum_e f_e P_e, averaged over MoE layers (1.0 when perfectly balanced;
    E_l the layer's real experts).

    ``observations``: the per-stack outputs of ``router_load_observer`` (None for dense stacks), each leaf with a
    leading layer axis. 0.0 for a model without MoE layers.
    """
    per_layer = [real * jnp.sum(f * p, axis=-1) for obs in observations if obs is not None
                 for f, p, real in [obs]]  # each [layers_in_stack]
    if not per_layer:
        return jnp.zeros((), jnp.float32)
    return jnp.mean(jnp.concatenate(per_layer))
