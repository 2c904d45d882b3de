"""HF export: transformers loads the export with no custom code and matches m2d_jax; re-import is lossless;
sharding, bfloat16 without torch, tokenizer copying, atomic writes; ``m2d convert`` / ``m2d export`` end to end."""

import json

import numpy as np
import pytest
from flax import nnx

import m2d_jax
from conftest import corpus_documents, make_checkpoint_with_tokenizer
from convert_helpers import IDENTITY_TEACHERS
from m2d_jax import checkpoint
from m2d_jax.cli import main as m2d_main
from m2d_jax.convert.plan import plan_conversion
from m2d_jax.convert.student import build_dense_student
from m2d_jax.hf import export as hf_export
from m2d_jax.hf.oracle import load_reference, make_hf_checkpoint, padded_batch, reference_logits
from m2d_jax.hf.safetensors_io import INDEX_NAME, SINGLE_NAME

# K = 6 of E = 8 experts into k = 3 groups (merging), a narrower dense layer (zero-padded), GQA, untied
TEACHER = dict(model_type="qwen3_moe", vocab_size=300, hidden_size=48, intermediate_size=64, num_hidden_layers=3,
               num_attention_heads=4, num_key_value_heads=2, head_dim=16, moe_intermediate_size=32, num_experts=8,
               num_experts_per_tok=2, norm_topk_prob=True, mlp_only_layers=[1], max_position_embeddings=64,
               tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)


def _params(model):
    return {tuple(k): np.asarray(v.get_value()) for k, v in nnx.state(model, nnx.Param).flat_state()}


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return make_checkpoint_with_tokenizer(TEACHER, tmp_path_factory.mktemp("teacher") / "qwen3_moe", seed=7,
                                          tokenizer_vocab=300, docs=corpus_documents(200))


@pytest.fixture(scope="module")
def student(teacher_dir):
    """A merged student (K=6 -> k=3, proportional DP, random scores) built directly from the library."""
    teacher = m2d_jax.from_pretrained(teacher_dir)
    rng = np.random.default_rng(0)
    selected = np.stack([rng.permutation(8)[:6] for _ in range(2)])
    return build_dense_student(teacher, plan_conversion(teacher, selected, rng.uniform(size=(2, 8)), 3,
                                                        "round_robin", "proportional"), 3)


@pytest.mark.parametrize("max_shard_bytes", [hf_export.DEFAULT_MAX_SHARD_BYTES, 60_000])
def test_export_loads_in_transformers_and_reimports_losslessly(student, teacher_dir, tmp_path, max_shard_bytes):
    out = hf_export.export_model(student, tmp_path / "hf", tokenizer_from=teacher_dir,
                                 max_shard_bytes=max_shard_bytes, progress=False)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Qwen3ForCausalLM"] and config["model_type"] == "qwen3"
    assert config["intermediate_size"] == 3 * 32 and config["eos_token_id"] == 0
    if max_shard_bytes == 60_000:
        index = json.loads((out / INDEX_NAME).read_text())
        shards = sorted(set(index["weight_map"].values()))
        assert len(shards) > 1 and not (out / SINGLE_NAME).exists()
        assert index["metadata"]["total_size"] == sum(p.nbytes for p in _params(student).values())
    else:
        assert (out / SINGLE_NAME).exists() and not (out / INDEX_NAME).exists()
    reference = load_reference(out)  # AutoModelForCausalLM, no trust_remote_code
    assert type(reference).__name__ == "Qwen3ForCausalLM"
    assert reference.num_parameters() == sum(p.size for p in _params(student).values())
    ids, mask = padded_batch(student.config.vocab_size, 2, 12, 1)
    np.testing.assert_allclose(np.asarray(student(ids, mask)), reference_logits(reference, ids, mask),
                               atol=1e-4, rtol=0)
    reimported = m2d_jax.from_pretrained(out)
    assert reimported.config == student.config
    a, b = _params(student), _params(reimported)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=str(key))
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (teacher_dir / name).read_bytes()
    import transformers
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok("hello world")["input_ids"] == transformers.AutoTokenizer.from_pretrained(teacher_dir)(
        "hello world")["input_ids"]


def test_bfloat16_export_without_torch(student, tmp_path):
    """bf16 is written by our own writer; the file is read back by the safetensors library (torch framework, the
    format's oracle) bit-exactly."""
    from safetensors import safe_open

    bf16 = _cast(student, "bfloat16")
    out = hf_export.export_model(bf16, tmp_path / "hf16", progress=False)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    ours = dict(m2d_jax.hf.hf_tensors(bf16))
    with safe_open(out / SINGLE_NAME, framework="pt") as f:
        assert set(f.keys()) == set(ours)
        for key in ours:
            t = f.get_tensor(key)
            assert str(t.dtype) == "torch.bfloat16"
            np.testing.assert_array_equal(t.float().numpy(), ours[key].astype(np.float32), err_msg=key)
    reimported = m2d_jax.from_pretrained(out, dtype="bfloat16")
    for key, value in _params(bf16).items():
        np.testing.assert_array_equal(_params(reimported)[key].view(np.uint16), value.view(np.uint16))


def _cast(model, dtype):
    import jax

    graphdef, state = nnx.split(m2d_jax.models.abstract_model(
        model.config, model.runtime.replace(param_dtype=dtype, compute_dtype=dtype)))
    nnx.replace_by_pure_dict(state, jax.tree.map(lambda x: x.astype(dtype),
                                                 nnx.state(model, nnx.Param).to_pure_dict()))
    return nnx.merge(graphdef, state)


def test_export_is_atomic_and_refuses_existing_output(student, tmp_path, monkeypatch):
    existing = tmp_path / "exists"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="already exists"):
        hf_export.export_model(student, existing, progress=False)
    assert [p.name for p in existing.iterdir()] == ["keep.txt"]

    def failing_tensors(model, expert_layout="per_expert"):
        yield "model.embed_tokens.weight", np.zeros((2, 2), np.float32)
        raise RuntimeError("disk full")

    monkeypatch.setattr(hf_export, "hf_tensors", failing_tensors)
    with pytest.raises(RuntimeError, match="disk full"):
        hf_export.export_model(student, tmp_path / "new", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists"]  # no output, no temporary directory left


def test_moe_teacher_export_round_trip(teacher_dir, tmp_path):
    """The same writer exports an MoE model as Qwen3MoeForCausalLM (per-expert hub keys) that transformers loads."""
    teacher = m2d_jax.from_pretrained(teacher_dir, moe_dispatch="dense")
    out = hf_export.export_model(teacher, tmp_path / "moe", progress=False)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Qwen3MoeForCausalLM"] and config["mlp_only_layers"] == [1]
    ids, mask = padded_batch(teacher.config.vocab_size, 2, 10, 2)
    np.testing.assert_allclose(np.asarray(teacher(ids, mask)), reference_logits(out, ids, mask), atol=1e-4, rtol=0)
    np.testing.assert_allclose(reference_logits(out, ids, mask), reference_logits(teacher_dir, ids, mask),
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("name,k", [("deepseek_v2", 4), ("gpt_oss", 2), ("qwen3_moe_unnorm", 4), ("olmoe", 3),
                                    ("mixtral", 2), ("flex_olmo", 3)])
def test_family_student_and_teacher_export_round_trip(tmp_path, name, k):
    """Students of every family (DeepSeek: all-dense DeepseekV2 with shared experts and a padded layer 0; GPT-OSS:
    1-expert GptOss with interleaved gate_up and biases) and their teachers export to the standard transformers
    class, load without custom code with the same logits, and re-import losslessly."""
    hf_config, family, _ = IDENTITY_TEACHERS[name]
    src = make_hf_checkpoint(hf_config, tmp_path / "source", seed=11, init_std=0.1)
    teacher = m2d_jax.from_pretrained(src, moe_dispatch="dense")
    e = teacher.config.moe.experts.num_experts
    moe_layers = [i for i, kind in enumerate(teacher.config.ffn_kinds) if kind == "moe"]
    rng = np.random.default_rng(5)
    plans = plan_conversion(teacher, np.stack([rng.permutation(e) for _ in moe_layers]),
                            rng.uniform(0.1, 1, (len(moe_layers), e)), k, "round_robin", "uniform",
                            routed_mass=rng.uniform(0.5, 1, len(moe_layers)),
                            conditional_prob=rng.uniform(0.1, 0.5, (len(moe_layers), e)))
    student = build_dense_student(teacher, plans, k)
    ids, mask = padded_batch(teacher.config.vocab_size, 2, 10, 4)
    for model, tag in ((student, "student"), (teacher, "teacher")):
        out = hf_export.export_model(model, tmp_path / tag, progress=False)
        config = json.loads((out / "config.json").read_text())
        assert config["model_type"] == model.config.family
        reference = load_reference(out)
        assert type(reference).__name__ == config["architectures"][0]
        assert reference.num_parameters() == sum(p.size for p in _params(model).values())
        np.testing.assert_allclose(np.asarray(model(ids, mask)), reference_logits(reference, ids, mask), atol=1e-4,
                                   rtol=0, err_msg=tag)
        reimported = m2d_jax.from_pretrained(out, moe_dispatch="dense")
        assert reimported.config == model.config and reimported.runtime == model.runtime
        a, b = _params(model), _params(reimported)
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=f"{tag} {key}")
    assert student.config.family == family


def test_random_ffn_from_imported_teacher_exports_with_teacher_tokenizer(teacher_dir, tmp_path):
    """Provenance follows an imported (Orbax) teacher back to its HF directory: the baseline's export finds the
    tokenizer and generation config there without --tokenizer-from."""
    from m2d_jax.pipeline import import_checkpoint, random_ffn_checkpoint

    imported = import_checkpoint(teacher_dir, tmp_path / "teacher")
    baseline = random_ffn_checkpoint(imported, 2, tmp_path / "baseline", seed=1)
    meta = checkpoint.load_metadata(baseline)
    assert meta["kind"] == "random_ffn" and meta["source_hf_dir"] == str(teacher_dir.absolute())
    assert meta["source_model"] == str(imported.absolute()) and meta["recipe"]["groups"] == 2
    # a record that names its source model only is followed through that checkpoint to the HF root
    assert hf_export.teacher_hf_dir({"kind": "distilled", "source_model": str(baseline)}) == teacher_dir.absolute()
    out = hf_export.export_checkpoint(baseline, tmp_path / "hf", progress=False)
    assert (out / "generation_config.json").read_bytes() == (teacher_dir / "generation_config.json").read_bytes()
    model = checkpoint.load_model(baseline)
    ids, mask = padded_batch(model.config.vocab_size, 2, 8, 5)
    np.testing.assert_allclose(np.asarray(model(ids, mask)), reference_logits(out, ids, mask), atol=1e-4, rtol=0)


@pytest.mark.slow
def test_cli_calibrate_convert_export_end_to_end(teacher_dir, tmp_path, capsys):
    """calibrate -> m2d convert (gld_reap, router_cluster, K=4 -> k=2) --hf-out -> transformers; m2d export of the
    checkpoint gives the same files; bad inputs fail clearly without writing anything."""
    from m2d_jax.calibration import load_stats
    from m2d_jax.data import EMBEDDED_CORPUS
    from m2d_jax.pipeline import calibrate_files

    stats = tmp_path / "stats.npz"
    calibrate_files(teacher_dir, [EMBEDDED_CORPUS], stats, seq_len=32, num_seqs=16, gram_tokens=128, batch_size=8,
                    show_progress=False)
    ckpt, hf_dir = tmp_path / "student", tmp_path / "student_hf"
    args = ["convert", "--model", str(teacher_dir), "--stats", str(stats), "--scoring", "gld_reap", "--grouping",
            "router_cluster", "--dp-scaling", "uniform", "--experts", "4", "--groups", "2", "--out", str(ckpt),
            "--hf-out", str(hf_dir)]
    assert m2d_main(args) == 0
    meta = checkpoint.load_metadata(ckpt)
    assert meta["kind"] == "dense_student" and meta["selection"]["scoring"] == "gld_reap"
    assert meta["selection"]["num_selected"] == 4 and meta["recipe"] == {"groups": 2, "grouping": "router_cluster",
                                                                          "dp_scaling": "uniform"}
    assert meta["stats_sha256"] == load_stats(stats).digest() == meta["selection"]["stats_sha256"]
    assert meta["details"]["teacher_family"] == "qwen3_moe"
    assert meta["source_model"] == meta["source_hf_dir"] == str(teacher_dir.absolute())
    for layer in ("0", "2"):
        groups = meta["details"]["layers"][layer]["groups"]
        assert len(groups) == 2 and sum(map(len, groups)) == 4
        np.testing.assert_allclose(meta["details"]["layers"][layer]["scales"], [0.5, 0.5])
    student = checkpoint.load_model(ckpt)
    ids, mask = padded_batch(student.config.vocab_size, 2, 12, 3)
    np.testing.assert_allclose(np.asarray(student(ids, mask)), reference_logits(hf_dir, ids, mask), atol=1e-4,
                               rtol=0)
    assert (hf_dir / "tokenizer.json").exists()
    exported = tmp_path / "exported"
    assert m2d_main(["export", str(ckpt), str(exported)]) == 0  # tokenizer found through the metadata
    assert sorted(p.name for p in exported.iterdir()) == sorted(p.name for p in hf_dir.iterdir())
    assert (exported / SINGLE_NAME).read_bytes() == (hf_dir / SINGLE_NAME).read_bytes()
    capsys.readouterr()

    def fails(extra, message, out_name="bad"):
        changed = list(args)
        changed[changed.index("--out") + 1] = str(tmp_path / out_name)
        changed[changed.index("--hf-out") + 1] = str(tmp_path / (out_name + "_hf"))
        for flag, value in extra:
            changed[changed.index(flag) + 1] = value
        assert m2d_main(changed) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "bad").exists() and not (tmp_path / "bad_hf").exists()

    fails([("--experts", "9")], "K=9")  # K > E
    fails([("--groups", "5")], "k=5 groups")  # k > K
    for flag, value in (("--scoring", "magic"), ("--grouping", "kmeans"), ("--dp-scaling", "equal")):
        changed = list(args)
        changed[changed.index(flag) + 1] = value
        with pytest.raises(SystemExit):  # the choices come from the library's constants
            m2d_main(changed)
        assert f"invalid choice: '{value}'" in capsys.readouterr().err
    fails([("--groups", "1")], "wider than the student's FFN width 32")  # dense layer 64 > k*m = 32
    assert m2d_main(args) == 2 and "already exists" in capsys.readouterr().err
    # the random-FFN baseline through the same command
    assert m2d_main(["convert", "--model", str(teacher_dir), "--random-ffn", "--groups", "2", "--out",
                     str(tmp_path / "random")]) == 0
    assert checkpoint.load_metadata(tmp_path / "random")["kind"] == "random_ffn"
