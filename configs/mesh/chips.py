"""The accelerator chips the mesh configs are built from: per-chip HBM, peak bf16 FLOP/s and bandwidths (bytes/s
per chip; ICI / NVLink one direction), with the public figures they come from."""

from ml_collections import ConfigDict


def get_config() -> ConfigDict:
    return ConfigDict({
        # Cloud TPU v4 (docs: 275 TFLOP/s bf16, 32 GiB HBM2 at 1200 GB/s per chip). Each chip has 2 TensorCores, run as
        # one megacore device; the accelerator type counts TensorCores (v4-N has N/2 chips), 4 chips per host. ICI taken
        # as 300 GB/s per chip per direction (6 links; not in the Cloud docs table: unverified).
        "tpu-v4": dict(
            platform="tpu",
            topology_options=dict(chip_config_name="megacore"),
            hbm_bytes_per_chip=32 * 2**30,
            peak_bf16_flops_per_chip=275e12,
            hbm_bandwidth=1200e9,
            ici_bandwidth=300e9,
            dcn_bandwidth=0.0,
        ),
        # Cloud TPU v5e (docs: 197 TFLOP/s bf16, 16 GiB HBM2 at 819 GB/s, ICI 400 GB/s bidirectional per chip). One
        # TensorCore per chip: v5e-N has N chips, 8 per host.
        "tpu-v5e": dict(
            platform="tpu",
            topology_options=dict(),
            hbm_bytes_per_chip=16 * 2**30,
            peak_bf16_flops_per_chip=197e12,
            hbm_bandwidth=819e9,
            ici_bandwidth=200e9,
            dcn_bandwidth=0.0,
        ),
        # Cloud TPU v5p (docs: 459 TFLOP/s bf16, 95 GB HBM2e at 2765 GB/s, ICI 4800 Gb/s per chip). Each chip has 2
        # TensorCores, one megacore device; the accelerator type counts TensorCores (v5p-N has N/2 chips), 4 chips per
        # host.
        "tpu-v5p": dict(
            platform="tpu",
            topology_options=dict(),
            hbm_bytes_per_chip=95_000_000_000,
            peak_bf16_flops_per_chip=459e12,
            hbm_bandwidth=2765e9,
            ici_bandwidth=300e9,
            dcn_bandwidth=0.0,
        ),
        # Cloud TPU v6e / Trillium (docs: 918 TFLOP/s bf16, 32 GB HBM at 1638 GB/s, ICI 800 GB/s bidirectional per
        # chip). One TensorCore per chip: v6e-N has N chips, 8 per host.
        "tpu-v6e": dict(
            platform="tpu",
            topology_options=dict(),
            hbm_bytes_per_chip=32_000_000_000,
            peak_bf16_flops_per_chip=918e12,
            hbm_bandwidth=1638e9,
            ici_bandwidth=400e9,
            dcn_bandwidth=0.0,
        ),
        # NVIDIA H100 SXM nodes (989 TFLOP/s dense bf16, 80 GB HBM3 at 3.35 TB/s, NVLink 900 GB/s bidirectional per
        # GPU), 8 GPUs per node, 400 Gb/s InfiniBand per GPU between nodes.
        "h100": dict(
            platform="gpu",
            topology_options=dict(),
            hbm_bytes_per_chip=80_000_000_000,
            peak_bf16_flops_per_chip=989e12,
            hbm_bandwidth=3350e9,
            ici_bandwidth=450e9,
            dcn_bandwidth=50e9,
        ),
        # NVIDIA H200 SXM node (989 TFLOP/s dense bf16, 141 GB HBM3e at 4.8 TB/s, NVLink 900 GB/s bidirectional per
        # GPU), 8 GPUs.
        "h200": dict(
            platform="gpu",
            topology_options=dict(),
            hbm_bytes_per_chip=141_000_000_000,
            peak_bf16_flops_per_chip=989e12,
            hbm_bandwidth=4800e9,
            ici_bandwidth=450e9,
            dcn_bandwidth=50e9,
        ),
    })
