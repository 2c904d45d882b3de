"""v5e-256: tpu-v5e chips (per-chip figures and their sources: configs/mesh/chips.py)."""

from ml_collections import ConfigDict

from m2d_jax.config_utils import load_config


def get_config() -> ConfigDict:
    return ConfigDict(dict(
        **load_config("mesh/chips")["tpu-v5e"],
        name="v5e-256",
        topology="v5e:16x16",  # jax.experimental.topologies.get_topology_desc(topology_name=...)
        chips=256,
        hosts=32,
        axes=dict(data=1, fsdp=-1, tensor=1, expert=1),  # m2d_jax.distill.sharding.make_mesh sizes; -1 = the rest
    ))
