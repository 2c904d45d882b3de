"""v4-8: tpu-v4 chips (per-chip figures and their sources: configs/mesh/chips.py)."""

from ml_collections import ConfigDict

from m2d_jax.config_utils import load_config


def get_config() -> ConfigDict:
    return ConfigDict(dict(
        **load_config("mesh/chips")["tpu-v4"],
        name="v4-8",
        topology="v4:2x2x1",  # jax.experimental.topologies.get_topology_desc(topology_name=...)
        chips=4,
        hosts=1,
        axes=dict(data=1, fsdp=-1, tensor=1, expert=1),  # m2d_jax.distill.sharding.make_mesh sizes; -1 = the rest
    ))
