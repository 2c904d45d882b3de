"""A local multiple-choice task built from held-out text: given a context, pick its true continuation.

Each item is a window of ``context_len + continuation_len`` tokens cut from one held-out document: the context is
its first ``context_len`` tokens, the answer its last ``continuation_len``. The other ``num_choices - 1`` choices
are the continuations of windows cut the same way from other documents (one per document, none equal to another choice),
so every choice is real text of the same length that starts at the same kind of boundary; only the true one follows
the context. The
answer's position is drawn uniformly. Everything is drawn from one seeded generator: the same documents, sizes and
seed give the same task.

A model scores each choice by its log-likelihood given the context (the sum of the continuation's token
log-probabilities, ``m2d_jax.eval.scoring.target_logprobs``); accuracy is the fraction of items whose true
continuation scores highest. Chance is ``1 / num_choices``.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

from m2d_jax.data import DataError


@dataclasses.dataclass(frozen=True)
class ChoiceTask:
    contexts: np.ndarray  # [items, context_len] int32
    choices: np.ndarray  # [items, choices, continuation_len] int32
    answers: np.ndarray  # [items] int32: index of the true continuation among the choices
    documents: np.ndarray  # [items, choices] int32: the document each choice was cut from

    @property
    def num_items(self) -> int:
        return len(self.answers)


def build_choice_task(documents: Sequence[Sequence[int]], num_items: int, context_len: int = 48,
                      continuation_len: int = 16, num_choices: int = 4, seed: int = 0) -> ChoiceTask:
    """``num_items`` items from token-id ``documents`` (one sequence per held-out document), deterministic in
    ``seed``. Windows are disjoint within a document; an item's window is never reused as another item's."""
    if context_len < 1 or continuation_len < 1 or num_choices < 2 or num_items < 1:
        raise ValueError(f"need context_len, continuation_len, num_items >= 1 and num_choices >= 2, got "
                         f"{context_len}, {continuation_len}, {num_items}, {num_choices}")
    span = context_len + continuation_len
    windows = [(doc, start) for doc, ids in enumerate(documents) for start in range(0, len(ids) - span + 1, span)]
    usable = sorted({doc for doc, _ in windows})
    if len(usable) < num_choices:
        raise DataError(f"multiple-choice task: {len(usable)} documents have >= {span} tokens, need {num_choices}")
    if len(windows) < num_items:
        raise DataError(f"multiple-choice task: {len(windows)} windows of {span} tokens, asked for {num_items} items")
    by_doc = {doc: [w for w in windows if w[0] == doc] for doc in usable}
    rng = np.random.default_rng(seed)
    tokens = [np.asarray(ids, np.int32) for ids in documents]
    contexts = np.zeros((num_items, context_len), np.int32)
    choices = np.zeros((num_items, num_choices, continuation_len), np.int32)
    answers = rng.integers(num_choices, size=num_items).astype(np.int32)
    sources = np.zeros((num_items, num_choices), np.int32)

    def continuation(window):
        return tokens[window[0]][window[1] + context_len:window[1] + span]

    for item, index in enumerate(rng.choice(len(windows), size=num_items, replace=False)):
        doc, start = windows[index]
        picked = [(doc, start)]
        for other in rng.permutation([d for d in usable if d != doc]):
            window = by_doc[other][rng.integers(len(by_doc[other]))]
            if not any(np.array_equal(continuation(window), continuation(p)) for p in picked):
                picked.append(window)  # a distractor equal to a picked choice (e.g. a run of spaces) is skipped
            if len(picked) == num_choices:
                break
        else:
            raise DataError(f"multiple-choice task: fewer than {num_choices} distinct continuations for the window "
                            f"at token {start} of document {doc}")
        rest = iter(range(1, num_choices))  # picked[0] is the true window; the others keep their drawn order
        order = [0 if c == answers[item] else next(rest) for c in range(num_choices)]
        contexts[item] = tokens[doc][start:start + context_len]
        for c, p in enumerate(order):
            choices[item, c], sources[item, c] = continuation(picked[p]), picked[p][0]
    return ChoiceTask(contexts, choices, answers, sources)


def choice_rows(task: ChoiceTask) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The model inputs of every (item, choice): inputs [items * choices, span - 1] (context + continuation without
    its last token), targets [same] (the next tokens) and a bool mask [same] of the continuation's targets."""
    items, n, length = task.choices.shape
    context_len = task.contexts.shape[1]
    full = np.concatenate([np.repeat(task.contexts[:, None], n, axis=1), task.choices], axis=2).reshape(items * n, -1)
    scored = np.zeros(full[:, 1:].shape, bool)
    scored[:, context_len - 1:] = True  # target j is token j + 1: the continuation starts at token context_len
    return full[:, :-1], full[:, 1:], scored


def score_choices(logprob_fn: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray], task: ChoiceTask,
                  batch_size: int = 32) -> np.ndarray:
    """Log-likelihood [items, choices] of each continuation given its context: the sum over the continuation of
    ``logprob_fn(inputs, targets, attention_mask)`` [B, T] (log p(targets[b, t] | inputs[b, :t + 1])). Rows are
    batched as [batch_size, T] (the last batch padded with empty rows), so a jitted ``logprob_fn`` compiles once."""
    inputs, targets, scored = choice_rows(task)
    rows = len(inputs)
    padded = -(-rows // batch_size) * batch_size
    pad = ((0, padded - rows), (0, 0))
    inputs, targets, scored = np.pad(inputs, pad), np.pad(targets, pad), np.pad(scored, pad)
    mask = np.zeros(inputs.shape, np.int32)
    mask[:rows] = 1
    sums = np.zeros(padded, np.float64)
    for i in range(0, padded, batch_size):
        b = slice(i, i + batch_size)
        logprob = np.asarray(logprob_fn(inputs[b], targets[b], mask[b]), np.float64)
        sums[b] = np.sum(logprob, axis=1, where=scored[b])
    return sums[:rows].reshape(task.choices.shape[:2])


def choice_logprobs(model, task: ChoiceTask, batch_size: int = 32) -> np.ndarray:
    """``score_choices`` with an m2d_jax causal LM (``target_logprobs``)."""
    from m2d_jax.eval.scoring import target_logprobs

    return score_choices(lambda ids, targets, mask: target_logprobs(model, ids, targets, mask)[0], task, batch_size)


def choice_accuracy(scores: np.ndarray, answers: np.ndarray) -> float:
    """Fraction of items [items, choices] whose true choice has the (first) highest score."""
    return float(np.mean(np.argmax(scores, axis=1) == answers))


def evaluate_choice_task(model, task: ChoiceTask, batch_size: int = 32) -> dict:
    """{"accuracy", "items", "choices", "chance"} of ``model`` on ``task``."""
    n = task.choices.shape[1]
    return {"accuracy": choice_accuracy(choice_logprobs(model, task, batch_size), task.answers),
            "items": task.num_items, "choices": n, "chance": 1.0 / n}


__all__ = ["ChoiceTask", "build_choice_task", "choice_accuracy", "choice_logprobs", "choice_rows",
           "evaluate_choice_task", "score_choices"]
