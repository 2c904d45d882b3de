"""Declarative HF <-> m2d_jax key maps, written once and used in both directions.

A ``Rule`` ties one HF tensor key template to one or more parameter paths of the m2d_jax tree, with an invertible
``Transform`` between the HF tensor and the parameter slice(s); ``to_m2d_slice`` is the same map for one rectangular
piece of a parameter slice, reading only the part of the HF tensor it needs (a sharded import). Layer rules are
instantiated per layer (``{layer}``) and, for per-expert HF layouts, per expert (``{expert}``); the parameter slice
is then ``param[layer_in_stack]`` or ``param[layer_in_stack, expert]``.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from typing import Callable, Sequence

import numpy as np

Path = tuple  # a parameter path in the nnx state, e.g. ("attn", "q_proj", "kernel")
Index = tuple  # one ``slice`` per axis of an array
Reader = Callable[[Index], np.ndarray]  # hf_index -> the HF tensor's [hf_index], read from disk


def _range(s: slice, n: int) -> tuple[int, int]:
    return s.indices(n)[:2]


def _flat_block(index: Index, shape: tuple[int, ...]) -> tuple[slice, tuple[int, ...], Index]:
    """Axes ``shape`` flattened (C order): the flat range of ``index``'s range on the first axis with the other axes
    whole, that block's shape, and the index that cuts ``index`` out of the block."""
    a, b = _range(index[0], shape[0])
    rest = math.prod(shape[1:])
    return slice(a * rest, b * rest), (b - a, *shape[1:]), (slice(None), *index[1:])


class Transform(abc.ABC):
    """Maps one HF tensor to parameter slices (``to_m2d``) and back (``to_hf``)."""

    @abc.abstractmethod
    def hf_shape(self, shapes: Sequence[tuple[int, ...]]) -> tuple[int, ...]:
        """The HF tensor shape that corresponds to parameter slices of these shapes."""

    @abc.abstractmethod
    def to_m2d(self, tensor: np.ndarray, shapes: Sequence[tuple[int, ...]]) -> tuple[np.ndarray, ...]:
        """HF tensor -> one array per parameter path, of the given shapes."""

    @abc.abstractmethod
    def to_hf(self, arrays: Sequence[np.ndarray]) -> np.ndarray:
        """Parameter slices -> the HF tensor."""

    def to_m2d_slice(self, read: Reader, shapes: Sequence[tuple[int, ...]], component: int,
                     index: Index) -> np.ndarray:
        """``to_m2d(tensor, shapes)[component][index]``, reading through ``read(hf_index)`` only the part of the HF
        tensor it needs (``index``: one slice per axis of ``shapes[component]``). This default reads the whole
        tensor; a transform of large tensors overrides it."""
        whole = read(tuple(slice(None) for _ in self.hf_shape(shapes)))
        return self.to_m2d(whole, shapes)[component][index]


@dataclasses.dataclass(frozen=True)
class Same(Transform):
    """The parameter slice is the HF tensor (norm scales, embeddings)."""

    def hf_shape(self, shapes):
        return tuple(shapes[0])

    def to_m2d(self, tensor, shapes):
        return (tensor,)

    def to_hf(self, arrays):
        return arrays[0]

    def to_m2d_slice(self, read, shapes, component, index):
        return read(index)


@dataclasses.dataclass(frozen=True)
class Flat(Transform):
    """A flat HF vector <-> a multi-axis parameter, e.g. a q_proj bias [heads*head_dim] <-> [heads, head_dim]."""

    def hf_shape(self, shapes):
        return (math.prod(shapes[0]),)

    def to_m2d(self, tensor, shapes):
        return (tensor.reshape(shapes[0]),)

    def to_hf(self, arrays):
        return arrays[0].reshape(-1)


@dataclasses.dataclass(frozen=True)
class Linear(Transform):
    """torch ``nn.Linear`` weight [out, in] <-> kernel [*in_axes, *out_axes] (``n_in`` leading input axes)."""
    n_in: int = 1

    def hf_shape(self, shapes):
        s = shapes[0]
        return (math.prod(s[self.n_in:]), math.prod(s[:self.n_in]))

    def to_m2d(self, tensor, shapes):
        return (tensor.T.reshape(shapes[0]),)

    def to_hf(self, arrays):
        a = arrays[0]
        return a.reshape(math.prod(a.shape[:self.n_in]), -1).T

    def to_m2d_slice(self, read, shapes, component, index):
        s, n = shapes[0], self.n_in
        in_range, in_shape, in_cut = _flat_block(index[:n], s[:n])
        out_range, out_shape, out_cut = _flat_block(index[n:], s[n:])
        return read((out_range, in_range)).T.reshape(in_shape + out_shape)[in_cut + out_cut]


@dataclasses.dataclass(frozen=True)
class FusedGateUp(Transform):
    """transformers-v5 in-memory experts ``gate_up_proj`` [E, 2I, H] <-> gate, up kernels [E, H, I] each."""

    def hf_shape(self, shapes):
        e, h, i = shapes[0]
        return (e, 2 * i, h)

    def to_m2d(self, tensor, shapes):
        i = shapes[0][2]
        return tensor[:, :i].swapaxes(1, 2), tensor[:, i:].swapaxes(1, 2)

    def to_hf(self, arrays):
        return np.concatenate([a.swapaxes(1, 2) for a in arrays], axis=1)

    def to_m2d_slice(self, read, shapes, component, index):
        width = shapes[0][2]
        a, b = _range(index[2], width)
        return read((index[0], slice(component * width + a, component * width + b), index[1])).swapaxes(1, 2)


@dataclasses.dataclass(frozen=True)
class StackedLinear(Transform):
    """Stacked torch weights [E, out, in] <-> kernels [E, in, out]."""

    def hf_shape(self, shapes):
        e, i, o = shapes[0]
        return (e, o, i)

    def to_m2d(self, tensor, shapes):
        return (tensor.swapaxes(1, 2),)

    def to_hf(self, arrays):
        return arrays[0].swapaxes(1, 2)

    def to_m2d_slice(self, read, shapes, component, index):
        return read((index[0], index[2], index[1])).swapaxes(1, 2)


@dataclasses.dataclass(frozen=True)
class InterleavedGateUp(Transform):
    """GPT-OSS ``gate_up_proj`` [..., 2I] with gate = even, up = odd columns <-> gate, up [..., I] each (kernels
    [E, H, I] from [E, H, 2I]; biases [E, I] from [E, 2I])."""

    def hf_shape(self, shapes):
        return tuple(shapes[0][:-1]) + (2 * shapes[0][-1],)

    def to_m2d(self, tensor, shapes):
        return tensor[..., 0::2], tensor[..., 1::2]

    def to_hf(self, arrays):
        gate, up = arrays
        return np.stack([gate, up], axis=-1).reshape(gate.shape[:-1] + (-1,))

    def to_m2d_slice(self, read, shapes, component, index):
        a, b = _range(index[-1], shapes[0][-1])
        return read((*index[:-1], slice(2 * a, 2 * b)))[..., component::2]


@dataclasses.dataclass(frozen=True)
class RouterUnusedRows(Transform):
    """A router weight [E + unused, in] whose last ``unused`` rows never change the output <-> kernel [in, E].

    FlexOlmo's pre-norm variant with one shared expert: its logit is the last row, and its weight is a softmax over
    that one logit, exactly 1 whatever the row holds; the model keeps the routed rows, export writes zeros there.
    """
    unused: int = 1

    def hf_shape(self, shapes):
        d, e = shapes[0]
        return (e + self.unused, d)

    def to_m2d(self, tensor, shapes):
        return (tensor[:shapes[0][1]].T,)

    def to_hf(self, arrays):
        kernel = arrays[0]  # [in, E]
        return np.concatenate([kernel.T, np.zeros((self.unused, kernel.shape[0]), kernel.dtype)])


@dataclasses.dataclass(frozen=True)
class Rule:
    """``hf`` is a key template: ``{layer}`` = global layer index, ``{expert}`` = expert index, ``{num_routed}`` =
    the layer's real routed-expert count E_l. With per-layer expert counts, a per-expert rule has keys for the
    layer's E_l real experts only, and a rule with ``expert_axis`` (the axis of its parameter slices that indexes
    experts, e.g. 1 of a router kernel [in, E]) an HF tensor of E_l experts; the padded rest is zeros on import and
    not written on export."""
    hf: str
    paths: tuple[Path, ...]  # parameter paths, relative to the model (global rules) or to a layer (layer rules)
    transform: Transform = Same()
    expert_axis: int | None = None

    @property
    def per_expert(self) -> bool:
        return "{expert}" in self.hf


def rule(hf: str, *paths: str, transform: Transform = Same(), expert_axis: int | None = None) -> Rule:
    """``rule("model.norm.weight", "final_norm/scale")``: paths written with slashes."""
    return Rule(hf, tuple(tuple(p.split("/")) for p in paths), transform, expert_axis)
