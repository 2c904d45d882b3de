"""The models ``m2d plan`` plans for: a shipped real-model config (``configs/models/NAME.py``: the hub config.json
values) or a checkpoint directory, and the dense student ``m2d convert`` makes of it."""

from __future__ import annotations

from pathlib import Path

from m2d_jax.errors import CheckpointError
from m2d_jax.models import ModelConfig


def model_config_names() -> list[str]:
    from m2d_jax.config_utils import config_dir

    return sorted(p.stem for p in (config_dir() / "models").glob("*.py") if p.stem != "__init__")


def load_model(name_or_path: str | Path) -> tuple[ModelConfig, int | None]:
    """(architecture, the paper's student k or None) of a shipped model config name (``qwen3_30b_a3b``) or of an HF
    / m2d_jax checkpoint directory (config only, no weights). A model config's values go through the family
    adapter's ``config_from_hf`` exactly as a downloaded config.json would."""
    from m2d_jax.config_utils import config_dir, load_config_module
    from m2d_jax.hf.adapters import adapter_for

    path = Path(name_or_path)
    if path.is_dir():
        from m2d_jax.info import load_config

        return load_config(path)[0], None
    file = path if path.suffix == ".py" and path.is_file() else config_dir() / "models" / f"{name_or_path}.py"
    if not file.is_file():
        raise CheckpointError(f"--model {name_or_path}: not a checkpoint directory nor a model config "
                              f"(known: {', '.join(model_config_names())})")
    module = load_config_module(file)
    hf = module.get_config().to_dict()
    return adapter_for(hf.get("model_type"), str(file)).config_from_hf(hf, str(file)), getattr(
        module, "STUDENT_GROUPS", None)


def student_config(teacher: ModelConfig, groups: int) -> ModelConfig:
    """The architecture ``m2d convert --groups k`` makes of ``teacher`` (the family's student rule)."""
    from m2d_jax.convert.student import student_rule

    rule = student_rule(teacher.family)
    return rule.student_config(teacher, rule.student_width(teacher, groups))
