"""Orbax checkpoints (atomic, resharding restore), ``m2d import`` / ``m2d info``, CLI override errors."""

import json

import jax
import numpy as np
import pytest
from flax import nnx

import m2d_jax
import m2d_jax.pipeline
from m2d_jax import checkpoint
from m2d_jax.cli import main as m2d_main
from m2d_jax.hf.oracle import load_reference, padded_batch
from m2d_jax.info import summarize


def _params(model):
    return {k: np.asarray(v.get_value()) for k, v in nnx.state(model, nnx.Param).flat_state()}


def test_import_then_restore_is_identical(hf_checkpoint, tmp_path, capsys):
    src = hf_checkpoint("moe_gqa_norm_mlponly")
    out = tmp_path / "teacher"
    assert m2d_main(["import", str(src), str(out)]) == 0
    assert checkpoint.is_m2d_checkpoint(out)
    meta = checkpoint.load_metadata(out)
    assert meta["kind"] == "imported" and meta["source_model"] == meta["source_hf_dir"] == str(src.absolute())
    assert len(meta["source_config_sha256"]) == 64 and meta["package_version"] == m2d_jax.__version__
    direct, restored = m2d_jax.from_pretrained(src), m2d_jax.from_pretrained(out)
    assert restored.config == direct.config
    a, b = _params(direct), _params(restored)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=str(k))
    ids, mask = padded_batch(direct.config.vocab_size, 2, 10, 0)
    np.testing.assert_array_equal(np.asarray(direct(ids, mask)), np.asarray(restored(ids, mask)))
    # the output directory exists: a clear error, nothing overwritten
    assert m2d_main(["import", str(src), str(out)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_restore_in_bfloat16_and_onto_a_mesh(hf_checkpoint, tmp_path):
    out = m2d_jax.pipeline.import_checkpoint(hf_checkpoint("moe_gqa_norm_mlponly"), tmp_path / "ckpt")
    bf16 = checkpoint.load_model(out, dtype="bfloat16")
    assert all(v.dtype == jax.numpy.bfloat16 for v in _params(bf16).values())
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "expert"))

    def sharding(path, leaf):  # experts over "expert", everything else replicated
        spec = (None, "expert") if path[-1] in ("gate_proj", "up_proj", "down_proj") and "moe" in path else ()
        return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))

    sharded = checkpoint.load_model(out, sharding=sharding)
    experts = sharded.stacks[0].moe.gate_proj.get_value()
    assert experts.sharding.spec == jax.sharding.PartitionSpec(None, "expert")
    assert len({s.device for s in experts.addressable_shards}) == 8
    ids, mask = padded_batch(sharded.config.vocab_size, 2, 10, 0)
    np.testing.assert_allclose(np.asarray(sharded(ids, mask)), np.asarray(checkpoint.load_model(out)(ids, mask)),
                               atol=1e-5)


@pytest.mark.parametrize("name", ["moe_gqa_norm_mlponly", "moe_mha_tied_sparsestep", "dense_tied_mha"])
def test_info_counts(hf_checkpoint, name, capsys):
    src = hf_checkpoint(name)
    ref = load_reference(src)
    assert m2d_main(["info", str(src), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    c = ref.config
    assert info["total_params"] == ref.num_parameters()
    assert info["family"] == c.model_type and info["layers"] == c.num_hidden_layers
    if c.model_type == "qwen3_moe":
        e, k = c.num_experts, c.num_experts_per_tok
        per_expert = 3 * c.hidden_size * c.moe_intermediate_size
        assert info["experts"] == e and info["top_k"] == k
        assert info["active_params"] == ref.num_parameters() - info["moe_layers"] * (e - k) * per_expert
    else:
        assert info["active_params"] == info["total_params"]
    assert info["bytes_by_dtype"] == {"float32": 4 * ref.num_parameters()}


def test_info_text_on_m2d_checkpoint(hf_checkpoint, tmp_path, capsys):
    out = m2d_jax.pipeline.import_checkpoint(hf_checkpoint("moe_gqa_norm_mlponly"), tmp_path / "ckpt")
    assert m2d_main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "m2d_jax checkpoint" in text and "qwen3_moe" in text and "active_params" in text
    assert summarize(m2d_jax.from_pretrained(out).config)["moe_layers"] == 2


def test_cli_rejects_unknown_overrides(capsys):
    with pytest.raises(SystemExit):
        m2d_main(["info", "x", "--config.seed=1"])
    assert m2d_main(["demo", "--config.no_such_key=1"]) == 2
    assert "unknown config key" in capsys.readouterr().err
