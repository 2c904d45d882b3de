"""m2d_jax model checkpoints: Orbax params + a JSON record of the ModelConfig and provenance.

Layout of a checkpoint directory::

    m2d_model.json   {"format": ..., "config": ModelConfig (nested), "param_dtype": ..., "metadata": {...}}
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
from m2d_jax.models import CausalLM, ModelConfig, RuntimeConfig, abstract_model, load_runtime

FORMAT = "m2d_jax.model/2"  # /2: nested architecture config + param_dtype (/1 held one flat config with runtime fields)
RECORD = "m2d_model.json"


def is_m2d_checkpoint(path: str | Path) -> bool:
    return (Path(path) / RECORD).exists()


def read_record(path: str | Path) -> dict:
    record_path = Path(path) / RECORD
    try:
        record = json.loads(record_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{record_path}: cannot read checkpoint record ({err})") from err
    found = record.get("format")
    if isinstance(found, str) and found.startswith("m2d_jax.model/") and found != FORMAT:
        raise CheckpointError(f"{record_path}: format {found!r} was written by an older m2d_jax version (this one "
                              f"reads {FORMAT!r}); re-create the checkpoint with this version (m2d import / m2d "
                              f"convert from its HF checkpoint, or m2d export with the old version first)")
    if found != FORMAT:
        raise CheckpointError(f"{record_path}: format {found!r}, expected {FORMAT!r}")
    return record


def read_config(path: str | Path) -> tuple[ModelConfig, str]:
    """The architecture and the stored parameter dtype of an m2d_jax checkpoint (reads the record only)."""
    record = read_record(path)
    try:
        return ModelConfig.from_dict(record["config"]), RuntimeConfig(param_dtype=record["param_dtype"]).param_dtype
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{Path(path) / RECORD}: invalid model record ({err})") from err


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
            record = {"format": FORMAT, "config": model.config.to_dict(), "param_dtype": model.runtime.param_dtype,
                      "metadata": metadata or {}}
            (tmp / RECORD).write_text(json.dumps(record, indent=2, sort_keys=True))

    return atomic_directory(out, write, overwrite)


def load_model(path: str | Path, *, dtype: str | None = None, progress: bool = True, sharding: Callable | None = None,
               runtime: RuntimeConfig | None = None, **runtime_fields) -> CausalLM:
    """Restore a model; the loader flags are those of every loader (``m2d_jax.from_pretrained``).

    ``dtype`` casts params and sets the compute dtype (default: as saved); ``runtime`` or runtime field keywords
    choose how the model runs (``load_runtime``); ``sharding(path, abstract) -> Sharding`` places each leaf (``path``
    a tuple of keys such as ``("stacks", 0, "moe", "gate_proj")``; default: the default device), so a checkpoint
    restores straight into a mesh layout; ``progress`` shows a progress bar.
    """
    from tqdm.auto import tqdm

    config, stored_dtype = read_config(path)
    runtime = load_runtime(stored_dtype, dtype, runtime, **runtime_fields)
    graphdef, abs_state = nnx.split(abstract_model(config, runtime))
    default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def target(kp, leaf):
        keys = tuple(getattr(k, "key", getattr(k, "idx", k)) for k in kp)
        s = sharding(keys, leaf) if sharding is not None else default
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s)

    abstract_params = jax.tree_util.tree_map_with_path(target, abs_state.to_pure_dict())
    total_bytes = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(abstract_params))
    with tqdm(total=total_bytes, unit="B", unit_scale=True, desc=f"restore {Path(path).name}",
              disable=not progress) as bar:
        params = ocp.StandardCheckpointer().restore(Path(path).absolute() / "params", abstract_params)
        bar.update(total_bytes)
    params = jax.tree.map(lambda a, t: a.astype(t.dtype) if a.dtype != t.dtype else a, params, abstract_params)
    nnx.replace_by_pure_dict(abs_state, params)
    return nnx.merge(graphdef, abs_state)


def load_metadata(path: str | Path) -> dict:
    return read_record(path).get("metadata", {})


__all__ = ["is_m2d_checkpoint", "load_metadata", "load_model", "read_config", "read_record", "save_model"]
