"""Sharded HF import: with a sharding, every device's shard equals the same slice of the unsharded import (every
family, per-expert / fused / MXFP4 experts, experts over `expert` or `fsdp`), and a process of a 2-process run reads
and holds only about its half of a ~400 MB checkpoint (peak RSS measured in the processes)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx

from m2d_jax.distill.sharding import LOGICAL_AXIS_RULES, make_mesh, param_shardings
from m2d_jax.hf import SafetensorsCheckpoint, hf_tensors, load_hf
from m2d_jax.hf.load import hf_model_config
from m2d_jax.hf.export import write_safetensors
from m2d_jax.hf.oracle import make_hf_checkpoint
from m2d_jax.models import abstract_model
from test_families import FAMILY_CONFIGS
from test_mxfp4 import quantize_mxfp4
from test_multiprocess import free_port

WORKER = Path(__file__).parent / "sharded_import_worker.py"
# mesh axis sizes over the 8 fake devices, and the logical-axis rules: experts over `expert`, or over `fsdp`
MESHES = {
    "expert_axis": ({"fsdp": 2, "tensor": 2, "expert": 2}, LOGICAL_AXIS_RULES),
    "experts_over_fsdp": ({"fsdp": 4, "tensor": 2}, {**LOGICAL_AXIS_RULES, "exp": "fsdp"}),
    "embed_in_quarters": ({"fsdp": 4, "expert": 2}, LOGICAL_AXIS_RULES),  # MXFP4: slices inside groups of 32
}


def _mxfp4_copy(src: Path, out: Path) -> Path:
    """``src`` (a float GPT-OSS checkpoint) with its expert matrices stored as MXFP4 blocks / scales."""
    out.mkdir()
    for f in src.glob("*.json"):
        shutil.copy(f, out / f.name)
    tensors = {}
    with SafetensorsCheckpoint(src) as ckpt:
        for key in ckpt.keys():
            value = np.array(ckpt.read(key))
            if key.endswith(("experts.gate_up_proj", "experts.down_proj")):
                tensors[key + "_blocks"], tensors[key + "_scales"] = quantize_mxfp4(value.swapaxes(1, 2))
            else:
                tensors[key] = value
    safetensors.numpy.save_file(tensors, out / "model.safetensors")
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4"}
    (out / "config.json").write_text(json.dumps(config))
    return out


def _fused_copy(src: Path, out: Path) -> Path:
    """``src`` (a Qwen3-MoE checkpoint) rewritten in the transformers-v5 fused expert layout."""
    out.mkdir()
    shutil.copy(src / "config.json", out / "config.json")
    write_safetensors(out / "model.safetensors", list(hf_tensors(load_hf(src, progress=False), "fused")))
    return out


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded_import")
    build = {name: make_hf_checkpoint(FAMILY_CONFIGS[name], root / name, seed=len(name), init_std=0.1)
             for name in ("ds_qlora_group_rho", "gptoss_default_rope", "olmoe_clip", "mixtral_sliding")}
    qwen = make_hf_checkpoint(dict(model_type="qwen3_moe", vocab_size=96, hidden_size=64, intermediate_size=64,
                                   num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                   moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
                                   mlp_only_layers=[1], attention_bias=True, max_position_embeddings=64,
                                   tie_word_embeddings=False), root / "qwen3_moe", seed=1, init_std=0.1)
    build["qwen3_moe_per_expert"] = qwen
    build["qwen3_moe_fused"] = _fused_copy(qwen, root / "qwen3_moe_fused")
    build["gptoss_mxfp4"] = _mxfp4_copy(build["gptoss_default_rope"], root / "gptoss_mxfp4")
    return build


def _lookup(tree, keys):
    for key in keys:
        tree = tree[key]
    return tree


@pytest.mark.parametrize("mesh_name", sorted(MESHES))
@pytest.mark.parametrize("family", ["qwen3_moe_per_expert", "qwen3_moe_fused", "ds_qlora_group_rho",
                                    "gptoss_default_rope", "gptoss_mxfp4", "olmoe_clip", "mixtral_sliding"])
def test_every_shard_equals_the_slice_of_the_unsharded_import(checkpoints, family, mesh_name):
    path = checkpoints[family]
    sizes, rules = MESHES[mesh_name]
    mesh = make_mesh(sizes, jax.devices()[:8])
    whole = {k: np.asarray(v.get_value()) for k, v in nnx.state(load_hf(path, progress=False)).flat_state()}
    shardings = param_shardings(abstract_model(hf_model_config(path)), mesh, rules)
    sharded = load_hf(path, progress=False, sharding=lambda keys, _: _lookup(shardings, keys))
    split_leaves = 0
    for key, var in nnx.state(sharded).flat_state():
        leaf = var.get_value()
        assert leaf.sharding == _lookup(shardings, key), key
        assert len(leaf.addressable_shards) == 8
        for shard in leaf.addressable_shards:
            np.testing.assert_array_equal(np.asarray(shard.data), whole[tuple(key)][shard.index], err_msg=str(key))
        split_leaves += leaf.sharding.shard_shape(leaf.shape) != leaf.shape
    assert split_leaves >= 10  # the layout really splits the model (experts, embeddings, heads)
    experts = _lookup(shardings, ("stacks", len(shardings["stacks"]) - 1, "moe", "down_proj")).spec
    assert experts[1] == ("fsdp" if mesh_name == "experts_over_fsdp" else "expert")


@pytest.mark.parametrize("small_run, block", [(0, 0), (1 << 16, 100), (1 << 16, 64 << 20)],
                         ids=["runs", "small_row_blocks", "default"])
def test_slice_reads_equal_numpy_slicing(tmp_path, monkeypatch, small_run, block):
    """``read_slice`` equals NumPy slicing for every dtype and shape, read run by run or in blocks of whole rows."""
    import ml_dtypes

    from m2d_jax.hf import safetensors_io

    monkeypatch.setattr(safetensors_io, "SMALL_RUN_BYTES", small_run)
    monkeypatch.setattr(safetensors_io, "READ_BLOCK_BYTES", block)

    rng = np.random.default_rng(0)
    tensors = {"f32": rng.normal(size=(9, 5, 6)).astype(np.float32), "scalar": np.array(3.0, np.float32),
               "i64": np.arange(10), "u8": rng.integers(0, 255, (3, 7, 2, 16)).astype(np.uint8),
               "bf16": rng.normal(size=(3, 7)).astype(ml_dtypes.bfloat16)}
    write_safetensors(tmp_path / "model.safetensors", list(tensors.items()))
    with SafetensorsCheckpoint(tmp_path) as ckpt:
        for key, value in tensors.items():
            for _ in range(30):
                index = tuple(slice(*sorted(rng.integers(0, n + 1, 2))) if rng.random() < 0.7 else slice(None)
                              for n in value.shape)
                got = ckpt.read_slice(key, index)
                assert got.dtype == value.dtype
                np.testing.assert_array_equal(got, value[index], err_msg=f"{key}{index}")


def _big_checkpoint(out: Path) -> tuple[Path, int]:
    """A ~400 MB float32 Qwen3-MoE checkpoint (4 MoE layers of 64 experts between small dense layers, so each
    expert leaf is one layer's), written tensor by tensor without building the model; tensor i is filled with i
    (what is read is checked by the other tests, this one measures memory)."""
    from m2d_jax.hf.export import write_sharded
    from m2d_jax.hf.adapters import adapter_for
    from m2d_jax.hf.load import _leaf_shapes, _placements

    hf = dict(model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], vocab_size=256, hidden_size=512,
              intermediate_size=64, num_hidden_layers=8, num_attention_heads=2, num_key_value_heads=2, head_dim=32,
              moe_intermediate_size=256, num_experts=64, num_experts_per_tok=2, decoder_sparse_step=2,
              max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=False)
    out.mkdir()
    (out / "config.json").write_text(json.dumps(hf))
    config = hf_model_config(out)
    adapter = adapter_for("qwen3_moe", "config.json")
    leaves = {tuple(k): v.get_value() for k, v in nnx.state(abstract_model(config)).flat_state()}
    tensors, seen = [], set()
    for placement, _ in _placements(config, adapter, "per_expert").values():
        if id(placement) not in seen:
            seen.add(id(placement))
            shape = placement.rule.transform.hf_shape(_leaf_shapes(placement, leaves))
            tensors += [(key, shape) for key, _ in placement.slices()]
    total = sum(4 * int(np.prod(shape)) for _, shape in tensors)
    write_sharded(out, ((key, np.full(shape, i, np.float32)) for i, (key, shape) in enumerate(tensors)),
                  max_shard_bytes=64 << 20, progress=False)
    return out, total


def _run_workers(job: dict, num_processes: int, devices_each: int, tmp_path: Path, name: str) -> list[dict]:
    job_file = tmp_path / f"{name}.json"
    job_file.write_text(json.dumps(job))
    port = free_port()
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(i), str(num_processes), str(port), str(devices_each),
                               str(job_file)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(num_processes)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    for i, (p, output) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"process {i} failed:\n{output[-4000:]}"
    return [json.loads(Path(f"{job_file}.result-{i}.json").read_text()) for i in range(num_processes)]


@pytest.mark.slow
def test_each_process_reads_and_holds_only_its_shards(tmp_path):
    """2 processes x 4 devices, experts over an 8-way `expert` axis and embeddings over `fsdp`: each process reads
    about half of the checkpoint's bytes and its peak RSS grows by well under the model's size, while one process
    importing the whole model grows by more than the model's size (the measurement can see it)."""
    path, model_bytes = _big_checkpoint(tmp_path / "big")
    assert model_bytes > 380e6
    sharded = _run_workers({"path": str(path), "mesh": {"expert": 8}}, 2, 4, tmp_path, "sharded")
    whole = _run_workers({"path": str(path), "mesh": None}, 1, 1, tmp_path, "whole")[0]

    assert whole["bytes_read"] == model_bytes
    assert whole["rss_growth"] > model_bytes  # the whole model, plus one leaf being read
    for r in sharded:
        assert 0.45 * model_bytes < r["bytes_read"] < 0.55 * model_bytes, r
        assert r["held_bytes"] < 0.65 * model_bytes, r  # half the experts + replicated attention on 4 devices
        assert r["rss_growth"] < 0.75 * model_bytes, r  # what it holds, plus one leaf's local shards being read
    assert sum(r["held_bytes"] for r in sharded) >= model_bytes  # together they hold it all
    assert set(sharded[0]["keys_read"]) | set(sharded[1]["keys_read"]) == set(whole["keys_read"])
    expert_keys = [set(k for k in r["keys_read"] if ".experts." in k) for r in sharded]
    assert not expert_keys[0] & expert_keys[1]  # each expert's tensors read by the one process that owns it
