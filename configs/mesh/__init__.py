"""Mesh configs: one file per TPU slice or GPU pod (``m2d_jax.mesh.load_mesh_config``)."""
