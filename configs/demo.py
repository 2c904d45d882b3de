"""``m2d demo``: the end-to-end job on an embedded tiny teacher. Override any field: ``--config.seed=1``."""

from ml_collections import ConfigDict

from m2d_jax.config_utils import load_config


def get_config() -> ConfigDict:
    return ConfigDict(dict(
        teacher=load_config("models/qwen3_moe_tiny"),
        seed=0,
        batch_size=2,
        seq_len=48,
        workdir="",  # empty: a temporary directory, removed at the end
    ))
