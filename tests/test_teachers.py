"""The corpus splits, the shipped teachers (transformers and m2d_jax agree on their logits; their held-out perplexity
is what training.json records and far below a random model's; routing uses every expert) and ``m2d train-teacher``
end to end on a micro model."""

import gzip
import json

import numpy as np
import pytest

from m2d_jax import from_pretrained
from m2d_jax.config_utils import load_config
from m2d_jax.data import (EMBEDDED_CORPUS, SPLITS, DataError, corpus_documents, corpus_records, load_tokenizer,
                          pack_documents, tokenize_documents)
from m2d_jax.data.build_corpus import corpus_records as build_records, split_of, write_corpus
from m2d_jax.data.teachers import ACCEPTANCE_RECORD, TEACHERS, TRAINING_RECORD, teacher_dir
from m2d_jax.hf.oracle import reference_logits
from m2d_jax.teachers import expert_load, train_teacher

HELDOUT_DOCS = 4  # held-out documents the perplexity checks read (the whole split is in training.json)
LOGITS_TOLERANCE = 1e-4  # max |delta logit|, both loaded in float32
PPL_FACTOR = 1.5  # the shipped teacher's perplexity on held-out text: below this times its recorded value


def test_corpus_splits_are_disjoint_documents_chosen_by_a_stable_hash():
    records = corpus_records()
    sources = [r["source"] for r in records]
    assert len(set(sources)) == len(records) == 497 and sum(len(r["text"]) for r in records) > 10_000_000
    assert all(r["split"] == split_of(r["source"]) for r in records)  # the split is a function of the path alone
    by_split = {s: corpus_documents(s) for s in SPLITS}
    assert sum(map(len, by_split.values())) == len(records)
    assert all(len(docs) >= 20 for docs in by_split.values()) and len(by_split["train"]) > 0.8 * len(records)
    heldout = set(by_split["heldout"])
    assert not heldout & set(by_split["train"]) and not heldout & set(by_split["calibration"])
    with pytest.raises(DataError, match="corpus split 'test'"):
        corpus_documents("test")


def test_corpus_build_is_byte_reproducible_and_independent_of_other_documents(tmp_path):
    sources = tmp_path / "_sources"
    (sources / "tutorial").mkdir(parents=True)
    (sources / "library").mkdir()
    for name, text in (("library/os.rst.txt", "os"), ("tutorial/index.rst.txt", "tutorial"),
                       ("about.rst.txt", "about"), ("library/empty.rst.txt", "  \n")):
        (sources / name).write_text(text)
    records = build_records(sources)
    assert [r["source"] for r in records] == ["python3.11-doc:tutorial/index.rst.txt", "python3.11-doc:about.rst.txt",
                                              "python3.11-doc:library/os.rst.txt"]  # prose first; empty dropped
    (sources / "library" / "sys.rst.txt").write_text("sys")
    more = {r["source"]: r["split"] for r in build_records(sources)}
    assert all(more[r["source"]] == r["split"] for r in records)
    first, second = write_corpus(records, tmp_path / "a.jsonl.gz"), write_corpus(records, tmp_path / "b.jsonl.gz")
    assert first.read_bytes() == second.read_bytes()
    assert [json.loads(line) for line in gzip.open(first, "rt")] == records
    assert EMBEDDED_CORPUS.stat().st_size < 3.5e6


@pytest.fixture(scope="module")
def heldout_windows():
    """Held-out windows [N, 128] of the shipped tokenizer, and that tokenizer's vocabulary size."""
    tokenizer = load_tokenizer(teacher_dir("moe"))
    tokens = tokenize_documents(corpus_documents("heldout")[:HELDOUT_DOCS], tokenizer)
    return pack_documents(tokens, 128), tokenizer.vocab_size


@pytest.mark.parametrize("name", TEACHERS)
def test_shipped_teacher_loads_in_transformers_and_m2d_jax_with_the_same_logits(name, heldout_windows):
    directory = teacher_dir(name)
    config = json.loads((directory / "config.json").read_text())
    assert config["architectures"] == [{"moe": "Qwen3MoeForCausalLM", "dense": "Qwen3ForCausalLM"}[name]]
    assert "auto_map" not in config  # no custom code
    windows, vocab = heldout_windows
    ids = windows[:2, :64]
    mask = np.ones_like(ids)
    mask[0, :16] = 0  # left padding on one row
    want = reference_logits(directory, ids, mask)  # transformers, float32
    got = np.asarray(from_pretrained(directory, dtype="float32", progress=False)(ids, mask), np.float32)
    assert got.shape == (2, 64, vocab)
    assert np.abs(got - want)[mask.astype(bool)].max() <= LOGITS_TOLERANCE


def test_shipped_teachers_have_the_same_tokenizer_and_matching_total_size():
    moe, dense = (json.loads((teacher_dir(n) / TRAINING_RECORD).read_text()) for n in ("moe", "dense"))
    assert (teacher_dir("moe") / "tokenizer.json").read_bytes() == (teacher_dir("dense") / "tokenizer.json").read_bytes()
    assert moe["tokens"] == dense["tokens"] and abs(moe["total_params"] / dense["total_params"] - 1) < 0.05
    assert moe["active_params"] < 0.5 * moe["total_params"]


def test_shipped_moe_teacher_predicts_heldout_text_and_routes_to_every_expert(heldout_windows):
    from m2d_jax.eval.ppl import perplexity

    directory = teacher_dir("moe")
    record = json.loads((directory / TRAINING_RECORD).read_text())
    windows, vocab = heldout_windows
    model = from_pretrained(directory, dtype="float32", progress=False)
    result = perplexity(model, windows.reshape(-1), seq_len=128, batch_size=16)
    assert result.ppl < PPL_FACTOR * record["heldout"]["ppl"] and result.ppl < vocab / 10  # a random model: ~vocab
    load = np.asarray(expert_load(model, windows, batch_size=16))  # [moe_layers, experts]
    assert load.shape == (model.config.num_layers, model.config.moe.experts.num_experts)
    np.testing.assert_allclose(load.sum(axis=1), 1.0, rtol=1e-5)
    # routing uses every expert: on these held-out documents each takes at least 1/8 and at most 3x its uniform
    # share of the routed slots in every layer (measured 0.37x / 2.1x; the whole held-out split's min / max per
    # layer are in training.json and BENCHMARKS.md)
    uniform = 1 / load.shape[1]
    assert load.min() > uniform / 8 and load.max() < 3 * uniform, (load.min(), load.max())
    recorded = np.asarray(record["expert_load"])
    assert recorded.shape == load.shape and np.abs(recorded - load).max() < 0.05  # same routing on a subset


def test_moe_teacher_beats_a_dense_model_of_its_active_size_trained_on_the_same_tokens():
    """The acceptance bar: the experts matter. The baseline is ``m2d train-teacher configs/teachers/dense_active.py``
    (not shipped; its training record is)."""
    moe = json.loads((teacher_dir("moe") / TRAINING_RECORD).read_text())
    baseline = json.loads((teacher_dir("moe") / ACCEPTANCE_RECORD).read_text())
    routed = moe["config"]["model"]
    width = routed["num_experts_per_tok"] * routed["moe_intermediate_size"]  # top-k x expert width
    assert baseline["family"] == "qwen3" and baseline["config"]["model"]["intermediate_size"] == width
    assert (baseline["tokens"], baseline["steps"]) == (moe["tokens"], moe["steps"])
    assert abs(baseline["active_params"] / moe["active_params"] - 1) < 0.02
    assert baseline["heldout"]["tokens"] == moe["heldout"]["tokens"]  # the same whole held-out split
    # shipped: 35.74 vs 38.23 (0.067 nats per token over 146,444 held-out tokens; BENCHMARKS.md "Teachers")
    assert moe["heldout"]["ppl"] < 0.95 * baseline["heldout"]["ppl"], (moe["heldout"]["ppl"], baseline["heldout"])


@pytest.mark.slow
def test_train_teacher_on_a_micro_moe_writes_a_loadable_hf_directory(tmp_path):
    config = load_config("teachers/moe")
    config.model.update(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                        head_dim=16, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2,
                        max_position_embeddings=64)
    config.tokenizer = str(teacher_dir("moe"))  # reuse the shipped BPE instead of training one
    config.train.update(steps=3, batch_size=2, seq_len=32, warmup_steps=1, decay_steps=1, log_every=1)
    config.eval.update(seq_len=32, batch_size=4, heldout_docs=1)
    config.export_dtype = "float32"
    out = train_teacher(config, tmp_path / "micro")
    record = json.loads((out / TRAINING_RECORD).read_text())
    assert (record["steps"], record["tokens"], record["family"]) == (3, 3 * 2 * 32, "qwen3_moe")
    assert np.isfinite(record["final_train_loss"]) and 1 < record["heldout"]["ppl"] < 10 * record["tokenizer_vocab"]
    assert len(record["expert_load"]) == 2 and all(abs(sum(row) - 1) < 1e-5 for row in record["expert_load"])
    ids = np.arange(40, dtype=np.int64).reshape(2, 20)
    want = reference_logits(out, ids)
    got = np.asarray(from_pretrained(out, dtype="float32", progress=False)(ids), np.float32)
    assert np.abs(got - want).max() <= LOGITS_TOLERANCE
    with pytest.raises(FileExistsError):
        train_teacher(config, out)  # outputs are checked before any work
