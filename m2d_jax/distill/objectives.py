"""Training objectives: what the train step optimises, one object chosen from ``config.objective``.

The jitted step calls ``objective(student, teacher, micro_batch, tokens, micro_batches) -> (loss, metrics)`` once per
micro-batch, with the models merged from their parameters (``teacher`` is None when ``uses_teacher`` is False) and
``tokens`` the number of positions the loss averages over in the *whole* batch (the step counts them with
``objective.loss_tokens``). Each call returns its micro-batch's additive share: the step sums the losses, the
gradients and every metric over the micro-batches, so token sums divided by ``tokens`` give the exact token mean of
the batch however it is split, and per-micro-batch means are divided by ``micro_batches``.

    ForwardKLDistillation   config.objective = "kl": T^2 * forward KL(p_T || p_S) to a frozen teacher
    LanguageModeling        config.objective = "lm": next-token cross-entropy (+ Switch load balancing for MoE)
"""

from __future__ import annotations

import abc
import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from m2d_jax.distill.loss import (forward_kl_sums, fused_forward_kl_sums, load_balance_loss, next_token_ce_sums,
                                  next_token_pairs, router_load_observer)
from m2d_jax.models import CausalLM

Metrics = dict[str, jax.Array]


class Objective(abc.ABC):
    """A training objective (see the module docstring for the contract with the train step)."""

    uses_teacher: ClassVar[bool]

    @classmethod
    @abc.abstractmethod
    def from_loss_config(cls, loss) -> Objective:
        """The objective with its parameters from a config's ``loss`` group (configs/distill/base.py)."""

    @abc.abstractmethod
    def loss_tokens(self, mask: jax.Array) -> jax.Array:
        """[B, S] 1 at the positions the loss is a mean over, given the attention mask [B, S] (1 = real token)."""

    @abc.abstractmethod
    def __call__(self, student: CausalLM, teacher: CausalLM | None, batch: dict[str, jax.Array], tokens: jax.Array,
                 micro_batches: int) -> tuple[jax.Array, Metrics]:
        """(loss, metrics) of one micro-batch ``batch`` = {"input_ids", "attention_mask"} int32 [b, S], as shares
        of the whole batch's values; ``tokens``: float32 count of ``loss_tokens`` over the whole batch."""


def head_kernel(model: CausalLM) -> jax.Array:
    """The LM-head kernel [d, V] of ``CausalLM.logits`` (``hidden @ kernel``): ``embed.T`` when the embeddings are
    tied, else ``lm_head``, in the parameter dtype."""
    return model.embed[...].T if model.config.tie_word_embeddings else model.lm_head[...]


@dataclasses.dataclass(frozen=True)
class ForwardKLDistillation(Objective):
    """T^2 * mean over real tokens of KL(p_T || p_S), p = softmax(logits / T); the teacher under ``stop_gradient``.
    Metric ``kl``: the unscaled mean KL. ``fused``: the LM heads and the KL in one pass with its own gradient
    (``fused_forward_kl_sums``, no logits recomputed in the backward pass); False: the heads under
    ``jax.checkpoint`` (``forward_kl_sums``). Both give the same loss and gradients (with bf16 compute, up to
    rounding: the fused heads keep float32 logits)."""

    temperature: float = 1.0
    chunk: int = 256  # sequence positions per loss chunk (0 = one chunk)
    fused: bool = True
    uses_teacher: ClassVar[bool] = True

    @classmethod
    def from_loss_config(cls, loss):
        return cls(loss.temperature, loss.chunk, loss.fused)

    def loss_tokens(self, mask):
        return mask

    def __call__(self, student, teacher, batch, tokens, micro_batches):
        ids, mask = batch["input_ids"], batch["attention_mask"]  # [b, S]
        teacher_hidden = jax.lax.stop_gradient(teacher.hidden_states(ids, mask))  # [b, S, d_T]
        student_hidden = student.hidden_states(ids, mask)  # [b, S, d_S]
        if self.fused:
            kl_sum, _ = fused_forward_kl_sums(student_hidden, head_kernel(student), teacher_hidden,
                                              head_kernel(teacher), mask, self.temperature, self.chunk)
        else:
            kl_sum, _ = forward_kl_sums(student_hidden, teacher_hidden, mask, student.logits, teacher.logits,
                                        self.temperature, self.chunk)
        kl = kl_sum / tokens
        return self.temperature ** 2 * kl, {"kl": kl}


@dataclasses.dataclass(frozen=True)
class LanguageModeling(Objective):
    """Mean next-token cross-entropy over (real token, real next token) pairs, plus ``load_balance_weight`` times
    the Switch load-balancing loss (averaged over micro-batches) when the student has MoE layers. Metrics ``ce`` and
    ``load_balance`` (0 for a dense student)."""

    chunk: int = 256
    load_balance_weight: float = 0.01
    uses_teacher: ClassVar[bool] = False

    @classmethod
    def from_loss_config(cls, loss):
        return cls(loss.chunk, loss.load_balance_weight)

    def loss_tokens(self, mask):
        return next_token_pairs(mask)

    def __call__(self, student, teacher, batch, tokens, micro_batches):
        ids, mask = batch["input_ids"], batch["attention_mask"]  # [b, S]
        if student.config.is_moe:
            hidden, observations = student.hidden_states(ids, mask, observe=router_load_observer(mask))
            balance = load_balance_loss(observations) / micro_batches
        else:
            hidden, balance = student.hidden_states(ids, mask), jnp.zeros((), jnp.float32)
        ce_sum, _ = next_token_ce_sums(hidden, ids, mask, student.logits, self.chunk)
        ce = ce_sum / tokens
        return ce + self.load_balance_weight * balance, {"ce": ce, "load_balance": balance}


OBJECTIVES: dict[str, type[Objective]] = {"kl": ForwardKLDistillation, "lm": LanguageModeling}  # config.objective


def objective_from_config(config) -> Objective:
    """The objective ``config.objective`` names (one of ``OBJECTIVES``), with its ``config.loss`` parameters."""
    return OBJECTIVES[config.objective].from_loss_config(config.loss)
