"""``m2d convert``: teacher + calibration statistics -> dense student checkpoint (and optionally an HF export)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from m2d_jax.convert.plan import MEAN_OUTPUT, ROUTER_MOMENT, check_counts, check_methods, plan_conversion
from m2d_jax.convert.student import build_dense_student, build_random_ffn_student, student_rule

log = logging.getLogger(__name__)


def _teacher_source(model_path: Path) -> dict:
    """Provenance of the teacher: its path and its HF directory (an imported teacher records its own source)."""
    from m2d_jax import checkpoint
    from m2d_jax.hf.export import teacher_hf_dir

    meta = {"source_model": str(model_path.absolute())}
    hf_dir = teacher_hf_dir({"source": str(model_path.absolute())})
    if hf_dir is not None:
        meta["source_hf_dir"] = str(hf_dir.absolute())
        meta["source_config_sha256"] = checkpoint.file_sha256(hf_dir / "config.json")
    elif checkpoint.is_m2d_checkpoint(model_path):
        meta["source_config_sha256"] = checkpoint.load_metadata(model_path).get("source_config_sha256")
    return meta


def grouping_statistics(stats) -> dict[str, np.ndarray]:
    """What the groupings read from calibration sums: Z = E_t[z z^T] [L, E, E] and mu = E_U[f_e] [L, E, d]."""
    sums = stats.sums
    return {ROUTER_MOMENT: sums.router_logit_moment / sums.tokens[:, None, None],
            MEAN_OUTPUT: sums.mean_output / np.maximum(sums.gram_tokens, 1)[:, None, None]}


def convert(model_path: str | Path, stats_path: str | Path, scoring: str, grouping: str, dp_scaling: str,
            num_selected: int, k: int, out: str | Path, hf_out: str | Path | None = None, dtype: str = "float32",
            overwrite: bool = False, progress: bool = True, **scoring_options) -> Path:
    """Select K experts per MoE layer with ``scoring``, group them into k groups, merge, scale and concatenate them
    into the teacher family's dense student; save it as an m2d_jax checkpoint at ``out`` (and as HF at
    ``hf_out``). Returns ``out``."""
    import m2d_jax
    from m2d_jax import __version__, checkpoint
    from m2d_jax.calibration import load_stats
    from m2d_jax.scoring import SCORINGS, score, select_experts

    started = time.perf_counter()
    if scoring not in SCORINGS:
        raise ValueError(f"unknown scoring {scoring!r} (expected one of {', '.join(SCORINGS)})")
    check_methods(grouping, dp_scaling)
    checkpoint.ensure_new_output(out, hf_out, overwrite=overwrite)
    model_path, stats_path = Path(model_path), Path(stats_path)
    stats = load_stats(stats_path)
    teacher = m2d_jax.from_pretrained(model_path, dtype=dtype)
    config = teacher.config
    if not config.is_moe:
        raise ValueError(f"{model_path}: the {config.family} model has no MoE layers to convert")
    student_rule(config.family)  # unsupported family: fail before selection
    check_counts(config.moe.experts.num_experts, num_selected, k)
    selected, weight_scores = select_experts(stats, scoring, num_selected, config, **scoring_options)
    sums = stats.sums
    routed_mass = sums.sum_applied_weight.sum(-1) / sums.tokens  # [L] E_t[sum_e w_e(t)] (rho included)
    plans = plan_conversion(teacher, selected, weight_scores, k, grouping, dp_scaling, grouping_statistics(stats),
                            routed_mass=routed_mass, conditional_prob=score(sums, "conditional_prob"))
    student = build_dense_student(teacher, plans, k, progress)
    metadata = {
        "kind": "dense_student", "family": student.config.family, "teacher_family": config.family,
        **_teacher_source(model_path), "stats": str(stats_path.absolute()),
        "stats_sha256": checkpoint.file_sha256(stats_path),
        "scoring": scoring, "scoring_options": scoring_options, "grouping": grouping, "dp_scaling": dp_scaling,
        "experts_selected": num_selected, "groups": k,
        "layers": {str(layer): {"groups": [list(g) for g in plan.groups], "scales": plan.scales.tolist()}
                   for layer, plan in plans.items()},
        "m2d_jax_version": __version__,
    }
    saved = checkpoint.save_model(student, out, metadata, overwrite=overwrite)
    if hf_out is not None:
        from m2d_jax.hf.export import export_model

        export_model(student, hf_out, metadata.get("source_hf_dir"), overwrite=overwrite, progress=progress)
    log.info("converted %s -> %s (K=%d, k=%d, %s/%s/%s) in %.1fs", model_path, saved, num_selected, k, scoring,
             grouping, dp_scaling, time.perf_counter() - started)
    return saved


def convert_random_ffn(model_path: str | Path, k: int, out: str | Path, hf_out: str | Path | None = None,
                       dtype: str = "float32", seed: int = 0, overwrite: bool = False) -> Path:
    """The random-FFN baseline (SPEC §7.2) as a checkpoint: student architecture, teacher attention/embeddings."""
    import m2d_jax
    from m2d_jax import __version__, checkpoint

    checkpoint.ensure_new_output(out, hf_out, overwrite=overwrite)
    model_path = Path(model_path)
    teacher = m2d_jax.from_pretrained(model_path, dtype=dtype)
    num_experts = teacher.config.moe.experts.num_experts if teacher.config.is_moe else 0
    if not 1 <= k <= num_experts:
        raise ValueError(f"k={k} groups: must be between 1 and the teacher's E={num_experts} experts")
    student = build_random_ffn_student(teacher, k, seed)
    metadata = {"kind": "random_ffn", "family": student.config.family, "teacher_family": teacher.config.family,
                **_teacher_source(model_path), "groups": k, "seed": seed, "init_std": 0.02,
                "m2d_jax_version": __version__}
    saved = checkpoint.save_model(student, out, metadata, overwrite=overwrite)
    if hf_out is not None:
        from m2d_jax.hf.export import export_model

        export_model(student, hf_out, metadata.get("source_hf_dir"), overwrite=overwrite)
    return saved
