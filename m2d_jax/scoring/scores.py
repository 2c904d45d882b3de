"""The seven expert scorings (docs/METHOD.md), each a pure per-layer function of the calibration sums.

Each router scoring maps ``StatSums`` fields without the layer axis to ``[E]`` scores, higher = more important;
``score`` runs one over all layers at once (``jax.vmap`` under ``jax.jit``, float64 in a scoped
``jax.enable_x64``). Identifiers are the reference project's:

- ``selection_freq``   SF_e = n_e / T
- ``preselect_prob``   PP_e = P_e / T (mean full-softmax probability)
- ``postselect_prob``  PS_e = W_e / T (mean applied routing weight, 0 when not selected)
- ``conditional_prob`` CP_e = Q_e / max(n_e, 1) (0 if never selected)
- ``reap``             ACP; ``acp_form``: ``reap`` (default, R_e / max(n_e, 1)), ``reap_weight`` (the same with the
  applied weight w instead of p), ``factored_all`` (CP_e * N_e^all / n_G), ``factored_routed`` (CP_e * N_e^rt / n_e)
- ``gram_logdet``      DO-CP: the greedy log-det order (``logdet``) with importance CP; score = -rank
- ``gld_reap``         DO-ACP: the same with importance ACP

Ties are broken by higher SF, then lower index. The D-optimal scorings have one implementation, ``logdet_greedy``:
their score is minus the rank in the greedy order over all E experts, and ``select_experts`` takes its first K picks.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from m2d_jax.calibration import CalibrationStats, StatSums
from m2d_jax.scoring.logdet import KERNELS, GreedyResult, greedy_logdet, importance_order, logdet_kernel

SCORINGS = ("selection_freq", "preselect_prob", "postselect_prob", "conditional_prob", "reap", "gram_logdet",
            "gld_reap")
ACP_FORMS = ("reap", "reap_weight", "factored_all", "factored_routed")
DO_IMPORTANCE = {"gram_logdet": "conditional_prob", "gld_reap": "reap"}  # D-optimal scoring -> its importance
DEFAULT_OPTIONS = {"acp_form": "reap", "beta": 0.5, "ridge": 1e-4, "kernel": "cosine"}
SCORING_OPTIONS = {"reap": ("acp_form",), "gram_logdet": ("beta", "ridge", "kernel"),
                   "gld_reap": ("acp_form", "beta", "ridge", "kernel")}


def _ratio(num, den):
    return num / jnp.maximum(den, 1.0)


def selection_freq(s: StatSums):
    return s.selected_count / s.tokens


def preselect_prob(s: StatSums):
    return s.sum_preselect_prob / s.tokens


def postselect_prob(s: StatSums):
    return s.sum_applied_weight / s.tokens


def conditional_prob(s: StatSums):
    return _ratio(s.sum_selected_prob, s.selected_count)


def reap(s: StatSums, acp_form: str = "reap"):
    if acp_form == "reap":
        return _ratio(s.sum_selected_prob_norm, s.selected_count)
    if acp_form == "reap_weight":
        return _ratio(s.sum_selected_weight_norm, s.selected_count)
    if acp_form == "factored_all":
        return conditional_prob(s) * _ratio(s.sum_output_norm, s.gram_tokens)
    if acp_form == "factored_routed":
        return conditional_prob(s) * _ratio(s.sum_selected_norm, s.selected_count)
    raise ValueError(f"acp_form={acp_form!r}: expected one of {ACP_FORMS}")


_ROUTER_SCORINGS = {"selection_freq": selection_freq, "preselect_prob": preselect_prob,
                    "postselect_prob": postselect_prob, "conditional_prob": conditional_prob, "reap": reap}


@functools.partial(jax.jit, static_argnames=("scoring", "options"))
def _score_layers(sums: StatSums, scoring: str, options: tuple):
    fn = functools.partial(_ROUTER_SCORINGS[scoring], **dict(options))
    return jax.vmap(fn)(sums)


def resolve_options(scoring: str, options: dict) -> dict:
    """The options of ``scoring`` with defaults filled in (``DEFAULT_OPTIONS``); ``ValueError`` for an unknown
    scoring, an option it does not take, or a bad value."""
    if scoring not in SCORINGS:
        raise ValueError(f"unknown scoring {scoring!r}: expected one of {SCORINGS}")
    takes = SCORING_OPTIONS.get(scoring, ())
    unknown = sorted(set(options) - set(takes))
    if unknown:
        raise ValueError(f"scoring {scoring!r} takes no option(s) {unknown} (options: {takes})")
    resolved = {name: options.get(name, DEFAULT_OPTIONS[name]) for name in takes}
    if resolved.get("acp_form", "reap") not in ACP_FORMS:
        raise ValueError(f"acp_form={resolved['acp_form']!r}: expected one of {ACP_FORMS}")
    if resolved.get("kernel", "cosine") not in KERNELS:
        raise ValueError(f"kernel={resolved['kernel']!r}: expected one of {KERNELS}")
    for name in ("beta", "ridge"):
        if name in resolved:
            value = resolved[name]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value < 0:
                raise ValueError(f"{name}={value!r}: expected a finite number >= 0")
            resolved[name] = float(value)
    return resolved


def _sums_of(stats) -> StatSums:
    return stats.sums if isinstance(stats, CalibrationStats) else stats


def real_experts(stats) -> np.ndarray:
    """[L, E] bool: the experts a selection may pick (padded experts of per-layer expert counts are not; every
    expert for bare ``StatSums``)."""
    if isinstance(stats, CalibrationStats):
        return stats.real_experts
    return np.ones(np.shape(stats.selected_count), bool)


def _router_score(sums: StatSums, scoring: str, options: dict) -> np.ndarray:
    with jax.enable_x64(True):
        sums64 = StatSums(*(jnp.asarray(x, jnp.float64) for x in sums))
        return np.asarray(_score_layers(sums64, scoring, tuple(sorted(options.items()))))


def logdet_greedy(stats, scoring: str, num_selected: int, **options) -> tuple[GreedyResult, np.ndarray]:
    """The D-optimal selection of ``scoring`` (``gram_logdet`` | ``gld_reap``): (the first ``num_selected`` greedy
    picks per layer, the importance [L, E] that weights the kernel). The one implementation of D-optimal selection:
    ``score`` and ``select_experts`` both call it."""
    if scoring not in DO_IMPORTANCE:
        raise ValueError(f"{scoring!r} is not a D-optimal scoring ({', '.join(DO_IMPORTANCE)})")
    resolved = resolve_options(scoring, options)
    sums = _sums_of(stats)
    base = DO_IMPORTANCE[scoring]
    importance = _router_score(sums, base, {k: v for k, v in resolved.items() if k in SCORING_OPTIONS.get(base, ())})
    candidates = real_experts(stats)
    kernel = logdet_kernel(sums.gram, importance, beta=resolved["beta"], ridge=resolved["ridge"],
                           kernel=resolved["kernel"], candidates=candidates)
    fill_order = importance_order(importance, _router_score(sums, "selection_freq", {}), candidates)
    return greedy_logdet(kernel, num_selected, fill_order, candidates=candidates), importance


def score(stats, scoring: str, **options) -> np.ndarray:
    """Scores [num_moe_layers, E] (float64) of one of ``SCORINGS`` for every layer at once. For the D-optimal
    scorings the score is minus the rank in the greedy order over all E experts (0 for the first pick; padded
    experts rank last). Router scorings give padded experts 0 (all their statistics are 0)."""
    resolved = resolve_options(scoring, options)
    if scoring not in DO_IMPORTANCE:
        return _router_score(_sums_of(stats), scoring, resolved)
    greedy, _ = logdet_greedy(stats, scoring, _sums_of(stats).gram.shape[-1], **resolved)
    ranks = np.empty(greedy.selected.shape, np.float64)
    np.put_along_axis(ranks, greedy.selected, -np.arange(greedy.selected.shape[1], dtype=np.float64)[None], axis=1)
    return ranks
