"""Streaming safetensors access: one tensor, or one slice of a tensor, at a time, with errors that name the file
and key.

The format is an 8-byte little-endian header length, a JSON header {key: {dtype, shape, data_offsets}}, then the
raw little-endian data. Reading it directly (instead of through a framework) keeps bfloat16 and the MXFP4 uint8
blocks as NumPy arrays (via ``ml_dtypes``) without ever importing torch, and lets truncated files fail clearly.
``read`` memory-maps the whole tensor; ``read_slice`` reads only the bytes of one rectangular slice with positioned
reads (no mapping, so nothing else of the file becomes resident): what a sharded import uses.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import mmap
import os
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

from m2d_jax.errors import CheckpointError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
}
DTYPE_NAMES = {np.dtype(v): k for k, v in DTYPES.items()}
SMALL_RUN_BYTES = 1 << 16  # slice runs shorter than this are read as blocks of whole rows instead
READ_BLOCK_BYTES = 64 << 20  # the largest such block (or one row of axis 0, if larger)


class SafetensorsFile:
    """One .safetensors file, memory-mapped; ``read(key)`` returns a read-only NumPy view."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                raw_len = f.read(8)
                if len(raw_len) < 8:
                    raise CheckpointError(f"{self.path}: truncated safetensors file (no header)")
                (header_len,) = struct.unpack("<Q", raw_len)
                if header_len > size - 8:
                    raise CheckpointError(f"{self.path}: truncated safetensors file (header of {header_len} bytes "
                                          f"but the file has {size} bytes)")
                header = json.loads(f.read(header_len))
        except OSError as err:
            raise CheckpointError(f"{self.path}: cannot read safetensors file ({err})") from err
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CheckpointError(f"{self.path}: malformed safetensors header ({err})") from err
        header.pop("__metadata__", None)
        self.data_start = 8 + header_len
        self.entries = header
        data_len = size - self.data_start
        for key, entry in header.items():
            end = entry["data_offsets"][1]
            if end > data_len:
                raise CheckpointError(f"{self.path}: truncated safetensors file: tensor {key!r} needs bytes up to "
                                      f"{end} of the data section but only {data_len} are present")
            if entry["dtype"] not in DTYPES:
                raise CheckpointError(f"{self.path}: tensor {key!r} has unsupported dtype {entry['dtype']}")
        self._mmap = None

    def keys(self):
        return self.entries.keys()

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.entries[key]["shape"])

    def read(self, key: str) -> np.ndarray:
        if self._mmap is None:
            with open(self.path, "rb") as f:
                self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        entry = self.entries[key]
        dtype = np.dtype(DTYPES[entry["dtype"]])
        begin, end = entry["data_offsets"]
        count = (end - begin) // dtype.itemsize
        arr = np.frombuffer(self._mmap, dtype=dtype, count=count, offset=self.data_start + begin)
        return arr.reshape(entry["shape"])

    def read_slice(self, key: str, index: tuple[slice, ...]) -> np.ndarray:
        """``tensor[index]`` (one ``slice`` per axis, step 1) as a new array, reading from the file only the rows it
        needs: one positioned read per contiguous run (the trailing axes that the slice keeps whole are one run), or,
        when the runs are small (a column slice), consecutive blocks of whole leading-axis rows of at most
        ``READ_BLOCK_BYTES`` cut in memory, so that a column slice costs few system calls and one block of memory."""
        entry = self.entries[key]
        dtype = np.dtype(DTYPES[entry["dtype"]])
        shape = tuple(entry["shape"])
        if len(index) != len(shape) or any(s.step not in (None, 1) for s in index):
            raise ValueError(f"{self.path}: tensor {key!r} {shape}: bad slice {index}")
        bounds = [s.indices(n)[:2] for s, n in zip(index, shape)]
        out = np.empty([max(b - a, 0) for a, b in bounds], dtype)
        if out.size == 0:
            return out
        # axes from ``whole`` on are kept whole, so each run is axis ``lead``'s range times the axes after it
        whole = len(shape)
        while whole > 0 and bounds[whole - 1] == (0, shape[whole - 1]):
            whole -= 1
        lead = max(whole - 1, 0)
        strides = [dtype.itemsize * math.prod(shape[i + 1:]) for i in range(len(shape))]
        begin = self.data_start + entry["data_offsets"][0]
        fd = os.open(self.path, os.O_RDONLY)
        try:
            if lead > 0 and math.prod(out.shape[lead:]) * dtype.itemsize < SMALL_RUN_BYTES:
                rows = max(1, READ_BLOCK_BYTES // strides[0])  # whole rows of axis 0 per block
                for first in range(bounds[0][0], bounds[0][1], rows):
                    block = np.empty((min(rows, bounds[0][1] - first), *shape[1:]), dtype)
                    self._pread(fd, block, begin + first * strides[0], key)
                    done = first - bounds[0][0]
                    out[done:done + len(block)] = block[(slice(None), *index[1:])]
                return out
            runs = out.reshape(-1, math.prod(out.shape[lead:]))  # [number of runs, elements per run]
            begin += bounds[lead][0] * strides[lead] if shape else 0
            for run, outer in zip(runs, itertools.product(*(range(a, b) for a, b in bounds[:lead]))):
                self._pread(fd, run, begin + sum(i * st for i, st in zip(outer, strides)), key)
        finally:
            os.close(fd)
        return out

    def _pread(self, fd: int, into: np.ndarray, offset: int, key: str) -> None:
        buf = memoryview(into.reshape(-1).view(np.uint8))
        got = os.preadv(fd, [buf], offset)
        if got != len(buf):
            raise CheckpointError(f"{self.path}: short read of tensor {key!r} ({got} of {len(buf)} bytes)")

    def close(self):
        if self._mmap is not None:
            with contextlib.suppress(BufferError):  # arrays still view the map: unmapped when the last one is freed
                self._mmap.close()
            self._mmap = None


class SafetensorsCheckpoint:
    """All tensors of an HF checkpoint directory (single file or sharded with an index), opened lazily."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        index_path = self.directory / INDEX_NAME
        if index_path.exists():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as err:
                raise CheckpointError(f"{index_path}: malformed index ({err})") from err
            missing = sorted({f for f in weight_map.values() if not (self.directory / f).exists()})
            if missing:
                raise CheckpointError(f"{index_path}: shard file(s) {missing} listed in the index are missing "
                                      f"from {self.directory}")
            self.key_to_file = dict(weight_map)
        elif (self.directory / SINGLE_NAME).exists():
            self.key_to_file = {k: SINGLE_NAME for k in SafetensorsFile(self.directory / SINGLE_NAME).keys()}
        else:
            raise CheckpointError(f"{self.directory}: no {SINGLE_NAME} or {INDEX_NAME} found")
        self._files: dict[str, SafetensorsFile] = {}

    def _file(self, name: str) -> SafetensorsFile:
        if name not in self._files:
            self._files[name] = SafetensorsFile(self.directory / name)
        return self._files[name]

    def keys(self):
        return self.key_to_file.keys()

    def __contains__(self, key: str) -> bool:
        return key in self.key_to_file

    def where(self, key: str) -> Path:
        return self.directory / self.key_to_file[key]

    def _file_of(self, key: str) -> SafetensorsFile:
        if key not in self.key_to_file:
            raise CheckpointError(f"{self.directory}: tensor {key!r} is missing from the checkpoint")
        f = self._file(self.key_to_file[key])
        if key not in f.entries:
            raise CheckpointError(f"{f.path}: tensor {key!r} (listed in the index) is not in this file")
        return f

    def shape(self, key: str) -> tuple[int, ...]:
        return self._file_of(key).shape(key)

    def read(self, key: str) -> np.ndarray:
        return self._file_of(key).read(key)

    def read_slice(self, key: str, index: tuple[slice, ...]) -> np.ndarray:
        return self._file_of(key).read_slice(key, index)

    def close(self):
        for f in self._files.values():
            f.close()
        self._files.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
