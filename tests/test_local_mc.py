"""The local multiple-choice task (m2d_jax/eval/local_mc.py): construction from the documents, scoring against
log-softmax of model(...) logits in NumPy, accuracy 1 for an oracle that knows the documents, chance for a random
model."""

import numpy as np
import pytest
from flax import nnx

from conftest import corpus_documents
from m2d_jax.data import DataError
from m2d_jax.eval.local_mc import (build_choice_task, choice_accuracy, choice_logprobs, evaluate_choice_task,
                                   score_choices)

VOCAB = 96
CONTEXT, CONTINUATION = 12, 6


@pytest.fixture(scope="module")
def documents():
    """Real text as token ids: the bytes of the embedded corpus' documents folded into a small vocabulary."""
    return [[b % VOCAB for b in doc.encode()] for doc in corpus_documents(12, max_chars=1500)]


@pytest.fixture(scope="module")
def task(documents):
    return build_choice_task(documents, 200, CONTEXT, CONTINUATION, seed=3)


def _random_lm(seed=0):
    from m2d_jax.models import AttentionSpec, CausalLM, FFNSpec, ModelConfig, RuntimeConfig

    config = ModelConfig(family="qwen3", vocab_size=VOCAB, hidden_size=32, num_layers=2, ffn_kinds=("dense",) * 2,
                         attention=AttentionSpec(num_heads=2, num_kv_heads=1, head_dim=16,
                                                 layer_types=("full_attention",) * 2),
                         ffn=FFNSpec(intermediate_size=64), tie_word_embeddings=False)
    return CausalLM(config, RuntimeConfig(compute_dtype="float32"), nnx.Rngs(seed))


def test_items_are_true_continuations_and_other_documents(documents, task):
    assert task.contexts.shape == (200, CONTEXT) and task.choices.shape == (200, 4, CONTINUATION)
    for item in range(task.num_items):
        answer, docs = task.answers[item], task.documents[item]
        assert len(set(docs.tolist())) == 4  # every choice from its own document, no two choices equal
        assert len({tuple(c) for c in task.choices[item].tolist()}) == 4
        true_text = np.concatenate([task.contexts[item], task.choices[item, answer]]).tolist()
        source = documents[docs[answer]]
        assert any(source[s:s + len(true_text)] == true_text for s in range(len(source)))
        for c in range(4):  # each choice is a piece of the document it is said to come from
            piece = task.choices[item, c].tolist()
            other = documents[docs[c]]
            assert any(other[s:s + CONTINUATION] == piece for s in range(len(other)))
    counts = np.bincount(task.answers, minlength=4)
    assert counts.min() >= 30  # the answer's position is drawn uniformly (200 items, expected 50 each)


def test_deterministic_in_seed(documents, task):
    again = build_choice_task(documents, 200, CONTEXT, CONTINUATION, seed=3)
    other = build_choice_task(documents, 200, CONTEXT, CONTINUATION, seed=4)
    assert all(np.array_equal(a, b) for a, b in zip((task.contexts, task.choices, task.answers),
                                                     (again.contexts, again.choices, again.answers)))
    assert not np.array_equal(task.contexts, other.contexts)


def test_oracle_that_knows_the_documents_scores_one(documents, task):
    """An n-gram lookup LM of the documents (log p = 0 for a token that follows its n = context length predecessors
    somewhere in the documents, log(1/V) otherwise) prefers every true continuation; a position-biased scorer gets
    chance. (With short n-grams real text is ambiguous: "====" underlines continue several documents' contexts.)"""
    n = CONTEXT
    grams = {tuple(d[i:i + n + 1]) for d in documents for i in range(len(d) - n)}

    def lookup(inputs, targets, mask):
        out = np.full(targets.shape, -np.log(VOCAB))
        for b, t in zip(*np.nonzero(mask)):
            if t >= n - 1 and tuple(inputs[b, t - n + 1:t + 1]) + (targets[b, t],) in grams:
                out[b, t] = 0.0
        return out

    assert choice_accuracy(score_choices(lookup, task, batch_size=64), task.answers) == 1.0
    first_choice = np.tile(np.array([1.0, 0.0, 0.0, 0.0]), (task.num_items, 1))
    assert abs(choice_accuracy(first_choice, task.answers) - 0.25) < 0.1


def test_scores_equal_numpy_log_softmax_and_random_model_is_at_chance(task):
    model = _random_lm()
    scores = choice_logprobs(model, task, batch_size=64)
    full = np.concatenate([np.repeat(task.contexts[:, None], 4, axis=1), task.choices], axis=2)  # [items, 4, span]
    logits = np.asarray(nnx.jit(lambda m, ids: m(ids))(model, full[:20].reshape(80, -1)), np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    ids = full[:20].reshape(80, -1)
    want = sum(logp[:, j - 1][np.arange(80), ids[:, j]] for j in range(CONTEXT, CONTEXT + CONTINUATION))
    np.testing.assert_allclose(scores[:20].reshape(-1), want, rtol=1e-4, atol=1e-3)
    result = evaluate_choice_task(model, task, batch_size=64)
    assert result["items"] == 200 and result["chance"] == 0.25
    assert 0.15 <= result["accuracy"] <= 0.35  # 200 items: binomial std 0.03 around 1/4


def test_too_few_documents_or_windows_is_a_data_error(documents):
    with pytest.raises(DataError, match="documents"):
        build_choice_task(documents[:3], 10, CONTEXT, CONTINUATION)
    with pytest.raises(DataError, match="windows"):
        build_choice_task(documents, 10_000, CONTEXT, CONTINUATION)
