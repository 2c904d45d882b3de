"""Local text -> the checkpoint's tokenizer -> packed, deterministic grain batches; clear errors on bad data."""

import gzip
import json

import numpy as np
import pytest

from m2d_jax.data import (EMBEDDED_CORPUS, DataError, load_tokenizer, pack_documents, packed_dataset, read_documents,
                          tokenize_documents, train_bpe_tokenizer)


@pytest.fixture(scope="module")
def corpus():
    with gzip.open(EMBEDDED_CORPUS, "rt") as f:
        return [json.loads(line)["text"] for line in f]


@pytest.fixture(scope="module")
def tokenizer(corpus, tmp_path_factory):
    return train_bpe_tokenizer(corpus, 512, tmp_path_factory.mktemp("tok"))


def test_embedded_corpus_is_real_text(corpus):
    assert len(corpus) >= 40 and sum(map(len, corpus)) > 1_000_000
    assert "Python" in corpus[0]


def test_read_text_jsonl_parquet_agree(corpus, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = corpus[:3]
    for i, d in enumerate(docs):
        (tmp_path / f"d{i}.txt").write_text(d)
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    pq.write_table(pa.table({"text": docs}), tmp_path / "d.parquet")
    from_txt = read_documents([tmp_path / f"d{i}.txt" for i in range(3)])
    assert read_documents([tmp_path / "d.jsonl"]) == docs
    assert read_documents([tmp_path / "d.parquet"]) == docs
    assert [t.strip() for t in from_txt] == [d.strip() for d in docs]
    assert len(read_documents([EMBEDDED_CORPUS])) == len(corpus)


def test_embedded_split_entries_read_exactly_that_split():
    """``embedded:<split>`` is one split of the embedded corpus (distillation's default reads only the train split, so
    the held-out documents never reach training); a bare or unknown name is a one-line error."""
    from m2d_jax.config_utils import load_config
    from m2d_jax.data import corpus_documents, corpus_records

    for split in ("train", "calibration", "heldout"):
        assert read_documents([f"embedded:{split}"]) == [d for d in corpus_documents(split) if d.strip()]
    heldout = {r["text"] for r in corpus_records() if r["split"] == "heldout"}
    assert load_config("distill/base").data.files == ("embedded:train",)
    assert not heldout & set(read_documents(load_config("distill/base").data.files))
    for bad in ("embedded", "embedded:test"):
        with pytest.raises(DataError, match="embedded:train, embedded:calibration, embedded:heldout"):
            read_documents([bad])


def test_file_without_extension_is_plain_text(corpus, tmp_path):
    """A licence file or README without an extension is read as text, like the same bytes named .txt."""
    (tmp_path / "LICENSE").write_text(corpus[1])
    (tmp_path / "same.txt").write_text(corpus[1])
    with gzip.open(tmp_path / "README.gz", "wt") as f:
        f.write(corpus[2])
    assert read_documents([tmp_path / "LICENSE"]) == read_documents([tmp_path / "same.txt"])
    assert read_documents([tmp_path / "LICENSE"])[0].strip() == corpus[1].strip()
    assert read_documents([tmp_path / "README.gz"])[0].strip() == corpus[2].strip()


def test_tokenizer_matches_transformers(tokenizer, corpus):
    import transformers

    hf = transformers.AutoTokenizer.from_pretrained(tokenizer.directory)
    text = corpus[1][:2000]
    assert tokenizer.encode_batch([text])[0] == hf(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.eos_id == hf.eos_token_id == 0
    assert tokenizer.decode(tokenizer.encode_batch([text])[0]) == text


def test_packing_is_eos_separated(tokenizer, corpus):
    docs = corpus[:4]
    tokens = tokenize_documents(docs, tokenizer)
    lengths = [len(ids) for ids in tokenizer.encode_batch(docs)]
    assert len(tokens) == sum(lengths) + len(docs)
    assert np.flatnonzero(tokens == tokenizer.eos_id).tolist() == list(np.cumsum(np.array(lengths) + 1) - 1)
    windows = pack_documents(tokens, 64)
    assert windows.shape == (len(tokens) // 64, 64)
    np.testing.assert_array_equal(windows.reshape(-1), tokens[: windows.size])


def test_grain_batches_deterministic_sharded_resumable():
    windows = np.arange(50 * 8, dtype=np.int32).reshape(50, 8)  # row i starts with 8*i: identifies the window

    def rows(ds):
        return [int(r[0]) // 8 for b in ds for r in b["input_ids"]]

    a, b, c = (rows(packed_dataset(windows, 4, seed=s)) for s in (7, 7, 8))
    assert a == b and a != c  # deterministic given the seed
    assert len(a) == 48 and len(set(a)) == 48 and set(a) <= set(range(50))  # a permutation, remainder dropped
    batch = next(iter(packed_dataset(windows, 4, seed=7)))
    assert batch["input_ids"].shape == (4, 8) and batch["attention_mask"].sum() == 32
    shards = [set(rows(packed_dataset(windows, 5, seed=7, shard_index=i, shard_count=2))) for i in range(2)]
    assert not shards[0] & shards[1] and len(shards[0] | shards[1]) == 50  # disjoint, covering
    it = iter(packed_dataset(windows, 4, seed=7, num_epochs=None).to_iter_dataset())
    first_epoch = [next(it) for _ in range(12)]
    state = it.get_state()
    want = [next(it)["input_ids"] for _ in range(15)]  # crosses into the third epoch
    it2 = iter(packed_dataset(windows, 4, seed=7, num_epochs=None).to_iter_dataset())
    it2.set_state(state)
    assert all(np.array_equal(x, next(it2)["input_ids"]) for x in want)  # exact resume
    second_epoch = [int(r[0]) // 8 for x in want[:12] for r in x]
    assert second_epoch != [int(r[0]) // 8 for b in first_epoch for r in b["input_ids"]]  # reshuffled


def test_bad_data_is_a_clear_error(tmp_path, tokenizer):
    (tmp_path / "empty.txt").write_text("   \n")
    with pytest.raises(DataError, match="empty.txt: contains no text"):
        read_documents([tmp_path / "empty.txt"])
    with pytest.raises(DataError, match="missing.jsonl: data file not found"):
        read_documents([tmp_path / "missing.jsonl"])
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(DataError, match="bad.jsonl: cannot read as json"):
        read_documents([tmp_path / "bad.jsonl"])
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError) as err:
        read_documents([tmp_path / "x.csv"])
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{tmp_path / 'x.csv'}: unknown data format '.csv'")
    assert all(ext in message for ext in (".txt", ".jsonl", ".parquet", "no extension"))
    (tmp_path / "f.jsonl").write_text(json.dumps({"body": "hi"}) + "\n")
    with pytest.raises(DataError, match="no field 'text'"):
        read_documents([tmp_path / "f.jsonl"])
    with pytest.raises(DataError, match="not enough for one sequence"):
        pack_documents(tokenize_documents(["hi"], tokenizer), 64)
    with pytest.raises(DataError, match="no tokenizer found"):
        load_tokenizer(tmp_path)
