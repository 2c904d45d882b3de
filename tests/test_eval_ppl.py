"""Perplexity protocol (docs/METHOD.md §12.1) against exp(mean NLL) computed directly from model(...) logits."""

import json
import math

import numpy as np
import pytest
from flax import nnx
from eval_support import checkpoint_with_tokenizer

import m2d_jax
from m2d_jax.cli import main
from m2d_jax.data import DataError, load_tokenizer
from m2d_jax.eval import evaluate_perplexity, perplexity, perplexity_windows
from m2d_jax.eval.scoring import _target_logprobs


@nnx.jit
def _logits(model, ids):
    return model(ids)


def reference_nll(model, tokens, seq_len, stride):
    """The Hugging Face "perplexity of fixed-length models" loop: each window scores its last
    ``end - prev_end`` tokens (never its first), from full-window model(...) logits. Returns (nll, count, scored)."""
    nll, count, scored = 0.0, 0, []
    prev_end = 0
    for begin in range(0, len(tokens), stride):
        end = min(begin + seq_len, len(tokens))
        trg_len = end - prev_end
        window = tokens[begin:end]
        logits = np.asarray(_logits(model, window[None]), np.float64)[0]  # [n, V]
        logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
            - logits.max(-1, keepdims=True)
        for j in range(max(len(window) - trg_len, 1), len(window)):  # target j is predicted at position j - 1
            nll -= logp[j - 1, window[j]]
            count += 1
            scored.append(begin + j)
        prev_end = end
        if end == len(tokens):
            break
    return nll, count, scored


@pytest.fixture(scope="module")
def dense_model(hf_checkpoint):
    return m2d_jax.from_pretrained(hf_checkpoint("dense_gqa_headdim"))


@pytest.mark.parametrize("seq_len,stride,batch", [(32, 32, 3), (32, 12, 4), (40, 40, 1)])
def test_perplexity_equals_direct_nll(dense_model, seq_len, stride, batch):
    tokens = np.random.default_rng(seq_len + stride).integers(0, dense_model.config.vocab_size, 150)
    result = perplexity(dense_model, tokens, seq_len=seq_len, stride=stride, batch_size=batch)
    nll, count, _ = reference_nll(dense_model, tokens, seq_len, stride)
    assert result.tokens == count
    np.testing.assert_allclose(result.nll, nll, rtol=1e-5)
    np.testing.assert_allclose(result.ppl, math.exp(nll / count), rtol=1e-5)


@pytest.mark.parametrize("n,seq_len,stride", [(150, 32, 12), (97, 16, 1), (64, 32, 31), (100, 10, 10), (33, 64, 8)])
def test_windows_score_every_token_once(n, seq_len, stride):
    windows = perplexity_windows(n, seq_len, stride)
    scored = [t for begin, end, first in windows for t in range(first, end)]
    assert all(end - begin <= seq_len and begin < first for begin, end, first in windows)
    if stride < seq_len:  # overlapping windows: every token after the first, exactly once
        assert sorted(scored) == list(range(1, n))
    else:  # disjoint windows: each window's first token is context only
        assert sorted(scored) == [t for t in range(1, n) if t % seq_len != 0]


def test_windows_match_reference_loop(dense_model):
    tokens = np.random.default_rng(0).integers(0, dense_model.config.vocab_size, 70)
    _, _, scored = reference_nll(dense_model, tokens, 24, 10)
    assert scored == [t for _, end, first in perplexity_windows(70, 24, 10) for t in range(first, end)]


def test_one_compilation_for_many_windows(dense_model):
    tokens = np.random.default_rng(1).integers(0, dense_model.config.vocab_size, 400)
    perplexity(dense_model, tokens, seq_len=16, stride=16, batch_size=2)
    before = _target_logprobs._cache_size()
    perplexity(dense_model, tokens[:333], seq_len=16, stride=16, batch_size=2)  # 21 windows, ragged last one
    assert _target_logprobs._cache_size() == before


def test_evaluate_perplexity_files_and_cli(tmp_path, capsys):
    ckpt = checkpoint_with_tokenizer("dense_tied_mha", tmp_path / "model")
    docs = ["First document about modules and packages.", "Second one: classes, objects and instances.",
            "A third document on exceptions " * 8]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[:2]))
    (tmp_path / "b.txt").write_text(docs[2])
    result = evaluate_perplexity(ckpt, [tmp_path / "a.jsonl", tmp_path / "b.txt"], seq_len=32, stride=16)
    ids = np.asarray(load_tokenizer(ckpt).encode_batch(["\n\n".join(docs)])[0])
    nll, count, _ = reference_nll(m2d_jax.from_pretrained(ckpt), ids, 32, 16)
    assert result.tokens == count == len(ids) - 1
    np.testing.assert_allclose(result.nll, nll, rtol=1e-5)

    out = tmp_path / "ppl.json"
    assert main(["eval", "ppl", "--model", str(ckpt), "--data", str(tmp_path / "a.jsonl"), str(tmp_path / "b.txt"),
                 "--seq-len", "32", "--stride", "16", "--output", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(out.read_text())
    np.testing.assert_allclose(printed["ppl"], result.ppl, rtol=1e-6)


def test_bad_input(tmp_path, dense_model, hf_checkpoint, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"text": "  "}) + "\n")
    ckpt = checkpoint_with_tokenizer("dense_tied_mha", tmp_path / "model")
    with pytest.raises(DataError, match="empty.jsonl: contains no text"):
        evaluate_perplexity(ckpt, [empty], seq_len=32)
    with pytest.raises(DataError, match="no data files"):
        evaluate_perplexity(ckpt, [], seq_len=32)
    max_pos = dense_model.config.max_position_embeddings
    with pytest.raises(ValueError, match=f"seq_len={max_pos + 1} exceeds the model's max_position_embeddings"):
        perplexity(dense_model, np.arange(300) % 100, seq_len=max_pos + 1)
    with pytest.raises(ValueError, match="stride must be in"):
        perplexity(dense_model, np.arange(300) % 100, seq_len=16, stride=17)
    with pytest.raises(DataError, match="at least 2 tokens"):
        perplexity(dense_model, np.array([5]), seq_len=16)
    good = tmp_path / "good.txt"
    good.write_text("some text")
    assert main(["eval", "ppl", "--model", str(ckpt), "--data", str(good), "--seq-len", "4096"]) == 2
    assert "--seq-len 4096 exceeds the model's max_position_embeddings=128" in capsys.readouterr().err
