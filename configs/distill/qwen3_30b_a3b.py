"""docs/METHOD.md §11: Qwen3-30B-A3B teacher (bf16, expanded routing k'=16) -> converted dense student, FineWeb-Edu
packed to 2048, 384 sequences per step (4 x 24 accumulation x 4 devices in the reference run), WSD 100 / 300, lr 1e-4 ->
1e-5.

    m2d distill --config configs/distill/qwen3_30b_a3b.py --teacher /ckpt/Qwen3-30B-A3B --student /ckpt/student \
        --config.data.files="('/data/fineweb_edu_000.parquet',)" --config.workdir=runs/qwen3
"""

from ml_collections import ConfigDict

from m2d_jax.config_utils import load_config


def get_config() -> ConfigDict:
    config = load_config("distill/base")
    config.teacher.top_k = 16
    config.teacher.dtype = "bfloat16"
    config.student.compute_dtype = "bfloat16"
    config.student.remat = True
    config.data.files = ()
    config.micro_batches = 24
    config.workdir = "runs/qwen3_30b_a3b_distill"
    return config
