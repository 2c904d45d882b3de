"""gpu-1x8-h100: NVIDIA H100 SXM nodes (989 TFLOP/s dense bf16, 80 GB HBM3 at 3.35 TB/s, NVLink 900 GB/s bidirectional
per GPU), 8 GPUs per node, 400 Gb/s InfiniBand per GPU between nodes."""

from ml_collections import ConfigDict


def get_config() -> ConfigDict:
    return ConfigDict(dict(
        name="gpu-1x8-h100",
        platform="gpu",
        topology="1x8",  # nodes x GPUs per node (no compile target here: analytic plans)
        topology_options=dict(),
        chips=8,
        hosts=1,
        hbm_bytes_per_chip=80_000_000_000,
        peak_bf16_flops_per_chip=989e12,
        hbm_bandwidth=3350e9,  # bytes/s per chip
        ici_bandwidth=450e9,  # bytes/s per chip, one direction (NVLink)
        dcn_bandwidth=50e9,  # bytes/s per chip between hosts (InfiniBand, 400 Gb/s per GPU)
        axes=dict(data=1, fsdp=-1, tensor=1, expert=1),  # m2d_jax.distill.sharding.make_mesh sizes; -1 = the rest
    ))
