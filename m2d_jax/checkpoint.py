"""m2d_jax model checkpoints: Orbax params + a JSON record of the ModelConfig and provenance.

Layout of a checkpoint directory::

    m2d_model.json   {"format": ..., "config": ModelConfig, "metadata": {...}}
    params/          Orbax StandardCheckpointer tree (the nnx parameter state as a pure dict)

Saving writes to a temporary sibling directory and renames it when complete, so a crash never leaves a
half-written checkpoint under the target name. Restoring accepts a target sharding (abstract leaves carrying
``NamedSharding``), so the same checkpoint loads on one device or straight into a mesh.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp
from flax import nnx

from m2d_jax.errors import CheckpointError
from m2d_jax.models import CausalLM, ModelConfig, abstract_model

FORMAT = "m2d_jax.model/1"
RECORD = "m2d_model.json"


def file_sha256(path: str | Path) -> str:
    """sha256 of a file, read in 1 MiB blocks (provenance of configs and statistics in checkpoint metadata)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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


def ensure_new_output(*outs: str | Path | None, overwrite: bool = False) -> None:
    """Fail (before any work) if an output path already exists, unless ``overwrite``; None entries are skipped."""
    for out in outs:
        if out is not None and not overwrite and Path(out).exists():
            raise FileExistsError(f"{out} already exists; choose a new output path")


def is_primary_process() -> bool:
    """True on the process that writes shared single files (process 0; always True in a single-process run)."""
    return jax.process_index() == 0


def sync_processes(name: str) -> None:
    """Barrier across all processes of a multi-process run (no-op in a single-process run)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def atomic_directory(out: str | Path, write: Callable[[Path], None], overwrite: bool = False) -> Path:
    """Run ``write(tmp_dir)`` and rename ``tmp_dir`` to ``out`` only if it succeeds.

    In a multi-process run this is collective: every process calls it with the same ``out``, ``write`` runs on every
    process with the same ``tmp_dir`` (collective writers such as Orbax coordinate their shards; single files must be
    written by ``is_primary_process()`` only), and process 0 renames once every process has finished writing.
    """
    out = Path(out).absolute()
    ensure_new_output(out, overwrite=overwrite)
    if jax.process_count() > 1:
        return _atomic_directory_collective(out, write)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        write(tmp)
        _replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _replace(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``. An existing ``out`` is renamed aside first and deleted last, so a crash leaves the
    old or the new directory under ``out`` (or, between the renames, none), never a partly deleted one."""
    if not out.exists():
        os.rename(tmp, out)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.rename(out, aside / out.name)
    os.rename(tmp, out)
    shutil.rmtree(aside)


def _atomic_directory_collective(out: Path, write: Callable[[Path], None]) -> Path:
    tmp = out.parent / f".{out.name}.tmp-collective"  # the same path on every process
    if is_primary_process():
        shutil.rmtree(tmp, ignore_errors=True)  # a stale one from a crashed run
        tmp.mkdir(parents=True)
    sync_processes(f"m2d_atomic_start:{out}")
    try:
        write(tmp)
        sync_processes(f"m2d_atomic_written:{out}")
        if is_primary_process():
            _replace(tmp, out)
    finally:
        if is_primary_process() and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    sync_processes(f"m2d_atomic_done:{out}")  # nobody reads ``out`` before it exists
    return out


def _params_tree(model: CausalLM) -> dict:
    return nnx.state(model, nnx.Param).to_pure_dict()


def save_model(model: CausalLM, out: str | Path, metadata: dict[str, Any] | None = None,
               overwrite: bool = False) -> Path:
    """Save ``model`` (params + config + metadata) as an m2d_jax checkpoint directory.

    Parameters may be sharded over a mesh; in a multi-process run every process calls this (see ``atomic_directory``)
    and writes its own shards."""

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


__all__ = ["atomic_directory", "is_m2d_checkpoint", "is_primary_process", "load_metadata", "load_model", "read_record",
           "save_model", "sync_processes"]
