"""The path-level stage runners the CLI and the demo call: files in, artifacts out.

Each runner checks every output before any work (``artifacts.check_outputs``), reads its inputs once, calls the
in-memory stage (``calibration.calibrate``, ``scoring.select_experts``, ``convert.convert``), records a
``Provenance`` and writes its outputs atomically (several outputs all or nothing: ``artifacts.write_outputs``).
The numerics live in the stage packages; nothing here computes.

- ``import_checkpoint``: HF directory -> m2d_jax checkpoint;
- ``calibrate_files``: teacher + text files -> ``CalibrationStats`` (a statistics file);
- ``select_from_files``: statistics files -> ``Selection`` (a selection file);
- ``convert_checkpoint``: teacher + statistics + (a selection file | a scoring and K) -> student checkpoint (+ HF);
- ``random_ffn_checkpoint``: the random-FFN baseline checkpoint (+ HF);
- ``prune_dense_checkpoint``: a dense teacher + text files -> its pruned (D2D baseline) checkpoint (+ HF).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Sequence

from m2d_jax.artifacts import (Provenance, check_outputs, file_sha256, is_primary_process, sync_processes,
                               write_outputs)
from m2d_jax.calibration import CalibrationStats
from m2d_jax.convert import ConversionRecipe
from m2d_jax.prune import DEFAULT_AXES, DEFAULT_MIN_FRACTION, PruneReport
from m2d_jax.scoring import Selection

log = logging.getLogger(__name__)

DEFAULT_SCORING = "gld_reap"  # DO-ACP, the paper's best scoring: used when converting without a selection file


def source_provenance(model_path: str | Path) -> dict:
    """``Provenance`` fields of a model made from ``model_path`` (an HF directory or an m2d_jax checkpoint): the
    path, the HF directory at the root of its chain (an imported or converted checkpoint records its own) and the
    sha256 of that directory's config.json."""
    from m2d_jax import checkpoint
    from m2d_jax.hf.export import teacher_hf_dir

    path = Path(model_path).absolute()
    if checkpoint.is_m2d_checkpoint(path):
        metadata = checkpoint.load_metadata(path)
        hf_dir = teacher_hf_dir(metadata)
        config_sha = Provenance.from_dict(metadata).source_config_sha256
    else:
        hf_dir = path if (path / "config.json").exists() else None
        config_sha = None
    if hf_dir is not None:
        config_sha = file_sha256(hf_dir / "config.json")
    return {"source_model": str(path), "source_hf_dir": None if hf_dir is None else str(Path(hf_dir).absolute()),
            "source_config_sha256": config_sha}


def import_checkpoint(hf_dir: str | Path, out_dir: str | Path, dtype: str = "float32",
                      overwrite: bool = False, mesh=None) -> Path:
    """``m2d import``: stream an HF checkpoint into an m2d_jax (Orbax) checkpoint directory. With a ``mesh``
    (default in a multi-process run: every device on ``fsdp``) each process reads and writes only its shards."""
    from m2d_jax import checkpoint
    from m2d_jax.distill.train import load_for_mesh
    from m2d_jax.distributed import stage_mesh
    from m2d_jax.hf import load_hf

    check_outputs(out_dir, overwrite=overwrite)
    mesh = stage_mesh(mesh)
    model = load_hf(Path(hf_dir), dtype=dtype) if mesh is None else load_for_mesh(hf_dir, mesh, dtype)[0]
    provenance = Provenance("imported", **source_provenance(hf_dir))
    return checkpoint.save_model(model, out_dir, provenance.to_dict(), overwrite=overwrite)


def calibration_set(model_path: str | Path, vocab_size: int, data_files: Sequence[str | Path], seq_len: int,
                    num_seqs: int, seed: int = 0, tokenizer_dir: str | Path | None = None,
                    text_field: str = "text"):
    """The calibration windows [num_seqs, seq_len] of local text files: tokenised with the model's tokenizer (or
    ``tokenizer_dir``'s), packed, ``num_seqs`` of them chosen with ``seed`` (``calibration_windows``)."""
    from m2d_jax.calibration import calibration_windows
    from m2d_jax.data import DataError, load_tokenizer, pack_documents, read_documents, tokenize_documents

    tokenizer = load_tokenizer(tokenizer_dir or model_path)
    tokens = tokenize_documents(read_documents(data_files, text_field), tokenizer)
    if tokens.max() >= vocab_size:
        raise DataError(f"tokenizer of {tokenizer.directory} produced id {int(tokens.max())} >= the model's "
                        f"vocab_size {vocab_size}")
    return calibration_windows(pack_documents(tokens, seq_len), num_seqs, seed)


def calibrate_files(model_path: str | Path, data_files: Sequence[str | Path], out: str | Path | None = None,
                    seq_len: int = 2048, num_seqs: int = 512, gram_tokens: int = 32768, batch_size: int = 8,
                    seed: int = 0, gram_chunk: int = 256, tokenizer_dir: str | Path | None = None,
                    text_field: str = "text", shard_index: int = 0, shard_count: int = 1, dtype: str = "float32",
                    show_progress: bool = True, overwrite: bool = False, mesh=None) -> CalibrationStats:
    """``m2d calibrate``: statistics of the teacher at ``model_path`` on local text files, saved to ``out`` if given.

    The calibration set is ``num_seqs`` packed windows of ``seq_len`` tokens chosen with ``seed``; this call
    processes shard ``shard_index`` of ``shard_count`` (combine the shards' results with ``combine_stats``).
    ``mesh`` (a ``Mesh`` or axis sizes; default in a multi-process run: all devices on ``fsdp``,
    ``distributed.stage_mesh``) imports the teacher sharded onto it and splits every batch over it; the statistics
    are those of the whole batch on every process, and process 0 writes ``out`` (the others wait for it).
    """
    from m2d_jax.calibration import calibrate, save_stats
    from m2d_jax.distributed import stage_mesh
    from m2d_jax.info import load_config

    check_outputs(out, overwrite=overwrite)
    for name, value in (("seq_len", seq_len), ("num_seqs", num_seqs), ("batch_size", batch_size)):
        if value <= 0:
            raise ValueError(f"{name} must be > 0, got {value}")
    if gram_tokens < 0 or not 0 <= shard_index < shard_count:
        raise ValueError(f"need gram_tokens >= 0 and 0 <= shard_index < shard_count "
                         f"(got {gram_tokens}, {shard_index}, {shard_count})")
    config, _ = load_config(model_path)  # the architecture only: bad input fails before any weight is read
    if not config.is_moe:
        raise ValueError(f"{model_path}: {config.family} model has no MoE layers to calibrate")
    windows = calibration_set(model_path, config.vocab_size, data_files, seq_len, num_seqs, seed, tokenizer_dir,
                              text_field)
    mesh = stage_mesh(mesh)
    teacher = load_model(model_path, dtype, mesh)
    stats = calibrate(teacher, windows, gram_tokens=gram_tokens, batch_size=batch_size, seed=seed,
                      gram_chunk=gram_chunk, shard_index=shard_index, shard_count=shard_count,
                      show_progress=show_progress, mesh=mesh)
    stats = CalibrationStats(stats.sums, {**stats.metadata, "model_path": str(Path(model_path).absolute()),
                                          "data_files": [str(Path(f).absolute()) for f in data_files]})
    if out is not None:
        save_stats(stats, out, overwrite=overwrite)
        sync_processes(f"m2d calibrate: wrote {out}")  # multi-host: nobody reads ``out`` before process 0 wrote it
    return stats


def load_model(model_path: str | Path, dtype: str | None, mesh=None, **runtime_fields):
    """``from_pretrained(model_path, dtype=dtype)``, or with ``mesh`` (a ``Mesh`` or axis sizes,
    ``distributed.stage_mesh``) its parameters imported sharded onto the mesh by the sharding rules, each process
    reading only its slices (``distill.load_for_mesh``): the one loader of the stages that take ``--mesh``."""
    import m2d_jax

    if mesh is None:
        return m2d_jax.from_pretrained(model_path, dtype=dtype, **runtime_fields)
    from m2d_jax.distill.train import load_for_mesh
    from m2d_jax.distributed import stage_mesh

    return load_for_mesh(model_path, stage_mesh(mesh), dtype, **runtime_fields)[0]


def load_statistics(paths: str | Path | Sequence[str | Path]) -> CalibrationStats:
    """One statistics file, or the sum of several shards' files (``combine_stats``)."""
    from m2d_jax.calibration import combine_stats, load_stats

    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    if not paths:
        raise ValueError("no statistics file given")
    return combine_stats(*(load_stats(p) for p in paths))


def select_from_files(stats_paths: str | Path | Sequence[str | Path], scoring: str, num_selected: int,
                      out: str | Path | None = None, model: str | Path | None = None, overwrite: bool = False,
                      **options) -> Selection:
    """``m2d score``: select K experts per MoE layer from statistics files (shards are summed), saved to ``out``
    as a selection file if given. ``model`` (a checkpoint; only its config is read) checks that the statistics
    belong to it."""
    from m2d_jax.scoring import save_selection, select_experts

    check_outputs(out, overwrite=overwrite)
    stats = load_statistics(stats_paths)
    if model is not None:
        from m2d_jax.info import load_config

        stats.check_model(load_config(model)[0])
    selection = select_experts(stats, scoring, num_selected, **options)
    if out is not None:
        save_selection(selection, out, overwrite=overwrite)
        sync_processes(f"m2d score: wrote {out}")  # multi-host: process 0 writes it, the others wait for it
    return selection


def _write_student(student, out, hf_out, provenance: Provenance, overwrite: bool, progress: bool, mesh=None) -> Path:
    """The student checkpoint at ``out`` and, if given, its HF export at ``hf_out``: both or neither.

    ``mesh`` (a ``Mesh`` or axis sizes; default in a multi-process run: all devices on ``fsdp``,
    ``distributed.stage_mesh``): the student, built whole on every process, is placed on it first, so every
    process writes its own shards of the checkpoint (Orbax) and process 0 the HF files."""
    from m2d_jax import checkpoint
    from m2d_jax.distributed import place_model, stage_mesh
    from m2d_jax.hf.export import export_model

    mesh = stage_mesh(mesh)
    if mesh is not None:
        place_model(student, mesh)

    metadata = provenance.to_dict()
    write_outputs({out: lambda path: checkpoint.save_model(student, path, metadata),
                   hf_out: lambda path: export_model(student, path, provenance.source_hf_dir, progress=progress)},
                  overwrite=overwrite)
    return Path(out).absolute()


def convert_checkpoint(model_path: str | Path, stats_paths: str | Path | Sequence[str | Path] | None,
                       recipe: ConversionRecipe, out: str | Path, hf_out: str | Path | None = None,
                       selection: str | Path | Selection | None = None, scoring: str | None = None,
                       num_selected: int | None = None, scoring_options: dict | None = None,
                       dtype: str = "float32", overwrite: bool = False, progress: bool = True, mesh=None) -> Path:
    """``m2d convert``: the dense student of the teacher at ``model_path`` as an m2d_jax checkpoint at ``out`` (and
    an HF directory at ``hf_out``: both or neither are written). Returns ``out``.

    Multi-host: every process converts (the same inputs give the same student on each), the student is placed on
    ``mesh`` (see ``_write_student``) and written once.

    The experts come from ``selection`` (a selection file or a ``Selection`` made from these statistics), or are
    selected here with ``scoring`` (default ``DEFAULT_SCORING``), ``num_selected`` (K) and ``scoring_options``.
    """
    import m2d_jax
    from m2d_jax.convert import build_dense_student, conversion_plans
    from m2d_jax.scoring import load_selection, select_experts

    started = time.perf_counter()
    check_outputs(out, hf_out, overwrite=overwrite)
    if stats_paths is None or (not isinstance(stats_paths, (str, Path)) and not list(stats_paths)):
        raise ValueError("conversion needs the calibration statistics (--stats), or use the random-FFN baseline")
    if selection is not None and (scoring is not None or num_selected is not None or scoring_options):
        raise ValueError("give a selection (--selection) or a scoring with K (--scoring, --experts), not both")
    if selection is None and num_selected is None:
        raise ValueError("K, the experts kept per MoE layer (--experts), is required to select them "
                         "(or give a selection file: --selection)")
    if isinstance(selection, (str, Path)):
        selection = load_selection(selection)
    stats = load_statistics(stats_paths)
    if selection is None:
        selection = select_experts(stats, scoring or DEFAULT_SCORING, num_selected, **(scoring_options or {}))
    selection.check_stats(stats)
    teacher = m2d_jax.from_pretrained(model_path, dtype=dtype)
    plans = conversion_plans(teacher, stats, selection, recipe)
    student = build_dense_student(teacher, plans, recipe.groups, progress and is_primary_process())
    layers = {str(layer): {"groups": [list(g) for g in plan.groups], "scales": plan.scales.tolist()}
              for layer, plan in plans.items()}
    provenance = Provenance("dense_student", **source_provenance(model_path), stats_sha256=stats.digest(),
                            selection=selection.to_dict(), recipe=recipe.to_dict(),
                            details={"family": student.config.family, "teacher_family": teacher.config.family,
                                     "layers": layers})
    saved = _write_student(student, out, hf_out, provenance, overwrite, progress, mesh)
    log.info("converted %s -> %s (K=%d, k=%d, %s/%s/%s) in %.1fs", model_path, saved, selection.num_selected,
             recipe.groups, selection.scoring, recipe.grouping, recipe.dp_scaling, time.perf_counter() - started)
    return saved


def random_ffn_checkpoint(model_path: str | Path, groups: int, out: str | Path, hf_out: str | Path | None = None,
                          dtype: str = "float32", seed: int = 0, overwrite: bool = False,
                          progress: bool = True, mesh=None) -> Path:
    """``m2d convert --random-ffn``: the random-FFN baseline of the teacher at ``model_path`` (student architecture
    of k = ``groups`` groups, teacher attention and embeddings, fresh FFN) at ``out`` (and ``hf_out``); ``mesh`` as
    for ``convert_checkpoint``."""
    import m2d_jax
    from m2d_jax.convert import convert_random_ffn

    check_outputs(out, hf_out, overwrite=overwrite)
    teacher = m2d_jax.from_pretrained(model_path, dtype=dtype)
    student = convert_random_ffn(teacher, groups, seed)
    provenance = Provenance("random_ffn", **source_provenance(model_path),
                            recipe={"groups": int(groups), "seed": seed, "init_std": 0.02},
                            details={"family": student.config.family, "teacher_family": teacher.config.family})
    return _write_student(student, out, hf_out, provenance, overwrite, progress, mesh)


def prune_dense_checkpoint(model_path: str | Path, data_files: Sequence[str | Path], out: str | Path, *,
                           target_params: int | None = None, params_of: str | Path | None = None,
                           hf_out: str | Path | None = None, axes: Sequence[str] = DEFAULT_AXES,
                           min_fraction: float = DEFAULT_MIN_FRACTION, seq_len: int = 2048, num_seqs: int = 512,
                           batch_size: int = 8, seed: int = 0, tokenizer_dir: str | Path | None = None,
                           text_field: str = "text", dtype: str = "float32", overwrite: bool = False,
                           progress: bool = True, mesh=None) -> tuple[Path, PruneReport]:
    """``m2d prune-dense``: the dense teacher at ``model_path`` pruned to ``target_params`` parameters, or to the
    total parameter count of the checkpoint ``params_of`` (e.g. an MoE-converted student), with importance measured
    on ``num_seqs`` calibration windows of ``seq_len`` tokens of ``data_files`` (docs/METHOD.md §17).
    Writes an m2d_jax checkpoint at ``out`` (and an HF directory at ``hf_out``: both or neither); the target is
    checked against the teacher's config before any weight or text is read; ``mesh`` as for ``convert_checkpoint``.
    Returns ``(out, PruneReport)``."""
    import m2d_jax
    from m2d_jax.errors import PruneError
    from m2d_jax.info import load_config, summarize
    from m2d_jax.prune import plan_shape, prune_dense

    started = time.perf_counter()
    check_outputs(out, hf_out, overwrite=overwrite)
    if (target_params is None) == (params_of is None):
        raise PruneError("give the parameter target as a count (--params) or as a checkpoint to match "
                         "(--params-of), exactly one of them")
    if params_of is not None:
        target_params = summarize(load_config(params_of)[0])["total_params"]
    config, _ = load_config(model_path)  # the architecture only: a bad teacher or target fails before any weight
    plan_shape(config, target_params, axes, min_fraction)
    windows = calibration_set(model_path, config.vocab_size, data_files, seq_len, num_seqs, seed, tokenizer_dir,
                              text_field)
    teacher = m2d_jax.from_pretrained(model_path, dtype=dtype)
    pruned, report = prune_dense(teacher, windows, target_params, axes=axes, min_fraction=min_fraction,
                                 batch_size=batch_size, show_progress=progress)
    provenance = Provenance("pruned_dense", **source_provenance(model_path),
                            recipe={"target_params": report.target_params, "params_of": None if params_of is None
                                    else str(Path(params_of).absolute()), "axes": list(report.axes),
                                    "min_fraction": report.min_fraction, "seq_len": seq_len, "num_seqs": num_seqs,
                                    "seed": seed},
                            details={"family": pruned.config.family,
                                     "data_files": [str(Path(f).absolute()) for f in data_files],
                                     **report.to_dict()})
    saved = _write_student(pruned, out, hf_out, provenance, overwrite, progress, mesh)
    log.info("pruned %s -> %s: %d -> %d parameters (target %d) in %.1fs", model_path, saved, report.teacher_params,
             report.params, report.target_params, time.perf_counter() - started)
    return saved, report


__all__ = ["DEFAULT_SCORING", "calibrate_files", "calibration_set", "convert_checkpoint", "import_checkpoint",
           "load_statistics", "prune_dense_checkpoint", "random_ffn_checkpoint", "select_from_files",
           "source_provenance"]
