"""Streaming, sharded HF import (and its inverse, the HF tensor view of a model used by export).

Import walks the parameter leaves of the abstract model one at a time and builds each with
``jax.make_array_from_callback`` under its sharding (the loader's ``sharding``, default: this process's first
device): for every shard that this process's devices own, the callback reads from safetensors only that shard's
part of each HF tensor (positioned reads, no mapping), through the key map's per-slice transforms
(``Transform.to_m2d_slice``: transposes, splits of fused / interleaved tensors, MXFP4 dequantized per group), and
converts it to the parameter dtype. An expert-sharded leaf reads only its experts' keys. Peak host memory is one
leaf's local shards beyond the placed parameters; no process ever holds the full model unless it owns all of it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Callable, Iterator

import jax
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from m2d_jax.distributed import to_host
from m2d_jax.errors import CheckpointError
from m2d_jax.hf.adapters import IGNORED_KEY_SUFFIXES, DecoderAdapter, adapter_for
from m2d_jax.hf.keymap import Rule
from m2d_jax.hf.mxfp4 import MXFP4Checkpoint
from m2d_jax.hf.safetensors_io import SafetensorsCheckpoint
from m2d_jax.models import CausalLM, ModelConfig, RuntimeConfig, abstract_model, load_runtime

HF_IMPORT_DTYPE = "float32"  # parameter dtype of an HF import unless the loader is given one

log = logging.getLogger(__name__)


def read_hf_config(path: str | Path) -> tuple[dict, str]:
    config_path = Path(path) / "config.json"
    if not config_path.exists():
        raise CheckpointError(f"{path}: no config.json (expected an HF checkpoint directory)")
    try:
        return json.loads(config_path.read_text()), str(config_path)
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{config_path}: malformed JSON ({err})") from err


def hf_model_config(path: str | Path) -> ModelConfig:
    """The architecture (``ModelConfig``) of an HF checkpoint directory (reads config.json only)."""
    hf, source = read_hf_config(path)
    return adapter_for(hf.get("model_type"), source).config_from_hf(hf, source)


@dataclasses.dataclass(frozen=True, eq=False)
class _Placement:
    """Where a rule's parameter slices live: the global tree, or one scanned stack (layers start..start+num)."""
    rule: Rule
    prefix: tuple = ()
    start: int | None = None  # first global layer of the stack; None for global rules
    num: int = 0
    layer_experts: tuple[int, ...] = ()  # real routed experts E_l of each layer of the stack (0 in dense layers)

    def slices(self):
        """(hf_key, index into the leaf) for every HF tensor of this rule: per-expert rules have keys for the
        layer's E_l real experts only (the padded rest has none)."""
        if self.start is None:
            yield self.rule.hf, ()
            return
        for local in range(self.num):
            layer, real = self.start + local, self.layer_experts[local]
            if self.rule.per_expert:
                for e in range(real):
                    yield self.rule.hf.format(layer=layer, expert=e, num_routed=real), (local, e)
            else:
                yield self.rule.hf.format(layer=layer, num_routed=real), (local,)

    def real_experts(self, index: tuple) -> int | None:
        """E_l of the layer of a slice ``index`` (None for global rules)."""
        return self.layer_experts[index[0]] if index else None

    def real_shapes(self, shapes: list[tuple[int, ...]], real: int | None) -> list[tuple[int, ...]]:
        """The rule's slice shapes cut to a layer's ``real`` experts on its ``expert_axis`` (what the HF tensor
        holds)."""
        axis = self.rule.expert_axis
        return shapes if axis is None else [s[:axis] + (real,) + s[axis + 1:] for s in shapes]

    def real_part(self, array: np.ndarray, real: int | None) -> np.ndarray:
        """One layer's parameter slice without its padded experts (the export direction of ``real_shapes``)."""
        axis = self.rule.expert_axis
        return array if axis is None else array[(slice(None),) * axis + (slice(0, real),)]


def _placements(model_config: ModelConfig, adapter: DecoderAdapter, expert_layout: str
                ) -> dict[tuple, tuple[_Placement, int]]:
    """Full leaf path -> (placement, component index of the rule's transform output)."""
    out: dict[tuple, tuple[_Placement, int]] = {}
    for r in adapter.global_rules(model_config):
        for i, p in enumerate(r.paths):
            out[p] = (_Placement(r, ()), i)
    layer_experts = model_config.layer_experts
    for s, (kind, start, num) in enumerate(model_config.stacks):
        prefix = ("stacks", s)
        for r in adapter.layer_rules(model_config, kind, expert_layout):
            placement = _Placement(r, prefix, start, num, layer_experts[start:start + num])
            for i, p in enumerate(r.paths):
                out[prefix + p] = (placement, i)
    return out


def _leaf_shapes(placement: _Placement, abs_leaves: dict) -> list[tuple[int, ...]]:
    """Shapes of one slice of each of the rule's parameters (leaf shape without the stacked axes)."""
    n_index = 0 if placement.start is None else (2 if placement.rule.per_expert else 1)
    return [tuple(abs_leaves[placement.prefix + p].shape[n_index:]) for p in placement.rule.paths]


def _detect_expert_layout(ckpt: SafetensorsCheckpoint, model_config: ModelConfig, adapter: DecoderAdapter) -> str:
    layouts = adapter.expert_layouts
    if not model_config.moe_layers:
        return layouts[0]
    for layout in layouts:
        probe = next(r for r in adapter.layer_rules(model_config, "moe", layout) if ".experts." in r.hf)
        if probe.hf.format(layer=model_config.moe_layers[0], expert=0) in ckpt:
            return layout
    return layouts[0]  # let the missing-key error name the expected key


def _check_shapes(ckpt, placements: dict, abs_leaves: dict, source: str) -> set[str]:
    """Every HF key the parameters need, checked against config.json's shapes (headers only, before any read)."""
    used: set[str] = set()
    for placement, _ in {id(p): (p, c) for p, c in placements.values()}.values():
        shapes = _leaf_shapes(placement, abs_leaves)
        for key, index in placement.slices():
            layer_shapes = placement.real_shapes(shapes, placement.real_experts(index))
            expected = tuple(placement.rule.transform.hf_shape(layer_shapes))
            shape = tuple(ckpt.shape(key))
            if shape != expected:
                raise CheckpointError(f"{ckpt.where(key)}: tensor {key!r} has shape {shape}, expected {expected} "
                                      f"from {source}")
            used.add(key)
    return used


def _leaf_reader(ckpt, placement: _Placement, component: int, abs_leaves: dict, struct: jax.ShapeDtypeStruct
                 ) -> Callable[[tuple], np.ndarray]:
    """``index -> leaf[index]`` (a tuple of slices over the leaf) read from the checkpoint: only the HF keys of
    the stacked layers / experts in ``index`` and only their parts in the rest of ``index``; padded experts (per-layer
    expert counts) are zeros. Shards that several devices hold alike are read once."""
    shapes = _leaf_shapes(placement, abs_leaves)
    n_stacked = len(struct.shape) - len(shapes[component])
    transform = placement.rule.transform
    read_once: dict[tuple, np.ndarray] = {}

    def read(index: tuple) -> np.ndarray:
        bounds = tuple(s.indices(n)[:2] for s, n in zip(index, struct.shape))
        if bounds in read_once:
            return read_once[bounds]
        out = np.zeros([b - a for a, b in bounds], struct.dtype)
        stacked, inner = bounds[:n_stacked], tuple(slice(a, b) for a, b in bounds[n_stacked:])
        axis = placement.rule.expert_axis
        for key, position in placement.slices():  # position: (layer in stack[, expert]) or () for global rules
            if all(a <= p < b for p, (a, b) in zip(position, stacked)):
                target = tuple(p - a for p, (a, _) in zip(position, stacked))
                part, real = inner, placement.real_experts(position)
                if axis is not None:  # only the layer's real experts are in the HF tensor; the rest stays 0
                    first, end = inner[axis].start, min(inner[axis].stop, real)
                    if end <= first:
                        continue
                    part = inner[:axis] + (slice(first, end),) + inner[axis + 1:]
                    target = target + (slice(None),) * axis + (slice(0, end - first),)
                out[target] = transform.to_m2d_slice(lambda hf_index: ckpt.read_slice(key, hf_index),
                                                     placement.real_shapes(shapes, real), component, part)
        read_once[bounds] = out
        return out

    return read


def load_hf(path: str | Path, *, dtype: str | None = None, progress: bool = True, sharding: Callable | None = None,
            runtime: RuntimeConfig | None = None, **runtime_fields) -> CausalLM:
    """Import an HF safetensors checkpoint directory into a ``CausalLM``.

    The loader flags are those of every loader (``m2d_jax.from_pretrained``): ``dtype`` is the parameter and compute
    dtype (default float32); ``runtime`` or runtime field keywords (``moe_dispatch="dense"``, ``top_k=4``...) choose
    how the model runs (``load_runtime``); ``sharding(path, abstract) -> Sharding`` places each parameter leaf
    (``path`` a tuple of keys such as ``("stacks", 0, "moe", "gate_proj")``; default: this process's first device)
    and each process reads only the parts of the checkpoint its devices own; ``progress`` shows a progress bar.
    """
    path = Path(path)
    runtime = load_runtime(HF_IMPORT_DTYPE, dtype, runtime, **runtime_fields)
    hf, source = read_hf_config(path)
    adapter = adapter_for(hf.get("model_type"), source)
    model_config = adapter.config_from_hf(hf, source)
    abs_model = abstract_model(model_config, runtime)
    graphdef, abs_state = nnx.split(abs_model)
    abs_vars = {tuple(k): v for k, v in abs_state.flat_state()}
    abs_leaves = {k: v.get_value() for k, v in abs_vars.items()}

    with SafetensorsCheckpoint(path) as files:
        quantized = (hf.get("quantization_config") or {}).get("quant_method") == "mxfp4"
        ckpt = MXFP4Checkpoint(files) if quantized else files
        layout = _detect_expert_layout(ckpt, model_config, adapter)
        placements = _placements(model_config, adapter, layout)
        unmapped = sorted(set(abs_leaves) - set(placements))
        if unmapped:  # a bug in an adapter, not in the user's files
            raise RuntimeError(f"adapter {type(adapter).__name__} maps no HF key to parameters {unmapped}")
        used = _check_shapes(ckpt, placements, abs_leaves, source)
        default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        values = {}
        total_bytes = sum(np.dtype(a.dtype).itemsize * int(np.prod(a.shape)) for a in abs_leaves.values())
        bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc=f"import {path.name}", disable=not progress)
        for leaf_path, abstract in abs_leaves.items():
            struct = jax.ShapeDtypeStruct(abstract.shape, abstract.dtype)
            leaf_sharding = default if sharding is None else sharding(leaf_path, struct)
            values[leaf_path] = jax.make_array_from_callback(
                abstract.shape, leaf_sharding, _leaf_reader(ckpt, *placements[leaf_path], abs_leaves, struct))
            bar.update(np.dtype(abstract.dtype).itemsize * int(np.prod(abstract.shape)))
        bar.close()
        unexpected = sorted(k for k in set(ckpt.keys()) - used if not k.endswith(IGNORED_KEY_SUFFIXES))
        if unexpected:
            shown = ", ".join(f"{k!r} ({ckpt.where(k).name})" for k in unexpected[:5])
            raise CheckpointError(f"{path}: {len(unexpected)} tensor(s) not used by the {model_config.family} "
                                  f"config in {source}: {shown}{' ...' if len(unexpected) > 5 else ''}")
    state = nnx.State.from_flat_path({k: abs_vars[k].replace(v) for k, v in values.items()})
    return nnx.merge(graphdef, state)


def hf_tensors(model: CausalLM, expert_layout: str = "per_expert") -> Iterator[tuple[str, np.ndarray]]:
    """The model as HF tensors (key, array) in the family's hub layout: the export direction of the key map.

    Parameters sharded across processes are gathered one leaf at a time (a collective: in a multi-process run every
    process iterates this generator in the same order)."""
    config = model.config
    adapter = adapter_for(config.family, "model.config")
    leaves = {tuple(k): v.get_value() for k, v in nnx.state(model).flat_state()}
    seen: set[int] = set()
    for placement, _ in _placements(config, adapter, expert_layout).values():
        if id(placement) in seen:
            continue
        seen.add(id(placement))
        arrays = [to_host(leaves[placement.prefix + p]) for p in placement.rule.paths]
        for key, index in placement.slices():
            real = placement.real_experts(index)
            yield key, placement.rule.transform.to_hf([placement.real_part(a[index], real) for a in arrays])
