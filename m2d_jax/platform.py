"""Which jax platforms m2d_jax runs on when the user did not say.

With libtpu installed (the ``tpu`` extra, for ``m2d plan``'s ahead-of-time TPU compiles) jax tries the TPU backend
at start-up even on a machine without a TPU: libtpu prints TPU_ACCELERATOR_TYPE / TPU_WORKER_HOSTNAMES errors, takes
its process lockfile and falls back to the CPU. ``choose_platforms`` (run on ``import m2d_jax``, before any
backend starts) sets ``jax_platforms`` to ``cpu`` when there is no accelerator on this machine — no TPU chip on the
PCI bus, no NVIDIA device — and the user set neither ``JAX_PLATFORMS`` nor ``jax_platforms``; otherwise it changes
nothing. Compile-only TPU topologies (``m2d plan``) do not need the TPU backend and still work.
"""

from __future__ import annotations

import os


def choose_platforms() -> str | None:
    """Set ``jax_platforms`` to ``cpu`` on a machine without an accelerator; returns what it set (or None)."""
    if os.environ.get("JAX_PLATFORMS"):
        return None
    import jax
    from jax._src import hardware_utils, xla_bridge

    if jax.config.jax_platforms or xla_bridge.backends_are_initialized():
        return None
    if hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0 or hardware_utils.has_visible_nvidia_gpu():
        return None
    jax.config.update("jax_platforms", "cpu")
    return "cpu"
