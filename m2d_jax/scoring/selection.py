"""The selection stage: ``select_experts(stats, scoring, K) -> Selection``, and the Selection artifact on disk.

A ``Selection`` is what conversion consumes: the K experts kept in every MoE layer in selection order (importance
order, or the greedy order of the D-optimal scorings), the merge / DP weights ``weight_scores`` (the base
importance CP or ACP for the D-optimal scorings, the score itself for the others) and its provenance (the
statistics' ``digest()``, the model's ``structure_hash()``, the package version). ``save_selection`` writes it as
one JSON file; ``load_selection`` validates every field.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np

from m2d_jax.artifacts import write_json
from m2d_jax.calibration import CalibrationStats, validate
from m2d_jax.errors import SelectionError, StatsError
from m2d_jax.scoring.logdet import importance_order
from m2d_jax.scoring.scores import DO_IMPORTANCE, SCORINGS, logdet_greedy, real_experts, resolve_options, score

SELECTION_FORMAT = "m2d_jax.selection/1"


@dataclasses.dataclass(frozen=True)
class Selection:
    """The experts kept per MoE layer; row i of every array is MoE layer ``moe_layers[i]``."""
    scoring: str
    options: dict  # the scoring's options, defaults filled in
    moe_layers: tuple[int, ...]
    selected: np.ndarray  # [L, K] int32 expert ids in selection order
    weight_scores: np.ndarray  # [L, E] float64 merge / DP weights
    gains: np.ndarray | None  # [L, K] log-det gain of each greedy pick (D-optimal only; -inf where filled)
    filled: np.ndarray | None  # [L, K] bool: filled by importance after an early stop (D-optimal only)
    stats_sha256: str  # CalibrationStats.digest() of the statistics selected from
    structure_hash: str  # ModelConfig.structure_hash() of the model the statistics were collected on
    package_version: str

    @property
    def num_selected(self) -> int:  # K
        return int(self.selected.shape[1])

    @property
    def num_experts(self) -> int:  # E
        return int(self.weight_scores.shape[1])

    def check_stats(self, stats: CalibrationStats, source: str = "selection") -> None:
        """Raise ``SelectionError`` unless this selection was made from ``stats``."""
        if self.structure_hash != stats.structure_hash or list(self.moe_layers) != stats.moe_layers:
            raise SelectionError(f"{source}: made for a different model (structure hash {self.structure_hash!r}, MoE "
                                 f"layers {list(self.moe_layers)}) than the statistics ({stats.structure_hash!r}, "
                                 f"{stats.moe_layers})")
        if self.stats_sha256 != stats.digest():
            raise SelectionError(f"{source}: made from other statistics (stats_sha256 {self.stats_sha256[:12]}... "
                                 f"!= {stats.digest()[:12]}... of the given statistics)")

    def check_model(self, config, source: str = "selection") -> None:
        """Raise ``SelectionError`` unless this selection was made for a model with ``config``'s structure."""
        if self.structure_hash != config.structure_hash():
            raise SelectionError(f"{source}: made for a different model (structure hash {self.structure_hash!r} != "
                                 f"{config.structure_hash()!r} of the given model)")

    def to_dict(self) -> dict:
        """The JSON record (per-layer rows keyed by the global layer index)."""

        def by_layer(array, convert):
            return None if array is None else {str(l): [convert(v) for v in row] for l, row in
                                               zip(self.moe_layers, np.asarray(array).tolist())}

        gains = None
        if self.gains is not None:  # -inf (filled slots) is not JSON: null
            gains = by_layer(np.where(np.isfinite(self.gains), self.gains, np.nan), float)
            gains = {l: [None if math.isnan(g) else g for g in row] for l, row in gains.items()}
        return {"format": SELECTION_FORMAT, "scoring": self.scoring, "options": dict(self.options),
                "num_selected": self.num_selected, "num_experts": self.num_experts, "moe_layers": list(self.moe_layers),
                "selected": by_layer(self.selected, int), "weight_scores": by_layer(self.weight_scores, float),
                "gains": gains, "filled": by_layer(self.filled, bool), "stats_sha256": self.stats_sha256,
                "structure_hash": self.structure_hash, "package_version": self.package_version}

    @classmethod
    def from_dict(cls, record, source: str = "selection") -> "Selection":
        """Validate a JSON record (``to_dict``); ``SelectionError`` naming ``source`` and the field otherwise."""

        def fail(field, expected):
            raise SelectionError(f"{source}: field {field!r}: {expected}")

        if not isinstance(record, dict):
            raise SelectionError(f"{source}: not a selection record (a JSON object expected)")
        if record.get("format") != SELECTION_FORMAT:
            fail("format", f"{record.get('format')!r}, expected {SELECTION_FORMAT!r}")
        for field, kind in (("scoring", str), ("options", dict), ("num_selected", int), ("num_experts", int),
                            ("moe_layers", list), ("selected", dict), ("weight_scores", dict), ("stats_sha256", str),
                            ("structure_hash", str), ("package_version", str)):
            if not isinstance(record.get(field), kind) or isinstance(record.get(field), bool):
                fail(field, f"expected a JSON {kind.__name__}, got {record.get(field)!r:.60}")
        if record["scoring"] not in SCORINGS:
            fail("scoring", f"{record['scoring']!r}, expected one of {SCORINGS}")
        try:
            options = resolve_options(record["scoring"], record["options"])
        except ValueError as err:
            fail("options", str(err))
        layers = record["moe_layers"]
        if not layers or not all(isinstance(l, int) and not isinstance(l, bool) for l in layers) \
                or len(set(layers)) != len(layers):
            fail("moe_layers", f"expected distinct layer indices, got {layers!r:.60}")
        k, e = record["num_selected"], record["num_experts"]
        if not 1 <= k <= e:
            fail("num_selected", f"K={k} must be between 1 and num_experts={e}")

        def rows(field, width, check, required=True):
            table = record.get(field)
            if table is None and not required:
                return None
            if not isinstance(table, dict) or sorted(table) != sorted(map(str, layers)):
                fail(field, f"expected one row per MoE layer {layers}")
            out = []
            for l in layers:
                row = table[str(l)]
                if not isinstance(row, list) or len(row) != width or not all(check(v) for v in row):
                    fail(field, f"layer {l}: expected {width} values, got {row!r:.80}")
                out.append(row)
            return out

        def is_id(v):
            return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < e

        def is_number(v):
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        selected = np.asarray(rows("selected", k, is_id), np.int32)
        for l, row in zip(layers, selected):
            if len(set(row.tolist())) != k:
                fail("selected", f"layer {l}: expert ids {row.tolist()} are not distinct")
        weight_scores = np.asarray(rows("weight_scores", e, is_number), np.float64)
        gains = rows("gains", k, lambda v: v is None or is_number(v), required=False)
        filled = rows("filled", k, lambda v: isinstance(v, bool), required=False)
        if (gains is None) != (filled is None):
            fail("gains" if gains is None else "filled", "'gains' and 'filled' come together")
        if gains is not None:
            filled = np.asarray(filled, bool)
            if any((g is None) != f for g_row, f_row in zip(gains, filled) for g, f in zip(g_row, f_row)):
                fail("gains", "must be null exactly where 'filled' is true")
            gains = np.asarray([[-np.inf if g is None else g for g in row] for row in gains], np.float64)
        return cls(record["scoring"], options, tuple(layers), selected, weight_scores, gains, filled,
                   record["stats_sha256"], record["structure_hash"], record["package_version"])


def select_experts(stats: CalibrationStats, scoring: str, num_selected: int, **options) -> Selection:
    """Select ``num_selected`` (K) experts per MoE layer with ``scoring`` (one of ``SCORINGS``).

    ``options``: ``acp_form`` (reap, gld_reap), ``beta`` / ``ridge`` / ``kernel`` (gram_logdet, gld_reap). Raises
    ``StatsError`` for K outside [top-k, E] or non-finite statistics, ``ValueError`` for a bad scoring or option.
    Selections are nested in K: the selection for K is the prefix of the selection for any K' > K.
    """
    from m2d_jax import __version__

    if not isinstance(stats, CalibrationStats):
        raise TypeError(f"expected CalibrationStats, got {type(stats).__name__}")
    validate(stats)
    resolved = resolve_options(scoring, options)
    e, k = stats.num_experts, stats.top_k
    if not k <= num_selected <= e:
        raise StatsError(f"cannot keep K={num_selected} experts per layer: need top-k={k} <= K <= E={e}")
    fewest = min(stats.experts_per_layer)
    if num_selected > fewest:  # per-layer expert counts: K is bounded by the smallest layer
        layer = stats.moe_layers[stats.experts_per_layer.index(fewest)]
        raise StatsError(f"cannot keep K={num_selected} experts per layer: MoE layer {layer} has only {fewest} "
                         f"experts (num_experts_per_layer={stats.experts_per_layer})")
    gains = filled = None
    if scoring in DO_IMPORTANCE:
        greedy, weight_scores = logdet_greedy(stats, scoring, num_selected, **resolved)
        selected, gains, filled = greedy
    else:
        weight_scores = score(stats, scoring, **resolved)
        selected = importance_order(weight_scores, score(stats, "selection_freq"),
                                    real_experts(stats))[:, :num_selected]
    return Selection(scoring, resolved, tuple(stats.moe_layers), np.asarray(selected, np.int32), weight_scores,
                     gains, filled, stats.digest(), stats.structure_hash, __version__)


def save_selection(selection: Selection, path: str | Path, overwrite: bool = False) -> Path:
    """Write ``selection`` as one JSON file (a temporary file renamed when complete); returns the absolute path."""
    return write_json(selection.to_dict(), path, overwrite=overwrite)


def load_selection(path: str | Path) -> Selection:
    """Read and validate a selection file written by ``save_selection``."""
    path = Path(path)
    if not path.is_file():
        raise SelectionError(f"{path}: selection file not found")
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SelectionError(f"{path}: not a selection file, or a truncated one ({type(err).__name__}: {err})") \
            from err
    return Selection.from_dict(record, str(path))
