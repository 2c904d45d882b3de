"""m2d_jax: Mixture-of-Experts -> dense conversion and distillation in JAX/Flax."""

__version__ = "0.1.0"

from m2d_jax.platform import choose_platforms  # noqa: E402

choose_platforms()  # before any jax backend starts: no TPU probing on a machine without an accelerator

from m2d_jax.api import from_pretrained  # noqa: E402

__all__ = ["from_pretrained", "__version__"]
