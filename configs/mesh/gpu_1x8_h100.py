"""gpu-1x8-h100: h100 chips (per-chip figures and their sources: configs/mesh/chips.py)."""

from ml_collections import ConfigDict

from m2d_jax.config_utils import load_config


def get_config() -> ConfigDict:
    return ConfigDict(dict(
        **load_config("mesh/chips")["h100"],
        name="gpu-1x8-h100",
        topology="1x8",  # nodes x GPUs per node (no compile target here: analytic plans)
        chips=8,
        hosts=1,
        axes=dict(data=1, fsdp=-1, tensor=1, expert=1),  # m2d_jax.distill.sharding.make_mesh sizes; -1 = the rest
    ))
