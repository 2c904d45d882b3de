"""Calibration statistics of an MoE teacher in one streaming, jitted forward pass (SPEC §2).

Every statistic is a **sum** over valid (non-padding) tokens, so batches, shards and hosts combine by addition
(``StatSums.__add__`` / ``combine_stats``). All fields carry a leading ``[num_moe_layers]`` axis; row ``i`` is global
decoder layer ``metadata["moe_layers"][i]``. With ``p`` the full softmax over all E router logits (incl. any router
bias), ``A(t)`` the experts actually selected for token ``t``, ``w`` the routing weights actually applied (0 when not
selected; ``rho * p`` for un-normalised routers, renormalised for ``norm_topk_prob``) and ``f_e`` expert ``e``'s
unweighted output:

=========================  ==========  ==============================================================  ===========
field                      shape       sum over valid tokens t of                                      SPEC §2
=========================  ==========  ==============================================================  ===========
tokens                     [L]         1                                                               T
selected_count             [L, E]      1[e in A(t)]                                                    n_e
sum_preselect_prob         [L, E]      p_e(t)                                                          P_e
sum_applied_weight         [L, E]      w_e(t)                                                          W_e
sum_selected_prob          [L, E]      1[e in A(t)] p_e(t)                                             Q_e
sum_selected_prob_norm     [L, E]      1[e in A(t)] p_e(t) |f_e(x_t)|                                  R_e
sum_selected_weight_norm   [L, E]      1[e in A(t)] w_e(t) |f_e(x_t)|                                  (ACP form b)
sum_selected_norm          [L, E]      1[e in A(t)] |f_e(x_t)|                                         N_e^rt
router_logit_moment        [L, E, E]   z(t) z(t)^T                                                     Z
gram                       [L, E, E]   <f_i(x_t), f_j(x_t)>          (Gram subsample U only)           G
mean_output                [L, E, d]   f_e(x_t)                      (U only; a sum: divide by n_G)    mu
sum_output_norm            [L, E]      |f_e(x_t)|                    (U only)                          N_e^all
gram_tokens                [L]         1                             (U only)                          n_G
=========================  ==========  ==============================================================  ===========

``StatSums.sum_selected_weight_total`` (SPEC's Σw̄ = Σ_t Σ_{e in A(t)} p_e(t)) is ``sum_selected_prob.sum(-1)``.

Everything is derived from what the MoE layer exposes to its observer (``MoEView``): ``routing.probs`` (full
softmax), ``routing.top_idx`` / ``routing.top_weight`` (the family's own routing rule, never re-implemented here),
``expert_out`` (routed outputs: norms for free) and ``experts`` + ``act`` (all E experts evaluated on the Gram
subsample with ``expert_ffn``, one [E, chunk, d] block at a time).

The Gram subsample is a function of the data only: sequence ``i`` (its index in the calibration set) contributes
``floor((i+1) G/N) - floor(i G/N)`` valid positions drawn with ``default_rng([seed, i])``, so the subsample does not
depend on batching or sharding.

Precision: each batch's sums are float32 reductions on device over at most ``batch * seq`` tokens (relative error
bounded by ~``n * 2^-24`` of the sum of magnitudes in the worst case, ~``sqrt(n) * 2^-24`` typically; the Gram uses
``Precision.HIGHEST``); batches are accumulated in float64 on host, so the error does not grow with the number of
batches.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Iterable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from m2d_jax.errors import StatsError
from m2d_jax.models import all_expert_outputs

logger = logging.getLogger(__name__)

FORMAT = "m2d_jax.calibration/1"


class StatSums(NamedTuple):
    """Additive calibration sums; every field has a leading [num_moe_layers] axis (see the module docstring)."""
    tokens: np.ndarray  # [L]
    selected_count: np.ndarray  # [L, E]
    sum_preselect_prob: np.ndarray  # [L, E]
    sum_applied_weight: np.ndarray  # [L, E]
    sum_selected_prob: np.ndarray  # [L, E]
    sum_selected_prob_norm: np.ndarray  # [L, E]
    sum_selected_weight_norm: np.ndarray  # [L, E]
    sum_selected_norm: np.ndarray  # [L, E]
    router_logit_moment: np.ndarray  # [L, E, E]
    gram: np.ndarray  # [L, E, E]
    mean_output: np.ndarray  # [L, E, d] (a sum; divide by gram_tokens)
    sum_output_norm: np.ndarray  # [L, E]
    gram_tokens: np.ndarray  # [L]

    @property
    def sum_selected_weight_total(self):  # [L] SPEC's Σw̄
        return self.sum_selected_prob.sum(-1)

    def __add__(self, other: "StatSums") -> "StatSums":
        return StatSums(*(a + b for a, b in zip(self, other)))

    @classmethod
    def zeros(cls, num_layers: int, num_experts: int, hidden_size: int) -> "StatSums":
        shapes = expected_shapes(num_layers, num_experts, hidden_size)
        return cls(**{name: np.zeros(shape, np.float64) for name, shape in shapes.items()})


def expected_shapes(num_layers: int, num_experts: int, hidden_size: int) -> dict[str, tuple[int, ...]]:
    l, e, d = num_layers, num_experts, hidden_size
    shapes = {name: (l, e) for name in StatSums._fields}
    shapes.update(tokens=(l,), gram_tokens=(l,), router_logit_moment=(l, e, e), gram=(l, e, e), mean_output=(l, e, d))
    return shapes


@dataclasses.dataclass(frozen=True)
class CalibrationStats:
    sums: StatSums  # float64 NumPy arrays
    metadata: dict  # model_path, config_hash, family, num_experts, top_k, moe_layers, seq_len, seed, ...

    @property
    def num_experts(self) -> int:
        return int(self.metadata["num_experts"])

    @property
    def top_k(self) -> int:
        return int(self.metadata["top_k"])

    @property
    def moe_layers(self) -> list[int]:
        return list(self.metadata["moe_layers"])

    def check_model(self, config) -> None:
        """Raise ``StatsError`` unless these statistics were collected on a model with ``config``'s structure."""
        want = config_hash(config)
        if self.metadata.get("config_hash") != want:
            raise StatsError(f"statistics from a different model: config hash {self.metadata.get('config_hash')!r} "
                             f"(collected on {self.metadata.get('model_path')!r}) != {want!r} of the given model")


def config_hash(config) -> str:
    """The model structure's fingerprint that statistics record (``ModelConfig.structure_hash``)."""
    return config.structure_hash()


# ---- the observed forward ------------------------------------------------------------------------------------
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

    experts, act = view.experts, view.act
    x_sub = view.x[gram_index].reshape(-1, chunk, view.x.shape[-1])  # [S/chunk, chunk, d]
    mask_sub = gram_valid.astype(jnp.float32).reshape(-1, chunk)  # [S/chunk, chunk]

    def gram_chunk(carry, xs):
        gram, out_sum, out_norm = carry
        xc, mc = xs  # [chunk, d], [chunk]
        f = jnp.where(mc[None, :, None] > 0, all_expert_outputs(experts, act, xc).astype(jnp.float32),
                      0.0)  # [E, chunk, d]
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
        mean_output=out_sum,
        sum_output_norm=out_norm,
        gram_tokens=mask_sub.sum(),
    )


@functools.lru_cache(maxsize=8)
def _batch_fn(graphdef, chunk: int):
    from flax import nnx

    @jax.jit
    def run(state, input_ids, attention_mask, gram_index, gram_valid):
        model = nnx.merge(graphdef, state)
        valid = attention_mask.reshape(-1).astype(jnp.float32)  # [B*T]
        observe = functools.partial(_layer_sums, valid=valid, gram_index=gram_index, gram_valid=gram_valid,
                                    chunk=chunk)
        _, observations = model.hidden_states(input_ids, attention_mask, observe=observe)
        per_stack = [o for o in observations if o is not None]
        return jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0), *per_stack)

    return run


def batch_sums(model, input_ids, attention_mask, gram_index, gram_valid, chunk: int = 256):
    """One jitted observed forward -> StatSums of float32 device arrays [num_moe_layers, ...].

    input_ids/attention_mask [B, T]; gram_index [S] int (flattened b*T + t positions of the Gram subsample) and
    gram_valid [S] (0 for unused slots); S must be a multiple of ``min(chunk, S)``.
    """
    from flax import nnx

    if not model.config.is_moe:
        raise ValueError(f"{model.config.family} model has no MoE layers to calibrate")
    gram_index = np.asarray(gram_index, np.int32)
    chunk = max(1, min(chunk, len(gram_index)))
    if len(gram_index) % chunk:
        raise ValueError(f"{len(gram_index)} Gram slots is not a multiple of the chunk {chunk}")
    graphdef, state = nnx.split(model)
    return _batch_fn(graphdef, chunk)(state, jnp.asarray(input_ids, jnp.int32), jnp.asarray(attention_mask, jnp.int32),
                                      jnp.asarray(gram_index), jnp.asarray(gram_valid, jnp.int32))


def gram_quota(seq_id: int, num_seqs: int, gram_tokens: int) -> int:
    """Gram positions owed by sequence ``seq_id`` of ``num_seqs`` (the quotas sum to ``gram_tokens``)."""
    return (seq_id + 1) * gram_tokens // num_seqs - seq_id * gram_tokens // num_seqs


def gram_slots(batch_size: int, num_seqs: int, gram_tokens: int, seq_len: int, chunk: int) -> int:
    """Static number of Gram slots per batch (a multiple of the chunk)."""
    most = min(-(-gram_tokens // num_seqs), seq_len) * batch_size
    c = max(1, min(chunk, most))
    return max(c, -(-most // c) * c)


def gram_positions(attention_mask, seq_ids, num_seqs: int, gram_tokens: int, seed: int, slots: int):
    """The Gram subsample of one batch: (index [slots] flattened positions, valid [slots]).

    attention_mask [B, T]; seq_ids [B] the rows' indices in the calibration set (-1 for filler rows).
    """
    mask = np.asarray(attention_mask)
    seq_len = mask.shape[1]
    picked = []
    for row, sid in enumerate(seq_ids):
        if sid < 0:
            continue
        positions = np.flatnonzero(mask[row])
        n = min(gram_quota(int(sid), num_seqs, gram_tokens), len(positions))
        chosen = np.sort(np.random.default_rng([seed, int(sid)]).choice(positions, n, replace=False))
        picked.append(row * seq_len + chosen)
    picked = np.concatenate(picked) if picked else np.zeros(0, np.int64)
    if len(picked) > slots:
        raise ValueError(f"batch needs {len(picked)} Gram slots, only {slots} available")
    index = np.zeros(slots, np.int32)
    index[:len(picked)] = picked
    return index, (np.arange(slots) < len(picked)).astype(np.int32)


def accumulate(model, batches: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]], num_seqs: int,
               gram_tokens: int, seed: int = 0, chunk: int = 256, progress=None) -> StatSums:
    """Float64 host sums over ``batches`` of (input_ids [B, T], attention_mask [B, T], seq_ids [B]).

    ``num_seqs`` is the size of the whole calibration set (all shards), which fixes each sequence's Gram quota.
    ``progress`` (a tqdm bar or None) is advanced by the valid tokens of each batch.
    """
    c = model.config
    total = StatSums.zeros(len(c.moe_layers), c.moe.experts.num_experts, c.hidden_size)
    pending = None  # the previous batch's device result: fetched after the next batch is dispatched

    def fetch(result, tokens):
        nonlocal total
        total = total + StatSums(*(np.asarray(x, np.float64) for x in jax.device_get(result)))
        if progress is not None:
            progress.update(tokens)

    for ids, mask, seq_ids in batches:
        slots = gram_slots(ids.shape[0], num_seqs, gram_tokens, ids.shape[1], chunk)
        index, valid = gram_positions(mask, seq_ids, num_seqs, gram_tokens, seed, slots)
        result = batch_sums(model, ids, mask, index, valid, chunk), int(np.asarray(mask).sum())
        if pending is not None:
            fetch(*pending)
        pending = result
    if pending is not None:
        fetch(*pending)
    return total


# ---- the calibration stage -------------------------------------------------------------------------------------
def calibration_batches(windows: np.ndarray, batch_size: int, shard_index: int = 0, shard_count: int = 1):
    """(input_ids, attention_mask, seq_ids) batches of this shard, served by grain; the last batch is filled with
    masked rows (seq id -1) so every batch has the same static shape."""
    from m2d_jax.data import packed_dataset

    seq_ids = np.arange(len(windows))
    ds = packed_dataset(windows, batch_size, shuffle=False, shard_index=shard_index, shard_count=shard_count,
                        drop_remainder=False)
    ids_ds = packed_dataset(seq_ids[:, None], batch_size, shuffle=False, shard_index=shard_index,
                            shard_count=shard_count, drop_remainder=False)
    for batch, sid in zip(ds, ids_ds):
        ids, mask, sid = batch["input_ids"], batch["attention_mask"], sid["input_ids"][:, 0]
        short = batch_size - ids.shape[0]
        if short:
            ids = np.concatenate([ids, np.zeros((short, ids.shape[1]), ids.dtype)])
            mask = np.concatenate([mask, np.zeros((short, mask.shape[1]), mask.dtype)])
            sid = np.concatenate([sid, np.full(short, -1, sid.dtype)])
        yield ids, mask, sid


def calibrate(model_path: str | Path, data_files: Sequence[str | Path], seq_len: int = 2048, num_seqs: int = 512,
              gram_tokens: int = 32768, batch_size: int = 8, seed: int = 0, gram_chunk: int = 256,
              tokenizer_dir: str | Path | None = None, text_field: str = "text", shard_index: int = 0,
              shard_count: int = 1, dtype: str = "float32", show_progress: bool = True) -> CalibrationStats:
    """``m2d calibrate``: statistics of the teacher at ``model_path`` on local text files (SPEC §2).

    The calibration set is ``num_seqs`` packed windows of ``seq_len`` tokens chosen with ``seed``; this call
    processes shard ``shard_index`` of ``shard_count`` (combine the shards' results with ``combine_stats``).
    """
    from tqdm.auto import tqdm

    import m2d_jax
    from m2d_jax.data import DataError, load_tokenizer, pack_documents, read_documents, tokenize_documents

    for name, value in (("seq_len", seq_len), ("num_seqs", num_seqs), ("batch_size", batch_size)):
        if value <= 0:
            raise ValueError(f"{name} must be > 0, got {value}")
    if gram_tokens < 0 or not 0 <= shard_index < shard_count:
        raise ValueError(f"need gram_tokens >= 0 and 0 <= shard_index < shard_count "
                         f"(got {gram_tokens}, {shard_index}, {shard_count})")
    tokenizer = load_tokenizer(tokenizer_dir or model_path)
    tokens = tokenize_documents(read_documents(data_files, text_field), tokenizer)  # bad data fails before loading
    model = m2d_jax.from_pretrained(model_path, dtype=dtype)
    config = model.config
    if not config.is_moe:
        raise ValueError(f"{model_path}: {config.family} model has no MoE layers to calibrate")
    if tokens.max() >= config.vocab_size:
        raise DataError(f"tokenizer of {tokenizer.directory} produced id {int(tokens.max())} >= the model's "
                        f"vocab_size {config.vocab_size}")
    windows = pack_documents(tokens, seq_len)
    if len(windows) < num_seqs:
        logger.warning("only %d sequences of %d tokens in the data (asked for %d): using all of them",
                       len(windows), seq_len, num_seqs)
        num_seqs = len(windows)
    windows = windows[np.sort(np.random.default_rng(seed).permutation(len(windows))[:num_seqs])]
    gram_tokens = min(gram_tokens, num_seqs * seq_len)
    shard_tokens = len(range(shard_index, num_seqs, shard_count)) * seq_len
    start = time.perf_counter()
    with tqdm(total=shard_tokens, unit="tok", unit_scale=True, desc="calibrate", disable=not show_progress) as bar:
        sums = accumulate(model, calibration_batches(windows, batch_size, shard_index, shard_count), num_seqs,
                          gram_tokens, seed, gram_chunk, bar)
    seconds = time.perf_counter() - start
    logger.info("calibration: %d tokens in %.1f s (%.0f tokens/s, incl. compile)", sums.tokens[0], seconds,
                sums.tokens[0] / max(seconds, 1e-9))
    metadata = dict(
        format=FORMAT, m2d_jax_version=m2d_jax.__version__, model_path=str(Path(model_path).absolute()),
        config_hash=config_hash(config), family=config.family, num_experts=config.moe.experts.num_experts,
        top_k=model.runtime.top_k_for(config), norm_topk_prob=config.moe.router.norm_topk_prob,
        hidden_size=config.hidden_size,
        moe_layers=list(config.moe_layers), data_files=[str(Path(f).absolute()) for f in data_files],
        seq_len=seq_len, num_seqs=num_seqs, seed=seed, gram_tokens_requested=gram_tokens,
        tokens_seen=int(sums.tokens[0]), gram_tokens_seen=int(sums.gram_tokens[0]), batch_size=batch_size,
        shards=[shard_index], shard_count=shard_count, seconds=seconds)
    return CalibrationStats(sums, metadata)


# ---- combine, validate, save, load ----------------------------------------------------------------------------
def combine_stats(*parts: CalibrationStats) -> CalibrationStats:
    """Sum the statistics of disjoint shards (hosts) of the same calibration set."""
    if not parts:
        raise ValueError("nothing to combine")
    first = parts[0].metadata
    for p in parts[1:]:
        for key in ("config_hash", "moe_layers", "seq_len", "num_seqs", "seed", "gram_tokens_requested"):
            if p.metadata.get(key) != first.get(key):
                raise StatsError(f"cannot combine statistics with different {key}: "
                                 f"{first.get(key)!r} vs {p.metadata.get(key)!r}")
    shards = sorted(s for p in parts for s in p.metadata.get("shards", []))
    if len(shards) != len(set(shards)):
        raise StatsError(f"shards {shards} overlap: each shard must be combined once")
    sums = parts[0].sums
    for p in parts[1:]:
        sums = sums + p.sums
    metadata = dict(first, shards=shards, tokens_seen=int(sums.tokens[0]), gram_tokens_seen=int(sums.gram_tokens[0]),
                    seconds=sum(p.metadata.get("seconds", 0.0) for p in parts))
    return CalibrationStats(sums, metadata)


def validate(stats: CalibrationStats, source: str = "statistics") -> CalibrationStats:
    """Check field shapes against the metadata and that every value is finite; raise ``StatsError`` naming the
    field (and layer) otherwise."""
    meta = stats.metadata
    for key in ("config_hash", "num_experts", "top_k", "moe_layers", "hidden_size"):
        if key not in meta:
            raise StatsError(f"{source}: metadata has no {key!r}")
    shapes = expected_shapes(len(meta["moe_layers"]), int(meta["num_experts"]), int(meta["hidden_size"]))
    for name, want in shapes.items():
        value = np.asarray(getattr(stats.sums, name))
        if value.shape != want:
            raise StatsError(f"{source}: field {name!r} has shape {value.shape}, expected {want}")
        bad = ~np.isfinite(value)
        if bad.any():
            layer = int(np.argwhere(bad)[0][0])
            raise StatsError(f"{source}: field {name!r} has {int(bad.sum())} NaN/inf values (first in MoE layer "
                             f"{meta['moe_layers'][layer]})")
    if (np.asarray(stats.sums.tokens) <= 0).any():
        raise StatsError(f"{source}: no calibration tokens (field 'tokens' is 0)")
    return stats


def save_stats(stats: CalibrationStats, path: str | Path, overwrite: bool = False) -> Path:
    """One ``.npz`` file (float64 sums + a JSON metadata record), written to a temporary file and renamed."""
    from m2d_jax.checkpoint import ensure_new_output

    path = Path(path).absolute()
    ensure_new_output(path, overwrite=overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, metadata=np.asarray(json.dumps(stats.metadata)),
                     **{name: np.asarray(v, np.float64) for name, v in stats.sums._asdict().items()})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def load_stats(path: str | Path) -> CalibrationStats:
    """Read and validate a statistics file written by ``save_stats``."""
    path = Path(path)
    if not path.is_file():
        raise StatsError(f"{path}: statistics file not found")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (OSError, ValueError) as err:
        raise StatsError(f"{path}: not a statistics file ({err})") from err
    if "metadata" not in arrays:
        raise StatsError(f"{path}: no metadata record")
    metadata = json.loads(str(arrays.pop("metadata")))
    if metadata.get("format") != FORMAT:
        raise StatsError(f"{path}: format {metadata.get('format')!r}, expected {FORMAT!r}")
    missing = [n for n in StatSums._fields if n not in arrays]
    if missing:
        raise StatsError(f"{path}: missing fields {missing}")
    return validate(CalibrationStats(StatSums(**{n: arrays[n] for n in StatSums._fields}), metadata), str(path))
