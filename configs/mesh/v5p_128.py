"""v5p-128: Cloud TPU v5p (docs: 459 TFLOP/s bf16, 95 GB HBM2e at 2765 GB/s, ICI 4800 Gb/s per chip). Each chip has 2
TensorCores, one megacore device; the accelerator type counts TensorCores (v5p-N has N/2 chips), 4 chips per host."""

from ml_collections import ConfigDict


def get_config() -> ConfigDict:
    return ConfigDict(dict(
        name="v5p-128",
        platform="tpu",
        topology="v5p:4x4x4",  # jax.experimental.topologies.get_topology_desc(topology_name=...)
        topology_options=dict(),
        chips=64,
        hosts=16,
        hbm_bytes_per_chip=95_000_000_000,
        peak_bf16_flops_per_chip=459e12,
        hbm_bandwidth=2765e9,  # bytes/s per chip
        ici_bandwidth=300e9,  # bytes/s per chip, one direction (ICI)
        dcn_bandwidth=0e9,  # bytes/s per chip between hosts (unused within one slice)
        axes=dict(data=1, fsdp=-1, tensor=1, expert=1),  # m2d_jax.distill.sharding.make_mesh sizes; -1 = the rest
    ))
