"""HF export (``m2d export CKPT OUT_HF_DIR``): a model as a standard transformers checkpoint directory.

The tensors come from ``hf_tensors(model)``, the export direction of the same declarative key map import uses, so
an export re-imports losslessly. The config.json is the family adapter's ``config_to_hf`` (a standard HF class,
loadable without ``trust_remote_code``). Safetensors files are written by a small writer here (no torch, so bfloat16
works too), split into shards of at most ``max_shard_bytes`` with a ``model.safetensors.index.json`` when one file
would be larger. Tokenizer files and generation_config.json are copied from the teacher. Everything is written into
a temporary directory that is renamed to ``out_dir`` only when complete.
"""

from __future__ import annotations

import collections
import json
import logging
import shutil
import struct
import time
from pathlib import Path

import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from m2d_jax.artifacts import atomic_directory, check_outputs, is_primary_process
from m2d_jax.hf.adapters import adapter_for
from m2d_jax.hf.load import hf_tensors
from m2d_jax.errors import CheckpointError
from m2d_jax.hf.safetensors_io import DTYPE_NAMES, INDEX_NAME, SINGLE_NAME
from m2d_jax.models import CausalLM

log = logging.getLogger(__name__)

DEFAULT_MAX_SHARD_BYTES = 2 * 1024 ** 3
# Files copied from the teacher's HF directory when present (tokenizer, chat template, generation defaults).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json",
                   "generation_config.json")
TOKEN_ID_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def safetensors_header(tensors: list[tuple[str, np.ndarray]]) -> bytes:
    """The length-prefixed JSON header (padded to 8 bytes) for tensors written back to back in this order."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for key, array in tensors:
        if array.dtype not in DTYPE_NAMES:
            raise ValueError(f"tensor {key!r}: dtype {array.dtype} has no safetensors name")
        header[key] = {"dtype": DTYPE_NAMES[array.dtype], "shape": list(array.shape),
                       "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def write_safetensors(path: Path, tensors: list[tuple[str, np.ndarray]]) -> None:
    with open(path, "wb") as f:
        f.write(safetensors_header(tensors))
        for _, array in tensors:
            f.write(np.ascontiguousarray(array).tobytes())


def write_sharded(directory: Path, tensors, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                  progress: bool = True, total_bytes: int | None = None) -> list[str]:
    """Write (key, array) pairs as ``model.safetensors``, or as ``model-0000i-of-0000n.safetensors`` shards of at
    most ``max_shard_bytes`` (a larger tensor gets a shard of its own) plus an index. Holds one shard in memory."""
    shard_keys: list[list[str]] = []  # keys of each written shard
    tmp_names, current, current_bytes, total = [], [], 0, 0
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="export", disable=not progress)

    def flush():
        nonlocal current, current_bytes
        if current:
            name = f"shard-{len(tmp_names):05d}.tmp"
            write_safetensors(directory / name, current)
            tmp_names.append(name)
            shard_keys.append([key for key, _ in current])
            current, current_bytes = [], 0

    for key, array in tensors:
        if current and current_bytes + array.nbytes > max_shard_bytes:
            flush()
        current.append((key, array))
        current_bytes += array.nbytes
        total += array.nbytes
        bar.update(array.nbytes)
    flush()
    bar.close()
    if len(tmp_names) == 1:
        (directory / tmp_names[0]).rename(directory / SINGLE_NAME)
        return [SINGLE_NAME]
    names = [f"model-{i + 1:05d}-of-{len(tmp_names):05d}.safetensors" for i in range(len(tmp_names))]
    weight_map = {}
    for tmp, name, keys in zip(tmp_names, names, shard_keys):
        (directory / tmp).rename(directory / name)
        weight_map.update({key: name for key in keys})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / INDEX_NAME).write_text(json.dumps(index, indent=2))
    return names


def teacher_hf_dir(metadata: dict) -> Path | None:
    """The teacher's HF directory recorded in checkpoint metadata (an ``artifacts.Provenance`` record): its
    ``source_hf_dir``, else its ``source_model``, followed through an m2d_jax checkpoint's own record."""
    from m2d_jax import checkpoint
    from m2d_jax.artifacts import Provenance

    record = Provenance.from_dict(metadata)
    source = record.source_hf_dir or record.source_model
    if not source:
        return None
    source = Path(source)
    if checkpoint.is_m2d_checkpoint(source):
        return teacher_hf_dir(checkpoint.load_metadata(source))
    return source if (source / "config.json").exists() else None


def export_model(model: CausalLM, out_dir: str | Path, tokenizer_from: str | Path | None = None,
                 max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, overwrite: bool = False,
                 progress: bool = True) -> Path:
    """Write ``model`` as an HF checkpoint directory (config.json, safetensors, tokenizer/generation files)."""

    out_dir = Path(out_dir)
    check_outputs(out_dir, overwrite=overwrite)  # fail before any work
    config = model.config
    hf_config = {**adapter_for(config.family, "model.config").config_to_hf(config), "dtype": model.runtime.param_dtype}
    source = Path(tokenizer_from) if tokenizer_from is not None else None
    if source is not None and not source.is_dir():
        raise FileNotFoundError(f"--tokenizer-from {source}: not a directory")
    copied = [] if source is None else [source / name for name in TOKENIZER_FILES if (source / name).exists()]
    if source is not None and (source / "config.json").exists():  # special token ids live in config.json too
        teacher_config = json.loads((source / "config.json").read_text())
        hf_config.update({f: teacher_config[f] for f in TOKEN_ID_FIELDS if teacher_config.get(f) is not None})
    total_bytes = sum(v.get_value().size * v.get_value().dtype.itemsize
                      for _, v in nnx.state(model, nnx.Param).flat_state())
    started = time.perf_counter()

    def write(tmp: Path):
        if not is_primary_process():  # multi-process: process 0 writes; the others join in gathering the tensors
            collections.deque(hf_tensors(model), maxlen=0)
            return
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
        write_sharded(tmp, hf_tensors(model), max_shard_bytes, progress, total_bytes)
        for path in copied:
            shutil.copy2(path, tmp / path.name)

    out = atomic_directory(out_dir, write, overwrite)
    seconds = time.perf_counter() - started
    log.info("exported %s (%.1f MB) to %s in %.1fs (%.0f MB/s); copied %s", config.family, total_bytes / 1e6, out,
             seconds, total_bytes / 1e6 / max(seconds, 1e-9), [p.name for p in copied] or "no tokenizer files")
    if source is None:
        log.warning("no tokenizer source: %s has weights and config only", out)
    return out


def export_checkpoint(checkpoint_dir: str | Path, out_dir: str | Path, tokenizer_from: str | Path | None = None,
                      dtype: str | None = None, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                      overwrite: bool = False, progress: bool = True, mesh=None) -> Path:
    """``m2d export``: an m2d_jax checkpoint -> HF directory. Tokenizer files come from ``tokenizer_from`` or the
    teacher directory recorded in the checkpoint's metadata; ``dtype`` casts the weights (default: as saved).
    ``mesh`` (default in a multi-process run: all devices on ``fsdp``, ``distributed.stage_mesh``) restores the
    checkpoint sharded onto it; the tensors are then gathered one leaf at a time and process 0 writes."""
    from m2d_jax import checkpoint
    from m2d_jax.distill.train import load_for_mesh
    from m2d_jax.distributed import stage_mesh

    out_dir = Path(out_dir)
    check_outputs(out_dir, overwrite=overwrite)
    if not checkpoint.is_m2d_checkpoint(checkpoint_dir):
        raise CheckpointError(f"{checkpoint_dir}: not an m2d_jax checkpoint (no {checkpoint.RECORD})")
    if tokenizer_from is None:
        tokenizer_from = teacher_hf_dir(checkpoint.load_metadata(checkpoint_dir))
    mesh = stage_mesh(mesh)
    model = checkpoint.load_model(checkpoint_dir, dtype=dtype) if mesh is None else \
        load_for_mesh(checkpoint_dir, mesh, dtype or checkpoint.read_config(checkpoint_dir)[1])[0]
    return export_model(model, out_dir, tokenizer_from, max_shard_bytes, overwrite, progress)
