"""Fused attention on TPU: jax's Pallas splash-attention kernels behind the contract of
``layers.dot_product_attention`` (q [B, T, H, D], k / v [B, S, KV, D] -> [B, T, H, D]), so the [T, S] attention
scores are never written to HBM.

Chosen by ``RuntimeConfig.attention`` (``attention_kernel``): "splash" for grouped-query attention without learned
sinks over a sequence the kernel tiles (a multiple of ``SEQ_TILE``); "auto" picks it on TPU when supported. MLA
(DeepSeek: its own module, ``models.mla.MLAttention``, not routed here) and learned sinks (GPT-OSS: the kernel's own
``sinks`` input is not wired or tested here) stay on the XLA path. Causal, key padding (as segment ids) and sliding
windows: the window is a traced per-layer int inside the layer scan, so one kernel is built per distinct static
window of the stack and ``lax.switch`` picks the layer's. Only the prefill / training shape is fused (queries =
keys); decoding with a KV cache stays on the XLA path.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from m2d_jax.models.config import ModelConfig, RuntimeConfig

SEQ_TILE = 128  # the kernel's smallest sequence block (one TPU lane row); sequences must be a multiple of it
BLOCKS = (512, 256, 128)  # q / kv block sizes tried, largest first (512: MaxText's default for splash attention)


class SplashMask(NamedTuple):
    """What the splash path masks with, instead of the dense [B, 1, 1, T, S] mask: key padding [B, S] (1 = real
    token), the layer's sliding window (traced int, 0 = full causal) and the model's distinct static windows."""
    key_mask: jax.Array
    window: jax.Array
    windows: tuple[int, ...]


def unsupported_reason(config: ModelConfig, seq_len: int | None = None) -> str | None:
    """Why the splash kernel cannot run ``config``'s attention (over ``seq_len`` tokens), or None if it can."""
    a = config.attention
    if a.kind == "mla":
        return "MLA attention (DeepSeek) is not routed to the splash kernel"
    if a.sinks:
        return "learned attention sinks (GPT-OSS) are not routed to the splash kernel"
    if seq_len is not None and seq_len % SEQ_TILE:
        return f"sequence length {seq_len} is not a multiple of the kernel's {SEQ_TILE}-token block"
    return None


def attention_kernel(config: ModelConfig, runtime: RuntimeConfig, seq_len: int | None = None,
                     platform: str | None = None) -> str:
    """"splash" or "xla": what ``runtime.attention`` means for ``config`` on ``platform`` (default: jax's default
    backend; the planner passes its target's). "auto" = splash on TPU when supported and placeable (one device, or a
    step traced under an activation layout, e.g. distillation); an explicit "splash" that is not supported is a
    ``ValueError`` naming the field and why."""
    reason = unsupported_reason(config, seq_len)
    if runtime.attention == "auto":  # a multi-device step needs a layout to place the kernel's shards
        placed = platform is not None or _layout() is not None or jax.device_count() == 1
        return "splash" if (platform or jax.default_backend()) == "tpu" and reason is None and placed else "xla"
    if runtime.attention == "splash" and reason is not None:
        raise ValueError(f"RuntimeConfig.attention='splash' for the {config.family} model: {reason}")
    return runtime.attention


def _block(n: int) -> int:
    return next(b for b in BLOCKS if n % b == 0)


@functools.lru_cache(maxsize=32)
def _kernel(heads: int, q_len: int, kv_len: int, window: int, interpret: bool):
    """The splash-attention kernel of one causal (``window`` = 0) or sliding-window mask, per example
    (q [H, T, D], k / v [KV, S, D], segment ids [T] / [S])."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    shape = (q_len, kv_len)
    # xla path: key j is visible to query i when j <= i and i - j < window, i.e. i - (window - 1) <= j <= i
    mask = sa.LocalMask(shape, window_size=(window - 1, 0), offset=0) if window > 0 else sa.CausalMask(shape)
    bq, bkv = _block(q_len), _block(kv_len)
    sizes = sa.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq, block_kv_dkv=bkv,
                          block_kv_dkv_compute=bkv, block_q_dq=bq, block_kv_dq=bkv)
    with jax.ensure_compile_time_eval():  # its mask tables are constants, never tracers of the caller's trace
        return sa.make_splash_mha(sa.MultiHeadMask([mask] * heads), block_sizes=sizes, head_shards=1,
                                  q_seq_shards=1, interpret=interpret)


def _attend(q, k, v, key_mask, window, windows: tuple[int, ...], interpret: bool):
    """One batch shard: q [b, T, H, D], k / v [b, S, KV, D], key_mask [b, S] -> [b, T, H, Dv]."""
    from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds

    b, t, h, _ = q.shape
    s = k.shape[1]
    qh, kh, vh = (x.transpose(0, 2, 1, 3) for x in (q, k, v))  # [b, H, T, D], [b, KV, S, D]
    # key padding as segment ids: a real query (id 1) sees the real keys only; a padded one (id 0) sees the padded
    # keys, so no row is empty (its own slot) and its (unused) output stays finite
    ids = key_mask.astype(jnp.int32)  # [b, S]

    def run(w):
        kernel = _kernel(h, t, s, w, interpret)
        return jax.vmap(lambda qi, ki, vi, si: kernel(qi, ki, vi, SegmentIds(q=si, kv=si)))(qh, kh, vh, ids)

    if len(windows) == 1:
        out = run(windows[0])
    else:
        index = sum(i * (window == w) for i, w in enumerate(windows)).astype(jnp.int32)
        out = jax.lax.switch(index, [functools.partial(run, w) for w in windows])
    return out.transpose(0, 2, 1, 3)  # [b, T, H, Dv]


def _layout():
    """The activation layout the step is traced under (``layers.activation_layout``), or None."""
    from m2d_jax.models.layers import _ACTIVATION_LAYOUT

    return _ACTIVATION_LAYOUT.get()


def _per_shard(attend, q, k, v, key_mask, window):
    """``attend`` on each device's shard: a Mosaic kernel is never partitioned automatically, so under an activation
    layout it runs in a ``shard_map`` manual over every mesh axis — the batch split as the layout splits it, the
    heads over the tensor axis when query and KV heads split alike (else whole)."""
    layout = _layout()
    if layout is None:
        return attend(q, k, v, key_mask, window)
    from jax.sharding import PartitionSpec as P

    from m2d_jax.distill.sharding import logical_to_spec

    q_spec = logical_to_spec(("batch", "seq", "heads", "head_dim"), q.shape, layout.mesh, layout.rules)
    kv_spec = logical_to_spec(("batch", "seq", "kv_heads", "head_dim"), k.shape, layout.mesh, layout.rules)
    if q_spec[2] != kv_spec[2]:
        q_spec, kv_spec = P(q_spec[0], None, None, None), P(q_spec[0], None, None, None)
    return jax.shard_map(attend, mesh=layout.mesh, in_specs=(q_spec, kv_spec, kv_spec, P(q_spec[0], None), P()),
                         out_specs=q_spec, check_vma=False)(q, k, v, key_mask, window)


def splash_attention(q, k, v, key_mask, window, scale: float, windows: tuple[int, ...] = (0,),
                     interpret: bool = False):
    """Causal grouped-query attention of ``layers.dot_product_attention`` with its mask built from
    ``make_attention_mask(key_mask, T, window)``, fused: q [B, T, H, D]; k, v [B, T, KV, D]; key_mask [B, T] (1 =
    real token); ``window`` a traced int in ``windows`` (0 = full attention) -> [B, T, H, D].

    Rows of padded queries differ from the XLA path (which averages every value there); both are masked out of
    every loss and no real query attends to a padded key. ``interpret=True`` runs the kernel's Pallas interpreter
    (any backend: the CPU tests). Under an activation layout each device runs the kernel on its own shard."""
    if q.shape[1] != k.shape[1]:
        raise ValueError(f"splash attention needs as many queries as keys (got {q.shape[1]} and {k.shape[1]})")
    q = q * jnp.asarray(scale, q.dtype)
    attend = functools.partial(_attend, windows=tuple(windows), interpret=interpret)
    return _per_shard(attend, q, k, v, key_mask, window)
