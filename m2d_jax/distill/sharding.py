"""Device mesh and the one table of logical-axis rules.

Parameters carry logical axis names in their ``out_sharding`` metadata (``vocab``, ``embed``, ``heads``,
``kv_heads``, ``head_dim``, ``mlp``, ``exp``, ``layers``; ``q_lora`` / ``kv_lora`` for MLA). ``LOGICAL_AXIS_RULES``
maps each name to a mesh axis (or None = replicated); parallelism is changed here, never in model code. The batch
is sharded over (``data``, ``fsdp``). The same rules serve TPU, GPU and CPU meshes.

Activations carry logical names too (``models.layers.constrain`` at the decoder's layer boundaries, inside attention,
the FFN and the MoE layer, and on the loss chunks); ``ACTIVATION_RULES`` maps them, and a step traced inside
``activation_sharding(mesh)`` keeps every activation's batch sharded over (``data``, ``fsdp``) with the model
dimension whole, so FSDP all-gathers weights instead of all-reducing partial activations (docs/METHOD.md §11).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Callable, Mapping

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from m2d_jax.errors import MeshError
from m2d_jax.models.layers import activation_layout

MESH_AXES = ("data", "fsdp", "tensor", "expert")
BATCH_AXES = ("data", "fsdp")

# logical axis -> mesh axis. FSDP shards the model dimension (ZeRO-3 style); tensor parallelism splits heads, FFN
# width and vocabulary; expert parallelism splits the expert axis. ``layers`` and ``head_dim`` stay whole.
LOGICAL_AXIS_RULES: dict[str, str | None] = {
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "exp": "expert",
    "layers": None,
    "q_lora": None,  # DeepSeek MLA low-rank latents: small, replicated
    "kv_lora": None,
}

# activation logical axis -> mesh axis (or axes). The batch (and the flattened tokens of an MoE layer) over data x
# fsdp; the model dimension whole (FSDP gathers the weights, not the activations); heads, FFN width and vocabulary
# over the tensor axis, as their weights are; the sequence whole.
ACTIVATION_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": BATCH_AXES,
    "seq": None,
    "embed": None,
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "vocab": "tensor",
    "exp": "expert",
}


def mesh_shape(sizes: Mapping[str, int], num_devices: int) -> dict[str, int]:
    """Resolve axis sizes (at most one -1 = "the rest") against ``num_devices``; errors name the offending axes."""
    unknown = sorted(set(sizes) - set(MESH_AXES))
    if unknown:
        raise MeshError(f"config.mesh: unknown axes {unknown}; expected {MESH_AXES}")
    shape = {a: int(sizes.get(a, 1)) for a in MESH_AXES}
    free = [a for a, n in shape.items() if n == -1]
    bad = [a for a, n in shape.items() if n == 0 or n < -1]
    if bad or len(free) > 1:
        raise MeshError(f"config.mesh: sizes must be positive with at most one -1, got {shape}")
    fixed = math.prod(n for n in shape.values() if n != -1)
    if num_devices % fixed:
        raise MeshError(f"config.mesh: product of sizes {shape} = {fixed} does not divide the {num_devices} devices")
    if free:
        shape[free[0]] = num_devices // fixed
    elif fixed != num_devices:
        raise MeshError(f"config.mesh: sizes {shape} use {fixed} devices but {num_devices} are available "
                        f"(set one axis to -1 to take the rest)")
    return shape


def make_mesh(sizes: Mapping[str, int], devices=None) -> Mesh:
    """A ``Mesh`` with axes (data, fsdp, tensor, expert) from config sizes (-1 = the rest of the devices)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(sizes, len(devices))
    try:  # topology-aware device order on TPU/GPU; plain order otherwise
        grid = mesh_utils.create_device_mesh(tuple(shape.values()), devices)
    except Exception:  # noqa: BLE001 - e.g. CPU or a device subset: fall back to the given order
        grid = np.asarray(devices, dtype=object).reshape(tuple(shape.values()))
    return Mesh(grid, MESH_AXES)


def logical_to_spec(axes: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh,
                    rules: Mapping[str, str | tuple[str, ...] | None] = LOGICAL_AXIS_RULES) -> P:
    """PartitionSpec of one array from its logical axis names.

    A rule names one mesh axis or a tuple of them (the dimension split over their product). A mesh axis is used at
    most once per array (first dimension wins), axes of size 1 are left out, and a dimension that the mesh axes'
    size does not divide stays replicated (e.g. 2 KV heads on a tensor axis of 4): always a valid layout, never an
    error.
    """
    used: set[str] = set()
    spec = []
    for name, size in zip(axes, shape):
        if name is not None and name not in rules:
            raise MeshError(f"logical axis {name!r} has no rule (known: {sorted(rules)})")
        rule = rules.get(name) if name is not None else None
        mesh_axes = tuple(a for a in ((rule,) if isinstance(rule, str) else rule or ()) if mesh.shape[a] > 1)
        if not mesh_axes or used.intersection(mesh_axes) or size % math.prod(mesh.shape[a] for a in mesh_axes):
            spec.append(None)
            continue
        used.update(mesh_axes)
        spec.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return P(*spec)


@dataclasses.dataclass(frozen=True)
class ActivationLayout:
    """The models' activation constraints on ``mesh`` by ``rules`` (see ``models.layers.activation_layout``)."""
    mesh: Mesh
    rules: Mapping[str, str | tuple[str, ...] | None] = dataclasses.field(default_factory=lambda: ACTIVATION_RULES)

    def constrain(self, x, axes: tuple[str | None, ...]):
        return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, logical_to_spec(axes, x.shape, self.mesh,
                                                                                            self.rules)))

    def map_token_shards(self, fn: Callable, tokens: tuple, shared):
        """``fn`` per batch shard (``jax.shard_map`` manual over the batch's mesh axes, the others left to the
        partitioner); one call when the tokens do not split evenly or the batch is not sharded."""
        spec = logical_to_spec(("batch",), (tokens[0].shape[0],), self.mesh, self.rules)
        if spec[0] is None:
            return fn(*tokens, shared)
        batch_axes = (spec[0],) if isinstance(spec[0], str) else spec[0]
        return jax.shard_map(fn, mesh=self.mesh, in_specs=(*(P(spec[0]) for _ in tokens), P()),
                             out_specs=P(spec[0]), axis_names=set(batch_axes), check_vma=False)(*tokens, shared)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: Mapping[str, str | tuple[str, ...] | None] = ACTIVATION_RULES):
    """Inside (entered in a jitted step's body, i.e. at trace time), the models' activation constraints pin each
    activation to ``mesh`` by ``rules`` and MoE layers dispatch each batch shard's tokens on its own devices. The
    abstract mesh is set as well, so jax's trace caches key on it."""
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), activation_layout(ActivationLayout(mesh, rules)):
        yield


def param_shardings(model: nnx.Module, mesh: Mesh, rules: Mapping[str, str | None] = LOGICAL_AXIS_RULES) -> dict:
    """NamedSharding for every parameter of ``model`` (pure-dict tree, as ``nnx.state(model, nnx.Param)``)."""
    state = nnx.state(model, nnx.Param)
    flat = {}
    for path, var in nnx.to_flat_state(state):
        axes = var.get_metadata().get("out_sharding")
        value = var.get_value()
        if axes is None:
            axes = (None,) * value.ndim
        flat[path] = NamedSharding(mesh, logical_to_spec(tuple(axes), tuple(value.shape), mesh, rules))
    return unflatten_paths(flat)


def unflatten_paths(flat: dict) -> dict:
    """{(key, ..., leaf_key): leaf} -> the nested dict tree those key paths describe."""
    tree: dict = {}
    for path, leaf in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = leaf
    return tree


def shard_params(params: dict, shardings: dict) -> dict:
    """Place a pure-dict parameter tree on the mesh (``jax.device_put`` per leaf)."""
    return jax.tree.map(jax.device_put, params, shardings)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Leading (batch) axis over (data, fsdp); other axes replicated."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def check_batch(batch_size: int, micro_batches: int, mesh: Mesh) -> None:
    """The global batch must split into ``micro_batches`` micro-batches, each divisible by data x fsdp."""
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch_size % micro_batches:
        raise MeshError(f"config.data.batch_size={batch_size} is not divisible by "
                        f"config.micro_batches={micro_batches}")
    if (batch_size // micro_batches) % shards:
        raise MeshError(f"config.data.batch_size={batch_size} / micro_batches={micro_batches} = "
                        f"{batch_size // micro_batches} sequences per micro-batch is not divisible by "
                        f"data x fsdp = {mesh.shape['data']} x {mesh.shape['fsdp']} = {shards}")
    if batch_size % jax.process_count():
        raise MeshError(f"config.data.batch_size={batch_size} is not divisible by the "
                        f"{jax.process_count()} processes")
