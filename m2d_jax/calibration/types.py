"""Calibration statistics: the additive sums (``StatSums``), the record that carries them with their metadata
(``CalibrationStats``), and their checks (``validate``, ``combine_stats``). The method is in docs/METHOD.md.

Every statistic is a **sum** over valid (non-padding) tokens, so batches, shards and hosts combine by addition
(``StatSums.__add__`` / ``combine_stats``). All fields carry a leading ``[num_moe_layers]`` axis; row ``i`` is global
decoder layer ``metadata["moe_layers"][i]``. With ``p`` the full softmax over all E router logits (incl. any router
bias), ``A(t)`` the experts actually selected for token ``t``, ``w`` the routing weights actually applied (0 when not
selected; ``rho * p`` for un-normalised routers, renormalised for ``norm_topk_prob``) and ``f_e`` expert ``e``'s
unweighted output:

=========================  ==========  ==============================================================  ===========
field                      shape       sum over valid tokens t of                                      symbol
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
sum_output                 [L, E, d]   f_e(x_t)                      (U only; mu = sum_output / n_G)   n_G mu
sum_output_norm            [L, E]      |f_e(x_t)|                    (U only)                          N_e^all
gram_tokens                [L]         1                             (U only)                          n_G
=========================  ==========  ==============================================================  ===========

With per-layer expert counts (``metadata["num_experts_per_layer"]``: E_l of each MoE layer, E = max E_l), experts
E_l..E-1 of layer l are padding: every field is 0 for them (never routed to, p = 0, outputs not observed).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import NamedTuple

import numpy as np

from m2d_jax.errors import StatsError

FORMAT = "m2d_jax.calibration/2"  # 2: the field ``mean_output`` (a sum) is now ``sum_output``


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
    sum_output: np.ndarray  # [L, E, d] (divide by gram_tokens for the mean output)
    sum_output_norm: np.ndarray  # [L, E]
    gram_tokens: np.ndarray  # [L]

    @property
    def sum_selected_weight_total(self):  # [L] sum over tokens of the selected experts' softmax mass
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
    shapes.update(tokens=(l,), gram_tokens=(l,), router_logit_moment=(l, e, e), gram=(l, e, e), sum_output=(l, e, d))
    return shapes


@dataclasses.dataclass(frozen=True)
class CalibrationStats:
    sums: StatSums  # float64 NumPy arrays
    metadata: dict  # config_hash, family, num_experts, top_k, moe_layers, seq_len, seed, model_path, ...

    @property
    def num_experts(self) -> int:
        return int(self.metadata["num_experts"])

    @property
    def top_k(self) -> int:
        return int(self.metadata["top_k"])

    @property
    def experts_per_layer(self) -> list[int]:
        """Real routed experts E_l of each MoE layer (all E unless the model has per-layer expert counts)."""
        return [int(n) for n in self.metadata.get("num_experts_per_layer") or [self.num_experts] * len(self.moe_layers)]

    @property
    def real_experts(self) -> np.ndarray:
        """[L, E] bool: True for each layer's real experts, False for its padding (ids E_l..E-1)."""
        return np.arange(self.num_experts)[None, :] < np.asarray(self.experts_per_layer)[:, None]

    @property
    def moe_layers(self) -> list[int]:
        return list(self.metadata["moe_layers"])

    @property
    def structure_hash(self) -> str:
        """``ModelConfig.structure_hash()`` of the model the statistics were collected on."""
        return str(self.metadata["config_hash"])

    def check_model(self, config) -> None:
        """Raise ``StatsError`` unless these statistics were collected on a model with ``config``'s structure."""
        want = config_hash(config)
        if self.metadata.get("config_hash") != want:
            raise StatsError(f"statistics from a different model: config hash {self.metadata.get('config_hash')!r} "
                             f"(collected on {self.metadata.get('model_path')!r}) != {want!r} of the given model")

    def digest(self) -> str:
        """sha256 of the content: the model's structure hash, the MoE layers and every sum (float64 bytes). Equal
        for equal statistics however they were stored or combined; what a ``Selection`` and a checkpoint record."""
        h = hashlib.sha256(json.dumps([self.metadata.get("config_hash"), self.moe_layers]).encode())
        for name in StatSums._fields:
            value = np.ascontiguousarray(getattr(self.sums, name), np.float64)
            h.update(f"{name}{value.shape}".encode())
            h.update(value.tobytes())
        return h.hexdigest()


def config_hash(config) -> str:
    """The model structure's fingerprint that statistics record (``ModelConfig.structure_hash``)."""
    return config.structure_hash()


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
    counts = meta.get("num_experts_per_layer")
    if counts is not None:
        e, k = int(meta["num_experts"]), int(meta["top_k"])
        if len(counts) != len(meta["moe_layers"]) or not all(isinstance(n, int) and k <= n <= e for n in counts):
            raise StatsError(f"{source}: metadata 'num_experts_per_layer' = {counts}: expected one count in "
                             f"[top_k={k}, num_experts={e}] per MoE layer")
        padded = ~stats.real_experts  # [L, E]
        for name in StatSums._fields:
            value = np.asarray(getattr(stats.sums, name))
            if value.ndim < 2:
                continue
            if name in ("router_logit_moment", "gram"):  # [L, E, E]: the padded rows and columns
                leak = padded[:, :, None] | padded[:, None, :]
            else:  # [L, E] or [L, E, d]
                leak = np.broadcast_to(padded.reshape(padded.shape + (1,) * (value.ndim - 2)), value.shape)
            if (value[leak] != 0).any():
                layer = int(np.argwhere(leak & (value != 0))[0][0])
                raise StatsError(f"{source}: field {name!r} is non-zero for padded experts of MoE layer "
                                 f"{meta['moe_layers'][layer]} (it has {counts[layer]} real experts)")
    return stats

