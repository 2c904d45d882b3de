"""m2d_jax model checkpoints: Orbax params + a JSON record of the ModelConfig and provenance.

Layout of a checkpoint directory::

    m2d_model.json   {"format": ..., "config": ModelConfig, "metadata": {...}}
    params/          Orbax StandardCheckpointer tree (the nnx parameter state as a pure dict)

Saving writes to a temporary sibling directory and renames it when complete, so a crash never leaves a
half-written checkpoint under the target name. Restoring accepts a target sharding (abstract leaves carrying
``NamedSharding``), so the same checkpoint loads on one device or straight into a mesh.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp
from flax import nnx

from m2d_jax.artifacts import atomic_directory, is_primary_process
from m2d_jax.errors import CheckpointError
from m2d_jax.models import CausalLM, ModelConfig, abstract_model

FORMAT = "m2d_jax.model/1"
RECORD = "m2d_model.json"


def is_m2d_checkpoint(path: str | Path) -> bool:
    return (Path(path) / RECORD).exists()


def read_record(path: str | Path) -> dict:
    record_path = Path(path) / RECORD
    try:
        record = json.loads(record_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{record_path}: cannot read checkpoint record ({err})") from err
    if record.get("format") != FORMAT:
        raise CheckpointError(f"{record_path}: format {record.get('format')!r}, expected {FORMAT!r}")
    return record


def _params_tree(model: CausalLM) -> dict:
    return nnx.state(model, nnx.Param).to_pure_dict()


def save_model(model: CausalLM, out: str | Path, metadata: dict[str, Any] | None = None,
               overwrite: bool = False) -> Path:
    """Save ``model`` (params + config + metadata) as an m2d_jax checkpoint directory.

    Parameters may be sharded over a mesh; in a multi-process run every process calls this (see
    ``artifacts.atomic_write``) and writes its own shards."""

    def write(tmp: Path):
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(tmp / "params", _params_tree(model))
        checkpointer.wait_until_finished()
        if is_primary_process():
            record = {"format": FORMAT, "config": model.config.to_dict(), "metadata": metadata or {}}
            (tmp / RECORD).write_text(json.dumps(record, indent=2, sort_keys=True))

    return atomic_directory(out, write, overwrite)


def load_model(path: str | Path, dtype: str | None = None, sharding: Callable | None = None,
               **config_overrides) -> CausalLM:
    """Restore a model. ``dtype`` casts params (default: as saved); ``sharding(path, abstract) -> Sharding``
    places each leaf (default: the default device)."""
    record = read_record(path)
    config = ModelConfig.from_dict(record["config"])
    if dtype is not None:
        config = config.replace(dtype=dtype, compute_dtype=dtype)
    config = config.replace(**config_overrides) if config_overrides else config
    abs_model = abstract_model(config)
    graphdef, abs_state = nnx.split(abs_model)
    default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def target(kp, leaf):
        s = sharding(kp, leaf) if sharding is not None else default
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s)

    abstract_params = jax.tree_util.tree_map_with_path(target, abs_state.to_pure_dict())
    params = ocp.StandardCheckpointer().restore(Path(path).absolute() / "params", abstract_params)
    params = jax.tree.map(lambda a, t: a.astype(t.dtype) if a.dtype != t.dtype else a, params, abstract_params)
    nnx.replace_by_pure_dict(abs_state, params)
    return nnx.merge(graphdef, abs_state)


def load_metadata(path: str | Path) -> dict:
    return read_record(path).get("metadata", {})


__all__ = ["is_m2d_checkpoint", "load_metadata", "load_model", "read_record", "save_model"]
