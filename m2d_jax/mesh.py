"""Mesh configs (``configs/mesh/*.py``): a TPU slice or GPU pod as data — its topology, chips, hosts, per-chip HBM,
peak bf16 FLOP/s and bandwidths, and the default (data, fsdp, tensor, expert) axis sizes of
``m2d_jax.distill.sharding.make_mesh``. The same file sets the mesh of ``m2d distill`` / ``calibrate`` / ``eval`` and
is the target of ``m2d plan``.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from m2d_jax.distill.sharding import MESH_AXES, mesh_shape
from m2d_jax.errors import MeshError

PLATFORMS = ("tpu", "gpu")


@dataclasses.dataclass(frozen=True)
class MeshSpec:
    """One mesh config. Bandwidths are bytes/s per chip (ICI / NVLink one direction; DCN / InfiniBand between
    hosts); ``axes`` are the default mesh axis sizes (-1 = the rest of the chips)."""
    name: str
    platform: str
    topology: str
    chips: int
    hosts: int
    hbm_bytes_per_chip: int
    peak_bf16_flops_per_chip: float
    hbm_bandwidth: float
    ici_bandwidth: float
    dcn_bandwidth: float
    axes: dict
    topology_options: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.platform not in PLATFORMS:
            raise MeshError(f"mesh config {self.name}: platform={self.platform!r}, expected one of {PLATFORMS}")
        for field in ("chips", "hosts", "hbm_bytes_per_chip", "peak_bf16_flops_per_chip", "hbm_bandwidth",
                      "ici_bandwidth"):
            if not getattr(self, field) > 0:
                raise MeshError(f"mesh config {self.name}: {field} must be > 0, got {getattr(self, field)!r}")
        mesh_shape(self.axes, self.chips)  # the axes must fit the chips

    def axis_sizes(self, **overrides: int) -> dict[str, int]:
        """The resolved (data, fsdp, tensor, expert) sizes over the chips, with ``overrides`` (None = keep)."""
        unknown = sorted(set(overrides) - set(MESH_AXES))
        if unknown:
            raise MeshError(f"unknown mesh axes {unknown}; expected {MESH_AXES}")
        sizes = {**self.axes, **{k: v for k, v in overrides.items() if v is not None}}
        return mesh_shape(sizes, self.chips)

    def configure_distill(self, config) -> None:
        """Set a distillation config's mesh axes and MFU peak from this mesh (``m2d distill --mesh``)."""
        config.mesh.update({k: int(v) for k, v in self.axes.items()})
        if not config.logging.peak_flops_per_device:
            config.logging.peak_flops_per_device = float(self.peak_bf16_flops_per_chip)

    def running_mesh_sizes(self, devices=None) -> dict[str, int]:
        """The axis sizes for a running stage (``m2d calibrate / eval --mesh``): the config must describe the
        devices this job sees."""
        import jax

        count = len(jax.devices() if devices is None else devices)
        if count != self.chips:
            raise MeshError(f"--mesh {self.name}: the config has {self.chips} chips, this job sees {count} devices")
        return self.axis_sizes()

    def topology_devices(self) -> list:
        """Compile-only devices of the TPU topology (``jax.experimental.topologies``; needs libtpu, no TPU)."""
        if self.platform != "tpu":
            raise MeshError(f"mesh {self.name}: no compile target for platform {self.platform!r} without its "
                            f"devices (GPU plans are analytic)")
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compile-only: other processes may hold libtpu
        from jax.experimental import topologies

        try:
            topo = topologies.get_topology_desc(topology_name=self.topology, platform="tpu",
                                                **self.topology_options)
        except Exception as err:  # noqa: BLE001 - libtpu missing or the name unknown: one line naming the mesh
            raise MeshError(f"mesh {self.name}: cannot describe TPU topology {self.topology!r} "
                            f"(is libtpu installed? pip install -e '.[tpu]'): {err}") from err
        devices = list(topo.devices)
        if len(devices) != self.chips:
            raise MeshError(f"mesh {self.name}: topology {self.topology!r} has {len(devices)} devices, the config "
                            f"says chips={self.chips}")
        return devices


def mesh_config_dir() -> Path:
    from m2d_jax.config_utils import config_dir

    return config_dir() / "mesh"


def mesh_names() -> list[str]:
    return sorted(p.stem.replace("_", "-") for p in mesh_config_dir().glob("*.py") if p.stem not in ("__init__", "chips"))


def load_mesh_config(name: str) -> MeshSpec:
    """A mesh config by name (``v5p-64``, ``gpu-2x8-h100``; ``-`` or ``_``) or by path to a config file."""
    from m2d_jax.config_utils import load_config

    path = Path(name)
    if not path.is_file():
        path = mesh_config_dir() / (name.replace("-", "_").lower() + ".py")
        if not path.is_file():
            raise MeshError(f"unknown mesh {name!r}: no {path} (known: {', '.join(mesh_names())})")
    config = load_config(path).to_dict()
    fields = {f.name for f in dataclasses.fields(MeshSpec)}
    unknown, missing = sorted(set(config) - fields), sorted(f for f in fields - set(config) if f != "topology_options")
    if unknown or missing:
        raise MeshError(f"{path}: unknown fields {unknown}, missing fields {missing}")
    return MeshSpec(**config)


__all__ = ["MeshSpec", "PLATFORMS", "load_mesh_config", "mesh_names"]
