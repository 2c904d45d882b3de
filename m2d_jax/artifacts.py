"""Artifacts on disk, the low level: atomic writes, output checks, content hashes and the provenance record.

Every output m2d_jax writes (a statistics file, a selection file, a checkpoint or HF directory, a results JSON) is
written under a temporary sibling name and renamed when complete (``atomic_write``), so a crash never leaves a
half-written artifact under the target name. A stage that writes several outputs checks all of them before any work
(``check_outputs``) and stages all of them before renaming any (``write_outputs``): when one fails, nothing is left.

Nothing here imports a model: this module sits below ``checkpoint``, ``calibration``, ``scoring`` and ``pipeline``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

import jax

from m2d_jax.errors import CheckpointError, OutputError


def file_sha256(path: str | Path) -> str:
    """sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def is_primary_process() -> bool:
    """True on the process that writes shared single files (process 0; always True in a single-process run)."""
    return jax.process_index() == 0


def sync_processes(name: str) -> None:
    """Barrier across all processes of a multi-process run (no-op in a single-process run)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _writable_parent(path: Path) -> None:
    """Raise ``OutputError`` unless ``path``'s parent exists as a writable directory or can be created."""
    ancestor = path.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputError(f"{path}: cannot create it: {ancestor} is not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputError(f"{path}: cannot create it: {ancestor} is not writable")


def check_outputs(*paths: str | Path | None, overwrite: bool = False) -> list[Path]:
    """Validate every output path before any work; returns them as absolute paths (None entries are skipped).

    Raises ``FileExistsError`` for an existing output (unless ``overwrite``) and ``OutputError`` when an output's
    parent directory cannot be created or written, or when two outputs are the same path or one lies inside another.
    """
    outs = [Path(p).absolute() for p in paths if p is not None]
    for i, a in enumerate(outs):
        for b in outs[i + 1:]:
            if a == b or a in b.parents or b in a.parents:
                raise OutputError(f"outputs {a} and {b} overlap: give each output its own path")
    for out in outs:
        if out.exists() and not overwrite:
            raise FileExistsError(f"{out} already exists; choose a new output path")
        _writable_parent(out)
    return outs


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _replace(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``, replacing what is there. A file is replaced atomically (``os.replace``); an
    existing directory is renamed aside first and deleted last, so a crash leaves the old or the new directory
    under ``out`` (or, between the two renames, none), never a partly deleted one."""
    if not (out.is_dir() and not out.is_symlink()):
        os.replace(tmp, out)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.rename(out, aside / out.name)
    os.rename(tmp, out)
    shutil.rmtree(aside)


def atomic_write(out: str | Path, write: Callable[[Path], Any], directory: bool = False,
                 overwrite: bool = False) -> Path:
    """Run ``write(tmp)`` and rename ``tmp`` to ``out`` only if it succeeds; returns the absolute ``out``.

    ``directory=False``: ``tmp`` is a path in ``out``'s directory for ``write`` to create as a file; in a
    multi-process run only process 0 writes it (every process holds the same content: statistics, selections,
    reports), the others return at once (a stage checks its outputs on every process before any work,
    ``check_outputs``, and waits at a barrier after writing, ``sync_processes``). ``directory=True``: ``tmp`` is an
    existing empty directory. In a multi-process run a directory write is collective: every process calls this with
    the same ``out``, ``write`` runs on every process with the same ``tmp`` (collective writers such as Orbax
    coordinate their shards; single files must be written by ``is_primary_process()`` only), and process 0 renames
    once every process has finished writing.
    """
    if not directory and not is_primary_process():  # checking here would race with process 0's rename
        return Path(out).absolute()
    out = check_outputs(out, overwrite=overwrite)[0]
    if directory and jax.process_count() > 1:
        return _atomic_directory_collective(out, write)
    out.parent.mkdir(parents=True, exist_ok=True)
    if directory:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent)
        os.close(fd)
        tmp = Path(name)
        tmp.unlink()  # ``write`` creates the file (a writer may refuse an existing path)
    try:
        write(tmp)
        _replace(tmp, out)
    finally:
        _remove(tmp)
    return out


def atomic_directory(out: str | Path, write: Callable[[Path], Any], overwrite: bool = False) -> Path:
    """``atomic_write`` of a directory (collective in a multi-process run)."""
    return atomic_write(out, write, directory=True, overwrite=overwrite)


def _atomic_directory_collective(out: Path, write: Callable[[Path], Any]) -> Path:
    tmp = out.parent / f".{out.name}.tmp-collective"  # the same path on every process
    if is_primary_process():
        shutil.rmtree(tmp, ignore_errors=True)  # a stale one from a crashed run
        tmp.mkdir(parents=True)
    sync_processes(f"m2d_atomic_start:{out}")
    try:
        write(tmp)
        sync_processes(f"m2d_atomic_written:{out}")
        if is_primary_process():
            _replace(tmp, out)
    finally:
        if is_primary_process() and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    sync_processes(f"m2d_atomic_done:{out}")  # nobody reads ``out`` before it exists
    return out


def write_outputs(writers: Mapping[str | Path | None, Callable[[Path], Any]], overwrite: bool = False) -> list[Path]:
    """Write several outputs all or nothing: ``writers`` maps each output path (None entries are skipped) to a
    ``write(staging_path)`` that creates it there (e.g. ``lambda p: save_model(model, p)``).

    Every output is checked first (``check_outputs``), then written under a staging sibling name; only when every
    writer has succeeded are they renamed to their targets. If any writer fails, every staged output is removed
    and the targets are untouched. Writers may be collective (each stages through ``atomic_write``): in a
    multi-process run every process calls this with the same paths and process 0 renames.
    """
    items = [(p, w) for p, w in writers.items() if p is not None]
    targets = check_outputs(*(p for p, _ in items), overwrite=overwrite)
    staged = [t.parent / f".{t.name}.staged" for t in targets]  # the same path on every process
    try:
        for stage, (_, write) in zip(staged, items):
            if is_primary_process():
                _remove(stage)  # a stale one from a crashed run
            sync_processes(f"m2d_stage:{stage}")
            write(stage)
        sync_processes("m2d_outputs_written:" + ",".join(map(str, targets)))
        if is_primary_process():
            renamed = []
            try:
                for stage, target in zip(staged, targets):
                    _replace(stage, target)
                    renamed.append(target)
            except BaseException:
                for target in renamed:  # a rename failed: take back the ones already made
                    _remove(target)
                raise
    finally:
        if is_primary_process():
            for stage in staged:
                _remove(stage)
    sync_processes("m2d_outputs_done:" + ",".join(map(str, targets)))
    return targets


def write_json(obj: Any, path: str | Path, overwrite: bool = False) -> Path:
    """Write ``obj`` as indented, key-sorted JSON, atomically."""
    text = json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n"
    return atomic_write(path, lambda tmp: tmp.write_text(text), overwrite=overwrite)


@dataclasses.dataclass(frozen=True)
class Provenance:
    """Where a model checkpoint comes from: the one metadata record every stage writes (``to_dict``).

    ``source_model`` is the model this one was made from (an HF directory or an m2d_jax checkpoint) and
    ``source_hf_dir`` the HF directory at the root of that chain (tokenizer and generation config are copied from
    there on export). ``details`` holds what only one kind has (per-layer plans, a seed, training steps, ...).
    """
    kind: str  # "imported" | "dense_student" | "random_ffn" | "pruned_dense" | "distilled"
    source_model: str | None = None
    source_hf_dir: str | None = None
    source_config_sha256: str | None = None  # sha256 of the root HF directory's config.json
    teacher: str | None = None  # distilled: the teacher checkpoint
    stats_sha256: str | None = None  # CalibrationStats.digest() of the statistics used
    selection: dict | None = None  # the Selection record (scoring, options, K, selected experts per layer, ...)
    recipe: dict | None = None  # the ConversionRecipe (grouping, DP scaling, groups)
    details: dict = dataclasses.field(default_factory=dict)
    package_version: str = ""

    def __post_init__(self):
        if not self.package_version:
            from m2d_jax import __version__

            object.__setattr__(self, "package_version", __version__)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, record: Mapping) -> "Provenance":
        """The record ``to_dict`` wrote (a checkpoint's metadata; ``{}`` for a model saved without one)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(record) - names)
        if unknown:
            raise CheckpointError(f"provenance record has unknown fields {unknown} (expected some of {sorted(names)})")
        return cls(**{"kind": "unknown", **record})

__all__ = ["Provenance", "atomic_directory", "atomic_write", "check_outputs", "file_sha256", "is_primary_process",
           "sync_processes", "write_json", "write_outputs"]
