"""Streaming import: safetensors reader, bidirectional key map, layouts, structure, and clear errors on bad input."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch

import m2d_jax
import m2d_jax.pipeline
from m2d_jax.cli import main as m2d_main
from m2d_jax.hf import CheckpointError, SafetensorsCheckpoint, hf_tensors
from m2d_jax.hf.oracle import load_reference, padded_batch, reference_logits
from m2d_jax.hf.safetensors_io import SafetensorsFile


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_reader_matches_safetensors_library(tmp_path):
    import torch

    rng = np.random.default_rng(0)
    tensors = {"f32": rng.normal(size=(3, 5)).astype(np.float32), "i64": np.arange(7), "u8": np.arange(6, dtype=np.uint8).reshape(2, 3),
               "f16": rng.normal(size=(4,)).astype(np.float16)}
    safetensors.numpy.save_file(tensors, tmp_path / "a.safetensors")
    f = SafetensorsFile(tmp_path / "a.safetensors")
    for k, v in tensors.items():
        np.testing.assert_array_equal(f.read(k), v)
        assert f.read(k).dtype == v.dtype
    bf = torch.randn(3, 4).to(torch.bfloat16)
    safetensors.torch.save_file({"bf": bf}, tmp_path / "b.safetensors")
    got = SafetensorsFile(tmp_path / "b.safetensors").read("bf")
    np.testing.assert_array_equal(got.astype(np.float32), bf.float().numpy())


@pytest.mark.parametrize("name", ["moe_gqa_norm_mlponly", "moe_top1_bias_sharded", "dense_sliding_layers",
                                  "moe_mha_tied_sparsestep"])
def test_key_map_round_trip_is_lossless(hf_checkpoint, name):
    """Import then the export direction of the same key map reproduces every on-disk tensor bit for bit."""
    path = hf_checkpoint(name)
    model = m2d_jax.from_pretrained(path)
    exported = dict(hf_tensors(model))
    with SafetensorsCheckpoint(path) as ckpt:
        assert set(exported) == set(ckpt.keys())
        for key, value in exported.items():
            np.testing.assert_array_equal(value, ckpt.read(key), err_msg=key)


def test_fused_expert_layout_imports(hf_checkpoint, tmp_path):
    """transformers-v5 in-memory layout (experts.gate_up_proj / experts.down_proj) on disk imports identically."""
    src = hf_checkpoint("moe_gqa_norm_mlponly")
    ref = load_reference(src)
    fused = {k: v.detach().contiguous() for k, v in ref.state_dict().items()}
    assert any(k.endswith("experts.gate_up_proj") for k in fused)
    dst = tmp_path / "fused"
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    safetensors.torch.save_file(fused, dst / "model.safetensors")
    model = m2d_jax.from_pretrained(dst)
    ids, mask = padded_batch(model.config.vocab_size, 2, 12, 0)
    np.testing.assert_allclose(np.asarray(model(ids, mask))[mask.astype(bool)],
                               reference_logits(ref, ids, mask)[mask.astype(bool)], atol=1e-4)


def test_params_are_scanned_and_carry_logical_axes(hf_checkpoint):
    from flax import nnx

    model = m2d_jax.from_pretrained(hf_checkpoint("moe_gqa_norm_mlponly"))
    assert [s[0] for s in model.config.stacks] == ["moe", "dense", "moe"]
    for path, var in nnx.state(model, nnx.Param).flat_state():
        axes = var.get_metadata()["out_sharding"]
        assert len(axes) == var.get_value().ndim, path
        assert (axes[0] == "layers") == (path[0] == "stacks"), path
    moe = model.stacks[0].moe
    assert moe.gate_proj.get_metadata()["out_sharding"] == ("layers", "exp", "embed", "mlp")
    assert moe.gate_proj.get_value().shape == (1, 8, 64, 32)


def _import_error(tmp_path, hf_dir, match):
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match=match):
        m2d_jax.pipeline.import_checkpoint(hf_dir, out)
    assert not out.exists()
    assert not list(tmp_path.glob(".out.tmp-*"))  # nothing half-written left behind
    assert m2d_main(["import", str(hf_dir), str(out)]) == 2
    assert not out.exists()


def test_missing_shard(hf_checkpoint, tmp_path):
    d = _copy(hf_checkpoint("moe_top1_bias_sharded"), tmp_path / "ckpt")
    shard = sorted(d.glob("model-*.safetensors"))[-1]
    shard.unlink()
    _import_error(tmp_path, d, f"{shard.name}.*missing")


def test_truncated_file(hf_checkpoint, tmp_path):
    d = _copy(hf_checkpoint("moe_mha_tied_sparsestep"), tmp_path / "ckpt")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    _import_error(tmp_path, d, "model.safetensors: truncated")


def test_unknown_model_type(hf_checkpoint, tmp_path):
    d = _copy(hf_checkpoint("moe_mha_tied_sparsestep"), tmp_path / "ckpt")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "llama_moe_xl"
    (d / "config.json").write_text(json.dumps(cfg))
    _import_error(tmp_path, d, "config.json: unsupported model_type 'llama_moe_xl'")


def test_shape_mismatch_names_key(hf_checkpoint, tmp_path):
    d = _copy(hf_checkpoint("moe_gqa_norm_mlponly"), tmp_path / "ckpt")
    cfg = json.loads((d / "config.json").read_text())
    cfg["moe_intermediate_size"] = 40
    (d / "config.json").write_text(json.dumps(cfg))
    _import_error(tmp_path, d, r"model\.safetensors: tensor 'model\.layers\.0\.mlp\.experts\.0\.\w+_proj\.weight' "
                               r"has shape \((32, 64|64, 32)\), expected \((40, 64|64, 40)\) from .*config\.json")


def test_unsupported_rope_scaling(hf_checkpoint, tmp_path):
    d = _copy(hf_checkpoint("moe_gqa_norm_mlponly"), tmp_path / "ckpt")
    cfg = json.loads((d / "config.json").read_text())
    cfg.pop("rope_parameters", None)
    cfg["rope_theta"], cfg["rope_scaling"] = 10000.0, {"type": "dynamic", "factor": 2.0}
    (d / "config.json").write_text(json.dumps(cfg))
    _import_error(tmp_path, d, "rope_scaling.*unsupported RoPE type 'dynamic'")


def test_unexpected_tensor(hf_checkpoint, tmp_path):
    d = _copy(hf_checkpoint("moe_top1_bias_sharded"), tmp_path / "ckpt")
    cfg = json.loads((d / "config.json").read_text())
    cfg["attention_bias"] = False  # the files still hold q/k/v/o biases
    (d / "config.json").write_text(json.dumps(cfg))
    _import_error(tmp_path, d, r"not used by the qwen3_moe config.*self_attn\.\w_proj\.bias")


def test_missing_config(tmp_path):
    (tmp_path / "empty").mkdir()
    _import_error(tmp_path, tmp_path / "empty", "no config.json")


def test_hub_style_config_json(hf_checkpoint, tmp_path):
    """Hub configs use num_experts / rope_theta / rope_scaling: null; they load the same."""
    d = _copy(hf_checkpoint("moe_gqa_norm_mlponly"), tmp_path / "ckpt")
    cfg = json.loads((d / "config.json").read_text())
    theta = cfg.pop("rope_parameters")["rope_theta"]
    cfg.update(rope_theta=theta, rope_scaling=None, num_experts=cfg.pop("num_local_experts", cfg.get("num_experts")),
               torch_dtype="float32")
    (d / "config.json").write_text(json.dumps(cfg))
    a = m2d_jax.from_pretrained(d).config
    b = m2d_jax.from_pretrained(hf_checkpoint("moe_gqa_norm_mlponly")).config
    assert a == b


def test_import_does_not_load_torch(hf_checkpoint):
    code = ("import sys, m2d_jax, m2d_jax.cli; m2d_jax.from_pretrained(sys.argv[1]); "
            "assert 'torch' not in sys.modules, 'torch was imported'; print('ok')")
    out = subprocess.run([sys.executable, "-c", code, str(hf_checkpoint("moe_gqa_norm_mlponly"))],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("ok")
