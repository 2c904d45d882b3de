"""Package layout only (everything else is in pyproject.toml): ship the top-level ``configs/`` inside the package as
``m2d_jax.configs`` — pyproject's package discovery cannot both find ``m2d_jax*`` and map another directory."""

from setuptools import find_packages, setup

setup(packages=find_packages(include=["m2d_jax*"]) + ["m2d_jax." + p for p in find_packages(include=["configs*"])],
      package_dir={"m2d_jax.configs": "configs"})
