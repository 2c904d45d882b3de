"""HF checkpoints: streaming safetensors I/O, family adapters, and the bidirectional key map."""

from m2d_jax.hf.load import hf_model_config, hf_tensors, load_hf, read_hf_config
from m2d_jax.hf.safetensors_io import CheckpointError, SafetensorsCheckpoint

__all__ = ["CheckpointError", "SafetensorsCheckpoint", "hf_model_config", "hf_tensors", "load_hf",
           "read_hf_config"]
