"""Evaluation: WikiText-style perplexity, an in-process lm-eval backend ("m2d") and KV-cache generation."""

from m2d_jax.eval.generate import generate, generate_tokens
from m2d_jax.eval.ppl import PerplexityResult, evaluate_perplexity, perplexity, perplexity_windows
from m2d_jax.eval.scoring import target_logprobs

__all__ = ["PerplexityResult", "evaluate_perplexity", "generate", "generate_tokens", "perplexity",
           "perplexity_windows", "target_logprobs"]
