"""The width planner of dense-to-dense pruning: which shape of the teacher to prune to, for a parameter target.

A pruned model differs from its teacher only in five sizes (``PrunedShape``): FFN width, query heads, KV heads
(whole GQA groups), hidden size and depth. Its parameter count is exact arithmetic on the teacher's own parameter
leaves: every leaf's size is the product of its dimensions, and each dimension is named by its logical axis
(``mlp``, ``heads``, ``kv_heads``, ``embed``, ``layers``), so a shape's count needs no model built.

The rule (docs/METHOD.md, "Dense-to-dense pruning baseline"): the enabled axes are used from the finest to the
coarsest, FFN -> heads -> hidden -> depth. The coarsest axis that must shrink is shrunk as little as reaches the
target with every finer axis at its floor; the finer coarse axes are then shrunk as little as still reaches it; the
FFN width (one neuron = ``3 d`` parameters per layer) finally takes the value whose count is closest to the target.
No axis keeps fewer than ``ceil(min_fraction * teacher size)`` units (and at least one).
"""

from __future__ import annotations

import dataclasses
import math
import re

from m2d_jax.errors import PruneError
from m2d_jax.models import ModelConfig

PRUNE_AXES = ("ffn", "heads", "hidden", "depth")  # finest first: the planner's order
DEFAULT_AXES = ("ffn", "heads")
DEFAULT_MIN_FRACTION = 0.1
_SUFFIXES = {"": 1, "K": 10 ** 3, "M": 10 ** 6, "B": 10 ** 9, "G": 10 ** 9}


@dataclasses.dataclass(frozen=True)
class PrunedShape:
    """The sizes pruning changes; every other field of the config is the teacher's."""
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    hidden_size: int
    num_layers: int

    @classmethod
    def of(cls, config: ModelConfig) -> "PrunedShape":
        a = config.attention
        return cls(config.ffn.intermediate_size, a.num_heads, a.num_kv_heads, config.hidden_size, config.num_layers)

    def axis_sizes(self) -> dict[str, int]:
        """Size of each logical parameter axis under this shape."""
        return {"mlp": self.intermediate_size, "heads": self.num_heads, "kv_heads": self.num_kv_heads,
                "embed": self.hidden_size, "layers": self.num_layers}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def parameter_axes(config: ModelConfig) -> list[tuple[tuple[str, ...], tuple[int, ...]]]:
    """(logical axes, shape) of every parameter leaf of the model ``config`` describes (no memory allocated)."""
    from flax import nnx

    from m2d_jax.models import abstract_model

    state = nnx.state(abstract_model(config), nnx.Param)
    return [(tuple(v.get_metadata()["out_sharding"]), tuple(v.get_value().shape)) for _, v in state.flat_state()]


def shape_param_count(leaves: list[tuple[tuple[str, ...], tuple[int, ...]]], shape: PrunedShape) -> int:
    """Parameters of the teacher (``leaves`` = its ``parameter_axes``) pruned to ``shape``."""
    sizes = shape.axis_sizes()
    return sum(math.prod(sizes.get(axis, dim) for axis, dim in zip(axes, dims)) for axes, dims in leaves)


def parse_param_count(text: str) -> int:
    """``"1.2M"`` -> 1200000; also plain integers, ``1_000``, ``K`` / ``M`` / ``B`` (= ``G``) suffixes."""
    match = re.fullmatch(r"\s*([0-9][0-9_,]*(?:\.[0-9]+)?)\s*([KMBG]?)\s*", str(text), re.IGNORECASE)
    if not match:
        raise PruneError(f"parameter count {text!r}: expected a number with an optional K / M / B suffix, "
                         f"e.g. 1200000 or 1.2M")
    count = round(float(match.group(1).replace("_", "").replace(",", "")) * _SUFFIXES[match.group(2).upper()])
    if count <= 0:
        raise PruneError(f"parameter count {text!r} must be > 0")
    return count


def check_prunable(config: ModelConfig, axes) -> tuple[str, ...]:
    """The enabled axes in planner order, after checking that ``config`` is a dense model they apply to."""
    axes = tuple(axes)
    unknown = sorted(set(axes) - set(PRUNE_AXES))
    if unknown or not axes:
        raise PruneError(f"pruning axes {list(axes)}: expected a non-empty subset of {list(PRUNE_AXES)}")
    if config.is_moe:
        raise PruneError(f"the {config.family} model has MoE layers: dense-to-dense pruning takes a dense teacher "
                         f"(convert an MoE teacher with `m2d convert`)")
    a = config.attention
    if "heads" in axes and (a.kind != "gqa" or a.qk_norm == "full"):
        raise PruneError(f"the {config.family} model's attention ({a.kind}, qk_norm={a.qk_norm!r}) has no separable "
                         f"heads to prune: drop 'heads' from the axes")
    return tuple(axis for axis in PRUNE_AXES if axis in axes)


def _floor(size: int, min_fraction: float) -> int:
    return max(1, math.ceil(min_fraction * size))


def axis_options(config: ModelConfig, axis: str, min_fraction: float) -> list[dict]:
    """The ``PrunedShape`` field values one axis may take, from the teacher's (unpruned) down to its floor."""
    a = config.attention
    if axis == "ffn":
        m = config.ffn.intermediate_size
        return [{"intermediate_size": w} for w in range(m, _floor(m, min_fraction) - 1, -1)]
    if axis == "heads":  # whole KV groups and query heads per group (the same number in every group)
        group = a.num_heads // a.num_kv_heads
        floor = _floor(a.num_heads, min_fraction)
        options = [{"num_heads": g * r, "num_kv_heads": g} for g in range(a.num_kv_heads, 0, -1)
                   for r in range(group, 0, -1) if g * r >= floor]
        return options
    if axis == "hidden":
        d = config.hidden_size
        return [{"hidden_size": h} for h in range(d, _floor(d, min_fraction) - 1, -1)]
    if axis == "depth":
        n = config.num_layers
        return [{"num_layers": n_} for n_ in range(n, _floor(n, min_fraction) - 1, -1)]
    raise PruneError(f"unknown pruning axis {axis!r} (expected one of {list(PRUNE_AXES)})")


def plan_shape(config: ModelConfig, target_params: int, axes=DEFAULT_AXES,
               min_fraction: float = DEFAULT_MIN_FRACTION) -> tuple[PrunedShape, int]:
    """The shape the teacher ``config`` is pruned to for ``target_params`` under the rule of the module docstring,
    and its exact parameter count."""
    axes = check_prunable(config, axes)
    if not 0 < min_fraction <= 1:
        raise PruneError(f"min_fraction={min_fraction}: expected a fraction in (0, 1]")
    leaves = parameter_axes(config)
    teacher = PrunedShape.of(config)
    teacher_count = shape_param_count(leaves, teacher)
    if target_params > teacher_count:
        raise PruneError(f"target of {target_params:,} parameters exceeds the teacher's {teacher_count:,}: pruning "
                         f"only removes parameters")

    def count(**fields) -> int:
        return shape_param_count(leaves, dataclasses.replace(teacher, **fields))

    # each axis' options from the largest model to the smallest (the last is the axis' floor)
    options = {axis: sorted(axis_options(config, axis, min_fraction), key=lambda o: -count(**o)) for axis in axes}

    floors: dict = {}
    for j, axis in enumerate(axes):  # the coarsest axis that has to shrink: axes[j]
        floors.update(options[axis][-1])
        if count(**floors) <= target_params:
            break
    else:
        raise PruneError(f"target of {target_params:,} parameters is below the smallest model the axes "
                         f"{list(axes)} allow ({count(**floors):,} at min_fraction={min_fraction}): enable more "
                         f"axes or lower the minimum fraction")
    chosen: dict = {}
    for i in range(j, -1, -1):  # coarsest to finest: each shrunk as little as the finer ones' floors allow
        finer_floors = {k: v for axis in axes[:i] for k, v in options[axis][-1].items()}
        if i > 0:  # the largest model that still reaches the target (ties: the first option, more KV groups)
            fits = [o for o in options[axes[i]] if count(**chosen, **o, **finer_floors) <= target_params]
            best = max(fits, key=lambda o: count(**chosen, **o, **finer_floors))
        else:  # the finest axis comes closest, from either side (ties: the larger model)
            best = min(options[axes[0]], key=lambda o: (abs(count(**chosen, **o) - target_params),
                                                        -count(**chosen, **o)))
        chosen.update(best)
    shape = dataclasses.replace(teacher, **chosen)
    return shape, shape_param_count(leaves, shape)
