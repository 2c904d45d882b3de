"""v4-32: Cloud TPU v4 (docs: 275 TFLOP/s bf16, 32 GiB HBM2 at 1200 GB/s per chip). Each chip has 2 TensorCores, run as
one megacore device; the accelerator type counts TensorCores (v4-N has N/2 chips), 4 chips per host. ICI taken as 300
GB/s per chip per direction (6 links; not in the Cloud docs table: unverified)."""

from ml_collections import ConfigDict


def get_config() -> ConfigDict:
    return ConfigDict(dict(
        name="v4-32",
        platform="tpu",
        topology="v4:2x2x4",  # jax.experimental.topologies.get_topology_desc(topology_name=...)
        topology_options=dict(chip_config_name="megacore"),
        chips=16,
        hosts=4,
        hbm_bytes_per_chip=32 * 2**30,
        peak_bf16_flops_per_chip=275e12,
        hbm_bandwidth=1200e9,  # bytes/s per chip
        ici_bandwidth=300e9,  # bytes/s per chip, one direction (ICI)
        dcn_bandwidth=0e9,  # bytes/s per chip between hosts (unused within one slice)
        axes=dict(data=1, fsdp=-1, tensor=1, expert=1),  # m2d_jax.distill.sharding.make_mesh sizes; -1 = the rest
    ))
