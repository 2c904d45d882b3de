"""MXFP4 (OCP microscaling FP4) expert weights as stored in real GPT-OSS releases.

``X_blocks`` uint8 [..., rows, G, 16] packs 32 E2M1 values per group (low nibble = even element, high nibble = odd
element); ``X_scales`` uint8 [..., rows, G] holds one power-of-two exponent per group, biased by 127. The dequantized
tensor is ``[..., rows, G*32]`` with the last two axes swapped (transformers' layout: [E, H, 2I] for gate_up).
Every MXFP4 value times its power of two is exact in float32 and bfloat16.
"""

from __future__ import annotations

import numpy as np

E2M1_VALUES = np.array([+0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
                       np.float32)


def dequantize_mxfp4(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """blocks uint8 [E, R, G, B], scales uint8 [E, R, G] -> float32 [E, G*B*2, R]."""
    if blocks.shape[:-1] != scales.shape:
        raise ValueError(f"MXFP4 blocks {blocks.shape} and scales {scales.shape} do not match")
    e, r, g, b = blocks.shape
    out = np.empty((e, g * b * 2, r), np.float32)
    for i in range(e):  # one expert at a time keeps the float32 temporaries small
        values = np.stack([E2M1_VALUES[blocks[i] & 0x0F], E2M1_VALUES[blocks[i] >> 4]], axis=-1)  # [R, G, B, 2]
        values = np.ldexp(values.reshape(r, g, b * 2), scales[i].astype(np.int32)[..., None] - 127)
        out[i] = values.reshape(r, g * b * 2).T
    return out


class MXFP4Checkpoint:
    """A checkpoint view where every ``X_blocks`` + ``X_scales`` pair reads as the dequantized tensor ``X``."""

    def __init__(self, ckpt):
        self.ckpt = ckpt
        keys = set(ckpt.keys())
        self.quantized = {k[: -len("_blocks")] for k in keys if k.endswith("_blocks") and
                          k[: -len("_blocks")] + "_scales" in keys}
        hidden = {q + s for q in self.quantized for s in ("_blocks", "_scales")}
        self._keys = (keys - hidden) | self.quantized

    def keys(self):
        return self._keys

    def __contains__(self, key: str) -> bool:
        return key in self._keys

    def where(self, key: str):
        return self.ckpt.where(key + "_blocks" if key in self.quantized else key)

    def shape(self, key: str) -> tuple[int, ...]:
        if key in self.quantized:
            e, r, g, b = self.ckpt.shape(key + "_blocks")
            return e, g * b * 2, r
        return self.ckpt.shape(key)

    def read(self, key: str) -> np.ndarray:
        if key in self.quantized:
            return dequantize_mxfp4(self.ckpt.read(key + "_blocks"), self.ckpt.read(key + "_scales"))
        return self.ckpt.read(key)

    def read_slice(self, key: str, index: tuple[slice, ...]) -> np.ndarray:
        """``read(key)[index]``, dequantizing only the groups of 32 values that the slice touches."""
        if key not in self.quantized:
            return self.ckpt.read_slice(key, index)
        e, r, g, b = self.ckpt.shape(key + "_blocks")
        experts, cols, rows = index  # of the dequantized [E, G*B*2, R]
        start, stop = cols.indices(g * b * 2)[:2]
        groups = slice(start // (2 * b), -(-stop // (2 * b)))  # the groups covering columns start..stop
        values = dequantize_mxfp4(self.ckpt.read_slice(key + "_blocks", (experts, rows, groups, slice(None))),
                                  self.ckpt.read_slice(key + "_scales", (experts, rows, groups)))
        offset = groups.start * 2 * b
        return values[:, start - offset:stop - offset]

    def close(self):
        self.ckpt.close()
