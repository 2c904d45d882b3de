"""Structured width / depth pruning of a dense decoder to a parameter target: ``prune_dense(teacher, windows, N)``.

Which units are kept follows from the ``Importance`` of one calibration pass and the ``PrunedShape`` of the planner:
the most important layers (block importance), hidden channels (summed over the kept layers), and in every kept layer
its most important FFN neurons and attention heads (whole KV groups, ranked by the sum of their kept query heads,
and the same number of query heads in each kept group). Ties keep the lower index; kept units stay in their order.

The pruned model is the teacher's family with the new sizes: every parameter leaf is the teacher's leaf indexed on
each of its logical axes (``layers``, ``embed``, ``heads``, ``kv_heads``, ``mlp``), so nothing depends on a family's
parameter names, and the result exports with ``m2d_jax.hf.export`` like any model of that family.
"""

from __future__ import annotations

import dataclasses
import logging

import jax.numpy as jnp
import numpy as np
from flax import nnx

from m2d_jax.errors import PruneError
from m2d_jax.models import CausalLM, ModelConfig, abstract_model
from m2d_jax.prune.importance import Importance, compute_importance
from m2d_jax.prune.plan import DEFAULT_AXES, DEFAULT_MIN_FRACTION, PrunedShape, plan_shape

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class KeptUnits:
    """Teacher indices kept by pruning, in teacher order."""
    layers: np.ndarray  # [layers'] kept teacher layers
    hidden: np.ndarray  # [hidden'] kept hidden channels (the same in every layer: the residual stream)
    ffn: np.ndarray  # [layers', intermediate'] kept FFN neurons of each kept layer
    heads: np.ndarray  # [layers', heads'] kept query heads, grouped by kept KV group
    kv_heads: np.ndarray  # [layers', kv_heads'] kept KV groups

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name).tolist() for f in dataclasses.fields(self)}


@dataclasses.dataclass(frozen=True)
class PruneReport:
    """What ``prune_dense`` did: the target, the teacher's and the achieved parameter counts and shapes, the kept
    units and the calibration tokens their importance was measured on."""
    target_params: int
    teacher_params: int
    params: int  # achieved (the pruned model's exact count)
    axes: tuple[str, ...]
    min_fraction: float
    teacher_shape: PrunedShape
    shape: PrunedShape
    kept: KeptUnits
    calibration_tokens: int

    def to_dict(self) -> dict:
        return {"target_params": self.target_params, "teacher_params": self.teacher_params, "params": self.params,
                "axes": list(self.axes), "min_fraction": self.min_fraction,
                "teacher_shape": self.teacher_shape.to_dict(), "shape": self.shape.to_dict(),
                "kept": self.kept.to_dict(), "calibration_tokens": self.calibration_tokens}


def _top(scores: np.ndarray, n: int) -> np.ndarray:
    """Indices of the ``n`` largest scores (ties: lower index), in increasing order."""
    return np.sort(np.argsort(-scores, kind="stable")[:n])


def select_units(importance: Importance, config: ModelConfig, shape: PrunedShape) -> KeptUnits:
    """The units of the teacher ``config`` that the pruned ``shape`` keeps, by ``importance``."""
    a = config.attention
    group, kept_group = a.num_heads // a.num_kv_heads, shape.num_heads // shape.num_kv_heads
    layers = _top(importance.block, shape.num_layers)
    hidden = _top(importance.hidden[layers].sum(0), shape.hidden_size)
    ffn = np.stack([_top(importance.ffn[layer], shape.intermediate_size) for layer in layers])
    heads, groups = [], []
    for layer in layers:
        per_group = importance.heads[layer].reshape(a.num_kv_heads, group)  # [KV, group]
        best = [_top(row, kept_group) for row in per_group]  # the kept query heads of each group
        kept = _top(np.array([row[b].sum() for row, b in zip(per_group, best)]), shape.num_kv_heads)
        groups.append(kept)
        heads.append(np.concatenate([g * group + best[g] for g in kept]))
    return KeptUnits(layers, hidden, ffn, np.stack(heads), np.stack(groups))


def pruned_config(config: ModelConfig, shape: PrunedShape, layers: np.ndarray) -> ModelConfig:
    """The teacher ``config`` with the sizes of ``shape``, keeping the teacher layers ``layers`` (their attention
    kinds follow them)."""
    a = config.attention
    attention = a.replace(num_heads=shape.num_heads, num_kv_heads=shape.num_kv_heads,
                          layer_types=tuple(a.layer_types[i] for i in layers))
    return config.replace(hidden_size=shape.hidden_size, num_layers=shape.num_layers,
                          ffn=config.ffn.replace(intermediate_size=shape.intermediate_size),
                          ffn_kinds=("dense",) * shape.num_layers, attention=attention)


def _index(value: np.ndarray, axes: tuple[str, ...], kept: KeptUnits, teacher: PrunedShape, where: str) -> np.ndarray:
    """A teacher leaf indexed on each prunable logical axis. Per-layer index sets (mlp, heads, kv_heads) need the
    leaf's leading ``layers`` axis, which is pruned first."""
    per_layer = {"mlp": kept.ffn, "heads": kept.heads, "kv_heads": kept.kv_heads}
    sizes = teacher.axis_sizes()
    for dim, (axis, size) in enumerate(zip(axes, value.shape)):
        if axis in sizes and size != sizes[axis]:
            raise PruneError(f"parameter {where}: axis {axis!r} has {size} entries, the config says {sizes[axis]}")
    if "layers" in axes:
        value = np.take(value, kept.layers, axis=axes.index("layers"))
    if "embed" in axes:
        value = np.take(value, kept.hidden, axis=axes.index("embed"))
    for axis, index in per_layer.items():
        if axis in axes:
            if axes[0] != "layers":
                raise PruneError(f"parameter {where}: axis {axis!r} outside a layer stack")
            dim = axes.index(axis)
            value = np.stack([np.take(v, i, axis=dim - 1) for v, i in zip(value, index)])
    return value


def prune_to(teacher: CausalLM, kept: KeptUnits, shape: PrunedShape) -> CausalLM:
    """The teacher pruned to ``shape`` keeping the units ``kept``, in the teacher's runtime and parameter dtype."""
    config = pruned_config(teacher.config, shape, kept.layers)
    teacher_shape = PrunedShape.of(teacher.config)
    teacher_leaves = {tuple(k): v for k, v in nnx.state(teacher, nnx.Param).flat_state()}
    graphdef, abstract = nnx.split(abstract_model(config, teacher.runtime))
    values = {}
    for path, var in abstract.flat_state():
        path, target = tuple(path), var.get_value()
        source = teacher_leaves[path]
        where = "/".join(map(str, path))
        array = _index(np.asarray(source.get_value()), tuple(source.get_metadata()["out_sharding"]), kept,
                       teacher_shape, where)
        if array.shape != target.shape:
            raise PruneError(f"parameter {where}: pruned to {array.shape}, the pruned config expects {target.shape}")
        values[path] = var.replace(jnp.asarray(array, target.dtype))
    return nnx.merge(graphdef, nnx.State.from_flat_path(values))


def prune_dense(teacher: CausalLM, windows: np.ndarray, target_params: int, *, axes=DEFAULT_AXES,
                min_fraction: float = DEFAULT_MIN_FRACTION, batch_size: int = 8,
                show_progress: bool = False) -> tuple[CausalLM, PruneReport]:
    """The dense ``teacher`` pruned to about ``target_params`` parameters along ``axes`` (a subset of
    ``PRUNE_AXES``: "ffn", "heads", "hidden", "depth"), with Minitron-style activation importance measured on the
    calibration windows [N, T]; the planner's rule and the importance definitions are in docs/METHOD.md
    ("Dense-to-dense pruning baseline"). Returns the pruned model and its ``PruneReport``."""
    from m2d_jax.info import summarize

    config = teacher.config
    shape, planned = plan_shape(config, int(target_params), axes, min_fraction)  # bad targets fail before any work
    importance = compute_importance(teacher, windows, batch_size, show_progress)
    kept = select_units(importance, config, shape)
    pruned = prune_to(teacher, kept, shape)
    teacher_params = summarize(config)["total_params"]
    params = summarize(pruned.config)["total_params"]
    if params != planned:
        raise AssertionError(f"pruned model has {params} parameters, the planner counted {planned}")
    report = PruneReport(int(target_params), teacher_params, params, tuple(axes), float(min_fraction),
                         PrunedShape.of(config), shape, kept, importance.tokens)
    log.info("pruned %s: %s -> %s, %d -> %d parameters (target %d)", config.family, report.teacher_shape, shape,
             teacher_params, params, target_params)
    return pruned, report
