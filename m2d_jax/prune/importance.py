"""Activation-based (Minitron-style) importance of a dense decoder's prunable units, in one calibration pass.

The pass is the teacher's own forward: each scanned layer runs its unchanged ``DecoderLayer.__call__`` with four of
its sub-modules wrapped by recorders (the two norms' outputs, the ``o_proj`` input, the ``down_proj`` input), and the
recorded activations are reduced to per-layer sums on device (float32, one batch), accumulated in float64 on host.
Every importance is a mean over the calibration tokens (padding excluded), docs/METHOD.md "Dense-to-dense pruning
baseline":

- FFN neuron i of layer l: ``mean_t |phi_i(t)|``, phi = act(gate) * up, the input of ``down_proj``;
- query head h of layer l: ``mean_t ||o_h(t)||_2``, o_h = the head's attention output (its slice of the ``o_proj``
  input, before the output projection);
- hidden channel j: ``mean_t |n_j(t)|`` of the layer's input norm and post-attention norm outputs (summed), per layer;
- block (layer) l: ``mean_t (1 - cos(x_in(t), x_out(t)))`` of the layer's residual stream input and output.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from m2d_jax.errors import PruneError
from m2d_jax.models import CausalLM

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Importance:
    """Per-layer importances of a dense model (means over ``tokens`` calibration tokens)."""
    ffn: np.ndarray  # [layers, intermediate] mean |phi|
    heads: np.ndarray  # [layers, heads] mean L2 norm of each query head's attention output
    hidden: np.ndarray  # [layers, hidden] mean |norm output|, input norm + post-attention norm
    block: np.ndarray  # [layers] mean cosine distance between the layer's input and output
    tokens: int


_SUM_FIELDS = ("ffn", "heads", "hidden", "block")


class _Recorder(nnx.Module):
    """Calls ``inner`` unchanged and records its input or output (an ``nnx.Module`` so it can sit in the tree)."""

    def __init__(self, inner, store: dict, name: str, what: str):
        self.inner, self.store, self.name, self.what = inner, store, name, what

    def __call__(self, x, *args):
        y = self.inner(x, *args)
        self.store.setdefault(self.name, []).append(x if self.what == "input" else y)
        return y


def _layer_sums(layer, h, cos, sin, mask, valid):
    """One layer's output and its importance sums. h [B, T, d]; valid [B, T] float32."""
    store: dict = {}
    layer.input_norm = _Recorder(layer.input_norm, store, "hidden", "output")
    layer.post_attn_norm = _Recorder(layer.post_attn_norm, store, "hidden", "output")
    layer.attn.o_proj = _Recorder(layer.attn.o_proj, store, "heads", "input")
    layer.mlp.down_proj = _Recorder(layer.mlp.down_proj, store, "ffn", "input")
    out, _ = layer(h, cos, sin, mask)
    keep = valid[..., None] > 0  # [B, T, 1]; where, not a product: nothing on padding leaks (NaN)

    def total(x):  # [B, T, n] -> [n], padding excluded
        return jnp.where(keep, x.astype(jnp.float32), 0.0).sum((0, 1))

    (phi,), (heads,) = store["ffn"], store["heads"]  # [B, T, m], [B, T, H, D]
    h32, out32 = h.astype(jnp.float32), out.astype(jnp.float32)
    cosine = jnp.sum(h32 * out32, -1) / jnp.maximum(jnp.linalg.norm(h32, axis=-1) * jnp.linalg.norm(out32, axis=-1),
                                                    1e-30)  # [B, T]
    sums = {"ffn": total(jnp.abs(phi)), "heads": total(jnp.linalg.norm(heads.astype(jnp.float32), axis=-1)),
            "hidden": sum(total(jnp.abs(n)) for n in store["hidden"]),
            "block": jnp.where(valid > 0, 1.0 - cosine, 0.0).sum()}
    return out, sums


@functools.lru_cache(maxsize=8)
def _batch_fn(graphdef):
    from m2d_jax.models.layers import make_attention_mask
    from m2d_jax.models.rope import rope_cos_sin

    @jax.jit
    def run(state, input_ids, attention_mask):
        model = nnx.merge(graphdef, state)
        c = model.config
        b, t = input_ids.shape
        x = jnp.take(model.embed[...], input_ids, axis=0).astype(model.runtime.compute_dtype)
        cos, sin = rope_cos_sin(c, jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)))
        windows = jnp.asarray([c.attention.sliding_window if lt == "sliding_attention" else 0
                               for lt in c.attention.layer_types], jnp.int32)  # [L]
        layers_def, layers_state = nnx.split(model.stacks[0])
        valid = attention_mask.astype(jnp.float32)

        def body(h, xs):
            layer_state, window = xs
            layer = nnx.merge(layers_def, layer_state)
            return _layer_sums(layer, h, cos, sin, make_attention_mask(attention_mask, t, window), valid)

        _, sums = jax.lax.scan(body, x, (layers_state, windows))
        return sums

    return run


def compute_importance(model: CausalLM, windows: np.ndarray, batch_size: int = 8,
                       show_progress: bool = False) -> Importance:
    """Importance of every FFN neuron, query head, hidden channel and layer of the dense ``model`` on the
    calibration windows [N, T] (token ids, every position valid)."""
    from tqdm.auto import tqdm

    from m2d_jax.calibration.sampling import calibration_batches

    config = model.config
    if config.is_moe or len(config.stacks) != 1:
        raise PruneError(f"the {config.family} model has MoE layers: pruning importance needs a dense model")
    windows = np.asarray(windows)
    if windows.ndim != 2 or windows.size == 0:
        raise PruneError(f"calibration windows must be a non-empty [sequences, seq_len] array, got {windows.shape}")
    if windows.min() < 0 or windows.max() >= config.vocab_size:
        raise PruneError(f"calibration windows hold token ids outside [0, {config.vocab_size}) of the model's vocab")
    if batch_size <= 0:
        raise PruneError(f"batch_size must be > 0, got {batch_size}")
    graphdef, state = nnx.split(model)
    run = _batch_fn(graphdef)
    totals = {name: 0.0 for name in _SUM_FIELDS}
    tokens = 0
    started = time.perf_counter()
    with tqdm(total=windows.size, unit="tok", unit_scale=True, desc="prune importance",
              disable=not show_progress) as bar:
        for ids, mask, _ in calibration_batches(windows, batch_size):
            sums = jax.device_get(run(state, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32)))
            totals = {name: totals[name] + np.asarray(sums[name], np.float64) for name in _SUM_FIELDS}
            tokens += int(np.asarray(mask).sum())
            bar.update(int(np.asarray(mask).sum()))
    seconds = time.perf_counter() - started
    log.info("pruning importance: %d tokens in %.1f s (%.0f tokens/s, incl. compile)", tokens, seconds,
             tokens / max(seconds, 1e-9))
    return Importance(**{name: totals[name] / tokens for name in _SUM_FIELDS}, tokens=tokens)
