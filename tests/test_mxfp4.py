"""MXFP4 expert weights (real GPT-OSS releases): dequantization is bit-identical to transformers' own conversion,
and an MXFP4 checkpoint imports to the same logits as its dequantized float checkpoint."""

import json
import shutil

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import torch

import m2d_jax
from m2d_jax.hf import SafetensorsCheckpoint
from m2d_jax.hf.mxfp4 import dequantize_mxfp4
from m2d_jax.hf.oracle import make_hf_checkpoint, padded_batch, reference_logits

E2M1 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])  # magnitudes; codes 8..15 are the negatives


def quantize_mxfp4(w: np.ndarray):
    """From the OCP MX definition: groups of 32 along the last axis share a power-of-two scale 2^s chosen so the
    group's max |x| / 2^s <= 6; each value is rounded to the nearest E2M1 magnitude, sign in bit 3; two 4-bit codes
    per byte, the even element in the low nibble. w [..., R, C] -> blocks uint8 [..., R, C/32, 16], scales uint8."""
    *lead, cols = w.shape
    groups = w.reshape(*lead, cols // 32, 32).astype(np.float64)
    peak = np.max(np.abs(groups), axis=-1, keepdims=True)
    exponent = np.ceil(np.log2(np.maximum(peak, 1e-30) / 6.0)).astype(np.int32)
    scaled = groups / np.exp2(exponent)
    code = np.argmin(np.abs(np.abs(scaled)[..., None] - E2M1), axis=-1) + 8 * (scaled < 0)
    code = code.astype(np.uint8)
    blocks = (code[..., 0::2] | (code[..., 1::2] << 4)).astype(np.uint8)
    return blocks, np.ascontiguousarray(exponent[..., 0] + 127, dtype=np.uint8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantize_is_bit_identical_to_transformers(dtype):
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    rng = np.random.default_rng(0)
    w = rng.normal(size=(3, 10, 64)).astype(np.float32) * np.exp2(rng.integers(-6, 4, size=(3, 10, 1)))
    blocks, scales = quantize_mxfp4(w)
    ours = dequantize_mxfp4(blocks, scales)  # [3, 64, 10]
    theirs = convert_moe_packed_tensors(torch.from_numpy(blocks), torch.from_numpy(scales), dtype=dtype)
    assert ours.shape == tuple(theirs.shape) == (3, 64, 10)
    # bit-identical in the reference's dtype: compare the raw bit patterns
    target = np.float32 if dtype == torch.float32 else ml_dtypes.bfloat16
    bits = np.uint32 if dtype == torch.float32 else np.uint16
    theirs_np = theirs.view(torch.int32 if dtype == torch.float32 else torch.int16).numpy().view(bits)
    np.testing.assert_array_equal(ours.astype(target).view(bits), theirs_np)
    # and the round trip is a real quantization: rounding moves a value by at most half the widest E2M1 gap
    # (4 -> 6) at scale 2^s < 2 * max / 6, i.e. by at most max / 3
    group_max = np.abs(w.reshape(3, 10, 2, 32)).max(-1, keepdims=True)
    assert (np.abs(ours.swapaxes(1, 2) - w).reshape(3, 10, 2, 32) <= group_max / 3 + 1e-6).all()


def test_mxfp4_checkpoint_imports_like_its_dequantized_twin(tmp_path):
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    cfg = dict(model_type="gpt_oss", vocab_size=128, hidden_size=64, intermediate_size=32, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
               sliding_window=6, max_position_embeddings=256,
               rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    src = make_hf_checkpoint(cfg, tmp_path / "float", seed=3, init_std=0.1)
    quant, twin = tmp_path / "mxfp4", tmp_path / "dequantized"
    for d in (quant, twin):
        d.mkdir()
        for f in src.iterdir():
            if f.suffix == ".json":
                shutil.copy(f, d / f.name)
    with SafetensorsCheckpoint(src) as ckpt:
        tensors = {k: np.array(ckpt.read(k)) for k in ckpt.keys()}
    quantized, dequantized = {}, {}
    for key, value in tensors.items():
        if key.endswith(("experts.gate_up_proj", "experts.down_proj")):
            blocks, scales = quantize_mxfp4(value.swapaxes(1, 2))  # stored [E, out, in/32, 16]
            quantized[key + "_blocks"], quantized[key + "_scales"] = blocks, scales
            dequantized[key] = convert_moe_packed_tensors(torch.from_numpy(blocks), torch.from_numpy(scales),
                                                          dtype=torch.float32).numpy()
        else:
            quantized[key] = dequantized[key] = value
    safetensors.numpy.save_file(quantized, quant / "model.safetensors")
    safetensors.numpy.save_file(dequantized, twin / "model.safetensors")
    config = json.loads((quant / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["router", "attn", "lm_head"]}
    (quant / "config.json").write_text(json.dumps(config))

    model = m2d_jax.from_pretrained(quant, progress=False)
    ids, mask = padded_batch(128, 2, 14, 0)
    want = reference_logits(twin, ids, mask)
    valid = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(model(ids, mask))[valid], want[valid], atol=1e-4)
    from m2d_jax.cli import main

    from m2d_jax.info import load_config
    assert "mxfp4 experts" in load_config(quant)[1]
    assert main(["info", str(quant)]) == 0
