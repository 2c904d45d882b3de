"""``python -m m2d_jax.eval ARGS``: lm-eval's own command line (``lm_eval ARGS``) with the "m2d" backend registered."""

import m2d_jax.eval.lm_eval_backend  # noqa: F401  (registers "m2d")
from lm_eval.__main__ import cli_evaluate

from m2d_jax.distributed import initialize_distributed

if __name__ == "__main__":
    initialize_distributed()
    cli_evaluate()
