"""Distillation configs: ``base`` (every field and its default) and recipes built on it."""
