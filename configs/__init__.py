"""The shipped ml-collections configs (installed as the package ``m2d_jax.configs``; see m2d_jax/config_utils.py)."""
