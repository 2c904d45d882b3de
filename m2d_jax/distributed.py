"""Multi-host runs: starting ``jax.distributed`` the same way in every entry point, and arrays back on the host.

``initialize_distributed()`` is the first thing every ``m2d`` command that touches devices does. It starts the
distributed runtime when the process is one of several, and does nothing for a single process:

- ``JAX_COORDINATOR_ADDRESS`` (host:port of process 0), ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``: any of them
  set means an explicit launch (a GPU pod without SLURM, or localhost); all three must then be set (jax 0.10 reads
  ``JAX_COORDINATOR_ADDRESS`` itself but not the other two, so they are passed here);
- an ``srun`` step of more than one task (``SLURM_STEP_NODELIST`` and ``SLURM_PROCID`` set, ``SLURM_NTASKS`` > 1):
  jax's own SLURM detection (coordinator = the step's first node, process id = ``SLURM_PROCID``, and one device per
  task, ``SLURM_LOCALID``; for one process per host owning all its GPUs set the three variables above instead);
- a Cloud TPU VM (TPU chips on this machine's PCI bus, ``TPU_WORKER_HOSTNAMES`` listing several hosts, or
  ``MEGASCALE_COORDINATOR_ADDRESS`` set): jax's own TPU detection (from the VM's metadata; one process on a
  single-host slice);
- otherwise (no variables, one host): nothing, one process.

On CPU the cross-process collectives are gloo's (``jax_cpu_collectives_implementation``), set before the backend
starts. After it, ``jax.process_index()`` / ``jax.process_count()`` and ``jax.devices()`` (all processes' devices)
describe the whole run; only process 0 writes single files (``m2d_jax.artifacts``).

The stages that run a model over data (calibration, perplexity; distillation has its own loop) take a mesh
(``stage_mesh``): the model is imported straight into its sharded layout, and each batch is one global array whose
rows each process places from its own share (``global_batch``), so reductions over the batch (calibration sums, the
NLL) are all-reduced over the mesh inside the jitted step and every process ends with the same result. Their jitted
steps are traced under ``traced_on(mesh)`` (the distillation step's activation sharding), so no device holds a
whole batch's activations.
"""

from __future__ import annotations

import contextlib
import logging
import os

import jax
import numpy as np

from m2d_jax.errors import MeshError

log = logging.getLogger(__name__)

ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"


def _int_env(name: str) -> int:
    value = os.environ[name]
    try:
        return int(value)
    except ValueError:
        raise MeshError(f"environment variable {name}={value!r}: expected an integer") from None


def tpu_chips() -> int:
    """TPU chips attached to this machine (PCI), without starting any backend."""
    from jax._src import hardware_utils  # jax's own probe, the one its TPU initialisation uses

    return hardware_utils.num_available_tpu_chips_and_device_id()[0]


def launch_kind(environ=os.environ, chips: int | None = None) -> str | None:
    """How this process was launched: "env" (the JAX_* variables), "slurm" (a multi-task SLURM step), "tpu" (a
    Cloud TPU VM; ``chips``: its TPU chips, default probed), or None (one process)."""
    if any(environ.get(k) for k in (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID)):
        return "env"
    if "SLURM_STEP_NODELIST" in environ and "SLURM_PROCID" in environ and int(environ.get("SLURM_NTASKS") or 1) > 1:
        return "slurm"
    hosts = [h for h in environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    if len(hosts) > 1 or environ.get("MEGASCALE_COORDINATOR_ADDRESS") or (tpu_chips() if chips is None else chips):
        return "tpu"
    return None


def initialize_distributed(initialization_timeout: int = 300) -> bool:
    """Start ``jax.distributed`` if this process is one of several (see the module docstring); returns whether the
    run is multi-process. Call it before anything touches a device; calling it again is a no-op."""
    if jax.distributed.is_initialized():
        return jax.process_count() > 1
    kind = launch_kind()
    if kind is None:
        return False
    explicit = {}  # jax's own cluster detection (SLURM, Cloud TPU) fills in what is not given
    if kind == "env":
        missing = [k for k in (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID) if not os.environ.get(k)]
        if missing:
            raise MeshError(f"environment: {', '.join(missing)} not set; a multi-process launch needs "
                            f"{ENV_COORDINATOR} (host:port of process 0), {ENV_NUM_PROCESSES} and {ENV_PROCESS_ID}")
        num_processes, process_id = _int_env(ENV_NUM_PROCESSES), _int_env(ENV_PROCESS_ID)
        if not 0 <= process_id < num_processes:
            raise MeshError(f"environment: {ENV_PROCESS_ID}={process_id} is not in [0, "
                            f"{ENV_NUM_PROCESSES}={num_processes})")
        if num_processes == 1:
            return False
        explicit = dict(coordinator_address=os.environ[ENV_COORDINATOR], num_processes=num_processes,
                        process_id=process_id)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU devices' cross-process collectives
    jax.distributed.initialize(**explicit, initialization_timeout=initialization_timeout)
    log.info("jax.distributed (%s): process %d of %d, %d local of %d devices", kind, jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())
    return jax.process_count() > 1


def stage_mesh(mesh=None, devices=None):
    """The mesh a calibration / evaluation stage runs on: ``mesh`` itself (a ``jax.sharding.Mesh``, or axis sizes
    for ``m2d_jax.distill.sharding.make_mesh`` over ``devices``); without one, in a multi-process run, every device
    on the ``fsdp`` axis (parameters and batch split over all of them); else None (one device, no mesh)."""
    from jax.sharding import Mesh

    from m2d_jax.distill.sharding import make_mesh

    if isinstance(mesh, Mesh):
        return mesh
    if mesh is not None:
        return make_mesh(dict(mesh), devices)
    return make_mesh({"fsdp": -1}, devices) if jax.process_count() > 1 else None


def traced_on(mesh):
    """The context a stage's jitted step is traced in: ``distill.sharding.activation_sharding(mesh)`` (activations
    keep the batch sharded over the mesh's batch axes, docs/METHOD.md §11), or nothing without a mesh."""
    if mesh is None:
        return contextlib.nullcontext()
    from m2d_jax.distill.sharding import activation_sharding

    return activation_sharding(mesh)


def host_to_devices(x: np.ndarray, sharding) -> jax.Array:
    """``x`` (the same on every process) as one array under ``sharding``: each process places only the slices its
    own devices hold."""
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def global_batch(rows: np.ndarray, mesh, field: str = "batch_size") -> jax.Array:
    """``rows`` [batch, ...] (the same on every process) as one array sharded over the mesh's batch axes; each
    process places only the rows its devices hold. ``field`` names the option a bad batch size comes from."""
    from m2d_jax.distill.sharding import BATCH_AXES, batch_sharding

    shards = int(np.prod([mesh.shape[a] for a in BATCH_AXES]))
    if rows.shape[0] % shards:
        raise MeshError(f"{field}={rows.shape[0]} is not divisible by the mesh's "
                        f"{' x '.join(BATCH_AXES)} = {shards} batch shards")
    return host_to_devices(rows, batch_sharding(mesh, rows.ndim))


def device_rows(rows, mesh=None, dtype=None, field: str = "batch_size") -> jax.Array:
    """Host rows [batch, ...] (as ``dtype``) on the devices: split over ``mesh``'s batch axes (``global_batch``), or
    on the default device without a mesh; an array already on the devices is returned as is."""
    if isinstance(rows, jax.Array):
        return rows
    rows = np.asarray(rows, dtype)
    return jax.numpy.asarray(rows) if mesh is None else global_batch(rows, mesh, field)


def place_model(model, mesh):
    """``model`` (every process holding the same parameters whole, e.g. a student built on the host by
    ``m2d convert``) with its parameters placed on ``mesh`` by the sharding rules, each process placing only the
    slices its devices hold: the layout a collective write (Orbax) or a sharded forward needs. Returns ``model``."""
    from flax import nnx

    from m2d_jax.distill.sharding import param_shardings

    state = nnx.state(model, nnx.Param)
    host = jax.tree.map(np.asarray, state.to_pure_dict())
    nnx.replace_by_pure_dict(state, jax.tree.map(host_to_devices, host, param_shardings(model, mesh)))
    nnx.update(model, state)
    return model


def replicated_rows(rows: np.ndarray, mesh) -> jax.Array:
    """``rows`` (the same on every process) as one array replicated on every device of ``mesh``."""
    from m2d_jax.distill.sharding import replicated

    return host_to_devices(np.asarray(rows), replicated(mesh))


def to_host(x) -> np.ndarray:
    """A (possibly multi-host sharded) array as a NumPy array on every process (a collective when it spans
    processes: every process must call it)."""
    if jax.process_count() > 1 and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


__all__ = ["device_rows", "global_batch", "initialize_distributed", "launch_kind", "place_model", "replicated_rows",
           "stage_mesh", "to_host", "traced_on"]
