"""gpu-1x8-h200: NVIDIA H200 SXM node (989 TFLOP/s dense bf16, 141 GB HBM3e at 4.8 TB/s, NVLink 900 GB/s bidirectional
per GPU), 8 GPUs."""

from ml_collections import ConfigDict


def get_config() -> ConfigDict:
    return ConfigDict(dict(
        name="gpu-1x8-h200",
        platform="gpu",
        topology="1x8",  # nodes x GPUs per node (no compile target here: analytic plans)
        topology_options=dict(),
        chips=8,
        hosts=1,
        hbm_bytes_per_chip=141_000_000_000,
        peak_bf16_flops_per_chip=989e12,
        hbm_bandwidth=4800e9,  # bytes/s per chip
        ici_bandwidth=450e9,  # bytes/s per chip, one direction (NVLink)
        dcn_bandwidth=50e9,  # bytes/s per chip between hosts (InfiniBand, 400 Gb/s per GPU)
        axes=dict(data=1, fsdp=-1, tensor=1, expert=1),  # m2d_jax.distill.sharding.make_mesh sizes; -1 = the rest
    ))
