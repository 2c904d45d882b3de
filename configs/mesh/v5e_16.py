"""v5e-16: Cloud TPU v5e (docs: 197 TFLOP/s bf16, 16 GiB HBM2 at 819 GB/s, ICI 400 GB/s bidirectional per chip). One
TensorCore per chip: v5e-N has N chips, 8 per host."""

from ml_collections import ConfigDict


def get_config() -> ConfigDict:
    return ConfigDict(dict(
        name="v5e-16",
        platform="tpu",
        topology="v5e:4x4",  # jax.experimental.topologies.get_topology_desc(topology_name=...)
        topology_options=dict(),
        chips=16,
        hosts=2,
        hbm_bytes_per_chip=16 * 2**30,
        peak_bf16_flops_per_chip=197e12,
        hbm_bandwidth=819e9,  # bytes/s per chip
        ici_bandwidth=200e9,  # bytes/s per chip, one direction (ICI)
        dcn_bandwidth=0e9,  # bytes/s per chip between hosts (unused within one slice)
        axes=dict(data=1, fsdp=-1, tensor=1, expert=1),  # m2d_jax.distill.sharding.make_mesh sizes; -1 = the rest
    ))
