"""v6e-64: Cloud TPU v6e / Trillium (docs: 918 TFLOP/s bf16, 32 GB HBM at 1638 GB/s, ICI 800 GB/s bidirectional per
chip). One TensorCore per chip: v6e-N has N chips, 8 per host."""

from ml_collections import ConfigDict


def get_config() -> ConfigDict:
    return ConfigDict(dict(
        name="v6e-64",
        platform="tpu",
        topology="v6e:8x8",  # jax.experimental.topologies.get_topology_desc(topology_name=...)
        topology_options=dict(),
        chips=64,
        hosts=8,
        hbm_bytes_per_chip=32_000_000_000,
        peak_bf16_flops_per_chip=918e12,
        hbm_bandwidth=1638e9,  # bytes/s per chip
        ici_bandwidth=400e9,  # bytes/s per chip, one direction (ICI)
        dcn_bandwidth=0e9,  # bytes/s per chip between hosts (unused within one slice)
        axes=dict(data=1, fsdp=-1, tensor=1, expert=1),  # m2d_jax.distill.sharding.make_mesh sizes; -1 = the rest
    ))
