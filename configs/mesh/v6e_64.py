"""v6e-64: tpu-v6e chips (per-chip figures and their sources: configs/mesh/chips.py)."""

from ml_collections import ConfigDict

from m2d_jax.config_utils import load_config


def get_config() -> ConfigDict:
    return ConfigDict(dict(
        **load_config("mesh/chips")["tpu-v6e"],
        name="v6e-64",
        topology="v6e:8x8",  # jax.experimental.topologies.get_topology_desc(topology_name=...)
        chips=64,
        hosts=8,
        axes=dict(data=1, fsdp=-1, tensor=1, expert=1),  # m2d_jax.distill.sharding.make_mesh sizes; -1 = the rest
    ))
