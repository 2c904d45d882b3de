"""The typed configuration: nested architecture specs, the separate runtime, one set of loader flags for every
checkpoint kind, the checkpoint record format, the family-adapter interface, and model FLOPs for MFU."""

import json
import math

import jax
import numpy as np
import pytest
from flax import nnx

import m2d_jax
from m2d_jax import checkpoint, pipeline
from m2d_jax.errors import CheckpointError
from m2d_jax.hf.adapters import adapter_for
from m2d_jax.hf.oracle import padded_batch
from m2d_jax.models import (AttentionSpec, ExpertsSpec, FFNSpec, ModelConfig, MoESpec, RouterSpec, RuntimeConfig,
                            abstract_model, with_runtime)

from conftest import ALL_CONFIGS
from convert_helpers import IDENTITY_TEACHERS


def _params(model):
    return {tuple(k): np.asarray(v.get_value().astype(np.float32)) for k, v in nnx.state(model, nnx.Param).flat_state()}


def _config_of(hf: dict) -> ModelConfig:
    return adapter_for(hf["model_type"], "config.json").config_from_hf(hf, "config.json")


# ---- specs -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("hf", [ALL_CONFIGS["moe_gqa_norm_mlponly"], ALL_CONFIGS["dense_sliding_layers"]]
                         + [v[0] for v in IDENTITY_TEACHERS.values()], ids=lambda hf: hf["model_type"])
def test_config_json_round_trip(hf):
    config = _config_of(hf)
    text = json.dumps(config.to_dict())
    assert ModelConfig.from_dict(json.loads(text)) == config
    assert (config.moe is None) == (not config.is_moe)


def test_spec_errors_name_the_field():
    attention = AttentionSpec(num_heads=4, num_kv_heads=2, head_dim=8, layer_types=("full_attention",) * 2)
    with pytest.raises(ValueError, match="AttentionSpec: num_heads=4 is not a multiple of num_kv_heads=3"):
        attention.replace(num_kv_heads=3)
    with pytest.raises(ValueError, match="AttentionSpec: sliding_window=None"):
        attention.replace(layer_types=("sliding_attention",) * 2)
    with pytest.raises(ValueError, match="RouterSpec: rule='nope' not in"):
        RouterSpec(top_k=2, rule="nope")
    with pytest.raises(ValueError, match=r"MoESpec: router.top_k=9 must be <= experts.num_experts=8"):
        MoESpec(RouterSpec(top_k=9), ExpertsSpec(num_experts=8, intermediate_size=4))
    with pytest.raises(ValueError, match="ModelConfig: attention.layer_types has 2 entries, expected num_layers=3"):
        ModelConfig("qwen3", 16, 8, 3, ("dense",) * 3, attention, FFNSpec(intermediate_size=4))
    with pytest.raises(ValueError, match="moe must be given exactly when ffn_kinds has a 'moe' layer"):
        ModelConfig("qwen3_moe", 16, 8, 2, ("moe", "dense"), attention, FFNSpec(intermediate_size=4))
    good = ModelConfig("qwen3", 16, 8, 2, ("dense",) * 2, attention, FFNSpec(intermediate_size=4)).to_dict()
    with pytest.raises(ValueError, match=r"ModelConfig.attention: unknown fields \['heads'\]"):
        ModelConfig.from_dict({**good, "attention": {**good["attention"], "heads": 4}})
    with pytest.raises(ValueError, match="RuntimeConfig: moe_dispatch='fast' not in"):
        RuntimeConfig(moe_dispatch="fast")


# ---- loaders ---------------------------------------------------------------------------------------------------
def test_loader_flags_mean_the_same_for_hf_and_m2d_checkpoints(hf_checkpoint, tmp_path):
    """dtype, progress, sharding and runtime fields (incl. an expanded top-k') load an HF directory and its m2d_jax
    import into the same model; architecture fields are refused for both."""
    src = hf_checkpoint("moe_gqa_norm_mlponly")
    out = pipeline.import_checkpoint(src, tmp_path / "ckpt")
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "expert"))

    def sharding(path, leaf):  # experts over "expert", everything else replicated
        spec = (None, "expert") if "moe" in path and path[-1] in ("gate_proj", "up_proj", "down_proj") else ()
        return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))

    want_runtime = RuntimeConfig(param_dtype="bfloat16", compute_dtype="bfloat16", moe_dispatch="dense", top_k=3)
    models = [m2d_jax.from_pretrained(p, dtype="bfloat16", progress=False, sharding=sharding, moe_dispatch="dense",
                                      top_k=3) for p in (src, out)]
    ids, mask = padded_batch(models[0].config.vocab_size, 2, 10, 0)
    for model in models:
        assert model.runtime == want_runtime and model.config == models[0].config
        gate = model.stacks[0].moe.gate_proj.get_value()
        assert gate.dtype == jax.numpy.bfloat16 and gate.sharding.spec == jax.sharding.PartitionSpec(None, "expert")
        _, top_idx = model.hidden_states(ids, mask, observe=lambda view: view.routing.top_idx)
        assert top_idx[0].shape == (1, 2 * 10, 3)  # [layers in stack, tokens, k'] routed to top_k=3
    a, b = _params(models[0]), _params(models[1])
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    np.testing.assert_array_equal(np.asarray(models[0](ids, mask), np.float32),
                                  np.asarray(models[1](ids, mask), np.float32))
    assert m2d_jax.from_pretrained(out, runtime=want_runtime).runtime == want_runtime
    for path in (src, out):
        with pytest.raises(TypeError, match=r"unknown runtime field\(s\) \['num_layers'\]"):
            m2d_jax.from_pretrained(path, num_layers=2)
        with pytest.raises(TypeError, match="not both"):
            m2d_jax.from_pretrained(path, runtime=want_runtime, moe_dispatch="dense")
    # as saved: an m2d_jax checkpoint keeps its parameter dtype when no dtype is given
    bf16 = checkpoint.save_model(models[1], tmp_path / "bf16")
    assert checkpoint.read_record(bf16)["param_dtype"] == "bfloat16"
    assert m2d_jax.from_pretrained(bf16, progress=False).runtime.param_dtype == "bfloat16"


def test_with_runtime_changes_only_the_runtime(hf_checkpoint):
    model = m2d_jax.from_pretrained(hf_checkpoint("moe_gqa_norm_mlponly"), progress=False)
    dense = with_runtime(model, moe_dispatch="dense", remat=True)
    assert dense.config is model.config and dense.runtime == model.runtime.replace(moe_dispatch="dense", remat=True)
    ids, mask = padded_batch(model.config.vocab_size, 2, 8, 1)
    np.testing.assert_allclose(np.asarray(dense(ids, mask)), np.asarray(model(ids, mask)), atol=1e-5)
    with pytest.raises(TypeError):
        with_runtime(model, num_layers=1)
    with pytest.raises(ValueError, match="cannot change param_dtype"):
        with_runtime(model, param_dtype="bfloat16")
    with pytest.raises(ValueError, match="top_k=9 exceeds the model's 8 experts"):
        with_runtime(model, top_k=9)


def test_checkpoint_of_an_older_format_is_a_one_line_error(hf_checkpoint, tmp_path):
    out = pipeline.import_checkpoint(hf_checkpoint("dense_tied_mha"), tmp_path / "ckpt")
    record = json.loads((out / checkpoint.RECORD).read_text())
    flat = {"family": "qwen3", "num_heads": 4, "dtype": "float32"}  # what /1 stored: one flat config
    (out / checkpoint.RECORD).write_text(json.dumps({**record, "format": "m2d_jax.model/1", "config": flat}))
    from m2d_jax.info import load_config

    for load in (checkpoint.load_model, m2d_jax.from_pretrained, load_config):
        with pytest.raises(CheckpointError, match=r"m2d_model.json: format 'm2d_jax.model/1' was written by an "
                                                  r"older m2d_jax version .* re-create the checkpoint") as err:
            load(out)
        assert "\n" not in str(err.value)


# ---- the family-adapter interface ------------------------------------------------------------------------------
def test_family_adapter_interface_is_explicit():
    from m2d_jax.hf.adapters import ADAPTERS, DecoderAdapter

    for adapter in ADAPTERS.values():
        assert isinstance(adapter, DecoderAdapter)

    class Partial(DecoderAdapter):  # a family that implements only part of the interface
        model_types = ("partial",)
        architectures = {"partial": "PartialForCausalLM"}

        def config_from_hf(self, hf, source):
            raise AssertionError

    with pytest.raises(TypeError, match="abstract"):
        Partial()
    with pytest.raises(TypeError, match="must declare architectures"):
        class Undeclared(Partial):  # noqa: F841 - complete methods, incomplete declarations
            architectures = {}

            def config_to_hf(self, config):
                return {}

            def layer_rules(self, config, kind, expert_layout):
                return []


# ---- FLOPs -------------------------------------------------------------------------------------------------------
def _independent_forward_flops(config: ModelConfig, seq_len: int, top_k: int = 0) -> float:
    """2 x the matmul parameters one token uses, read from the abstract model's parameter shapes (routed experts:
    k of E), plus attention scores and values over each query's causal keys (counted position by position)."""
    state = nnx.state(abstract_model(config), nnx.Param)
    used = 0.0
    attention = 0.0
    for path, var in state.flat_state():
        path, shape = tuple(path), var.get_value().shape
        if path == ("lm_head",) or (path == ("embed",) and config.tie_word_embeddings):
            used += math.prod(shape)
        if path[0] != "stacks":
            continue
        layers, per_layer = shape[0], math.prod(shape[1:])
        if path[-2:] in (("moe", "gate_proj"), ("moe", "up_proj"), ("moe", "down_proj")):
            experts = shape[1]
            used += layers * per_layer / experts * (top_k or config.moe.router.top_k)
        elif path[-1] == "kernel" or path[-2:] == ("moe", "router"):
            used += layers * per_layer
    windows = [config.attention.sliding_window if t == "sliding_attention" else seq_len
               for t in config.attention.layer_types]
    shapes = {tuple(p): v.get_value().shape for p, v in state.flat_state()}
    q = shapes.get(("stacks", 0, "attn", "q_proj", "kernel")) or shapes[("stacks", 0, "attn", "q_b_proj", "kernel")]
    heads, qk_dim = q[-2], q[-1]
    v_dim = shapes[("stacks", 0, "attn", "o_proj", "kernel")][-2]  # [layers, heads, v, d]
    for window in windows:
        keys = sum(min(i, window) for i in range(1, seq_len + 1)) / seq_len
        attention += 2 * heads * (qk_dim + v_dim) * keys
    return 2 * used + attention


FLOPS_CASES = {
    "gqa_moe_sliding": ALL_CONFIGS["moe_allexperts_sliding"],
    "gqa_moe_mlponly_untied": ALL_CONFIGS["moe_gqa_norm_mlponly"],
    "dense_tied": ALL_CONFIGS["dense_tied_mha"],
    "mla_shared_experts": IDENTITY_TEACHERS["deepseek_v2"][0],
    "mla_q_lora_shared": dict(IDENTITY_TEACHERS["deepseek_v2"][0], q_lora_rank=12, n_shared_experts=1),
    "gpt_oss": IDENTITY_TEACHERS["gpt_oss"][0],
}


@pytest.mark.parametrize("name", sorted(FLOPS_CASES))
def test_forward_flops_equal_an_independent_count(name):
    from m2d_jax.distill.metrics import forward_flops_per_token, train_flops_per_token

    config = _config_of(FLOPS_CASES[name])
    seq_len = 20  # longer than the sliding windows (8)
    want = _independent_forward_flops(config, seq_len)
    assert forward_flops_per_token(config, seq_len) == pytest.approx(want, rel=1e-12)
    if config.is_moe:
        k = config.moe.experts.num_experts
        assert forward_flops_per_token(config, seq_len, top_k=k) == pytest.approx(
            _independent_forward_flops(config, seq_len, top_k=k), rel=1e-12)
        assert train_flops_per_token(config, config, seq_len, teacher_top_k=k) == pytest.approx(
            3 * want + _independent_forward_flops(config, seq_len, top_k=k), rel=1e-12)
