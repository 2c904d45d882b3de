"""Statistics files: one ``.npz`` of float64 sums plus a JSON metadata record, written atomically."""

from __future__ import annotations

import json
import zipfile
import zlib
from pathlib import Path

import numpy as np

from m2d_jax.artifacts import atomic_write
from m2d_jax.calibration.types import FORMAT, CalibrationStats, StatSums, validate
from m2d_jax.errors import StatsError


def save_stats(stats: CalibrationStats, path: str | Path, overwrite: bool = False) -> Path:
    """Write ``stats`` to ``path`` (a temporary file renamed when complete); returns the absolute path."""
    arrays = {name: np.asarray(v, np.float64) for name, v in stats.sums._asdict().items()}

    def write(tmp: Path):
        with open(tmp, "wb") as f:
            np.savez(f, metadata=np.asarray(json.dumps(stats.metadata)), **arrays)

    return atomic_write(path, write, overwrite=overwrite)


def load_stats(path: str | Path) -> CalibrationStats:
    """Read and validate a statistics file written by ``save_stats``; ``StatsError`` naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise StatsError(f"{path}: statistics file not found")
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise ValueError("a single array, not an .npz archive")
        with loaded as f:
            arrays = {k: f[k] for k in f.files}
        metadata = json.loads(str(arrays.pop("metadata"))) if "metadata" in arrays else None
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as err:
        raise StatsError(f"{path}: not a statistics file, or a truncated one ({type(err).__name__}: {err})") from err
    if not isinstance(metadata, dict):
        raise StatsError(f"{path}: no metadata record")
    if metadata.get("format") != FORMAT:
        raise StatsError(f"{path}: format {metadata.get('format')!r}, expected {FORMAT!r} (re-run m2d calibrate)")
    missing = [n for n in StatSums._fields if n not in arrays]
    if missing:
        raise StatsError(f"{path}: missing fields {missing}")
    return validate(CalibrationStats(StatSums(**{n: arrays[n] for n in StatSums._fields}), metadata), str(path))
