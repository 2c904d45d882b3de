"""ml-collections configs shipped with the package, with ``--config.a.b=value`` command-line overrides.

The configs live in the repository's top-level ``configs/`` directory; the build maps it into the package as
``m2d_jax.configs`` (``setup.py``), so a wheel ships them and an editable install maps them.
"""

from __future__ import annotations

import ast
import importlib.resources
import importlib.util
from pathlib import Path

from ml_collections import ConfigDict

_CHECKOUT = Path(__file__).resolve().parents[1]  # the repository root when m2d_jax is imported from a checkout


def config_dir() -> Path:
    """The directory of the shipped configs: a source checkout's own ``configs/`` when m2d_jax is imported from one
    (so a checkout run from its own directory never reads another install's configs), else the installed package
    ``m2d_jax.configs``."""
    if (_CHECKOUT / "pyproject.toml").is_file() and (_CHECKOUT / "configs" / "__init__.py").is_file():
        return _CHECKOUT / "configs"
    return Path(str(importlib.resources.files("m2d_jax.configs")))


def load_config(name_or_path: str | Path) -> ConfigDict:
    """Load ``get_config()`` from a config file: a path, or a shipped config's name (``demo``, ``distill/base``;
    ``.py`` and a leading ``configs/`` optional, so ``configs/distill/base.py`` works from any directory)."""
    return load_config_module(name_or_path).get_config()


def load_config_module(name_or_path: str | Path):
    """The config file's module (``load_config``'s lookup), for the module-level constants some configs carry
    beside ``get_config()`` (e.g. a model config's ``STUDENT_GROUPS``)."""
    path = Path(name_or_path)
    if not path.exists():
        name = path.relative_to("configs") if path.parts[:1] == ("configs",) else path
        path = config_dir() / (name if name.suffix == ".py" else name.with_name(name.name + ".py"))
    if not path.is_file():
        raise FileNotFoundError(f"config {str(name_or_path)!r} not found (looked for it as a path and in "
                                f"{config_dir()})")
    spec = importlib.util.spec_from_file_location(f"m2d_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"{path}: a config file must define get_config()")
    return module


def _parse_value(text: str, old):
    if isinstance(old, str):
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text
    if isinstance(old, bool) and isinstance(value, str) and value.lower() in ("true", "false"):
        value = value.lower() == "true"
    if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(old, tuple) and isinstance(value, list):
        value = tuple(value)
    return value


def apply_overrides(config: ConfigDict, overrides: list[str], prefix: str = "config.") -> ConfigDict:
    """Apply ``["config.model.num_experts=16", ...]`` (leading ``--`` optional); unknown keys are errors."""
    for item in overrides:
        item = item.lstrip("-")
        if not item.startswith(prefix) or "=" not in item:
            raise ValueError(f"bad override {item!r}: expected --{prefix}KEY=VALUE")
        key, text = item[len(prefix):].split("=", 1)
        node = config
        *parents, leaf = key.split(".")
        for part in parents:
            if part not in node:
                raise KeyError(f"unknown config key {key!r} (no {part!r})")
            node = node[part]
        if leaf not in node:
            raise KeyError(f"unknown config key {key!r}; known here: {sorted(node.keys())}")
        value = _parse_value(text, node[leaf])
        try:
            node[leaf] = value
        except TypeError as err:  # a value that does not fit the field's type: bad input, not a bug
            raise ValueError(f"config key {key!r}: {err}") from err
    return config
