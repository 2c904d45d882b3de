"""The seven expert scorings of SPEC §3 and ``select_experts``, the selection later stages consume.

Each scoring is a pure per-layer function of the calibration sums (``m2d_jax.calibration.StatSums`` fields without
the layer axis) returning ``[E]`` scores, higher = more important; ``score`` runs one over all layers at once
(``jax.vmap`` under ``jax.jit``, float64 in a scoped ``jax.enable_x64``). Identifiers are the reference project's:

- ``selection_freq``   SF_e = n_e / T
- ``preselect_prob``   PP_e = P_e / T (mean full-softmax probability)
- ``postselect_prob``  PS_e = W_e / T (mean applied routing weight, 0 when not selected)
- ``conditional_prob`` CP_e = Q_e / max(n_e, 1) (0 if never selected)
- ``reap``             ACP; ``acp_form``: ``reap`` (default, R_e / max(n_e, 1)), ``reap_weight`` (the same with the
  applied weight w instead of p), ``factored_all`` (CP_e * N_e^all / n_G), ``factored_routed`` (CP_e * N_e^rt / n_e)
- ``gram_logdet``      DO-CP: greedy log-det order (``m2d_jax.selection``) with importance CP; score = -rank
- ``gld_reap``         DO-ACP: the same with importance ACP

Ties are broken by higher SF, then lower index. For the DO scorings the merge / DP weights (``weight_scores``) are
the base importance (CP or ACP, SPEC Q5); for the others the score itself.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from m2d_jax.calibration import CalibrationStats, StatSums, StatsError, validate
from m2d_jax.selection import KERNELS, _greedy_one, _kernel_one, greedy_logdet, importance_order, logdet_kernel

SCORINGS = ("selection_freq", "preselect_prob", "postselect_prob", "conditional_prob", "reap", "gram_logdet",
            "gld_reap")
ACP_FORMS = ("reap", "reap_weight", "factored_all", "factored_routed")
DO_IMPORTANCE = {"gram_logdet": "conditional_prob", "gld_reap": "reap"}


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


def _fill_order(importance, sf):
    """Experts by importance desc, then SF desc, then index asc: [E] int32."""
    return jnp.lexsort((jnp.arange(importance.shape[0]), -sf, -importance)).astype(jnp.int32)


def _greedy_rank_score(s: StatSums, importance, beta, ridge, kernel, dead_tol, stop_tol):
    e = importance.shape[0]
    kern, _ = _kernel_one(s.gram, importance, beta, ridge, dead_tol, kernel == "cosine")
    order, _, _ = _greedy_one(kern, _fill_order(importance, selection_freq(s)), e, stop_tol)
    return jnp.zeros(e, kern.dtype).at[order].set(-jnp.arange(e, dtype=kern.dtype))  # -rank: 0 is the first pick


def gram_logdet(s: StatSums, beta=0.5, ridge=1e-4, kernel="cosine", dead_tol=1e-12, stop_tol=1e-12):
    return _greedy_rank_score(s, conditional_prob(s), beta, ridge, kernel, dead_tol, stop_tol)


def gld_reap(s: StatSums, acp_form="reap", beta=0.5, ridge=1e-4, kernel="cosine", dead_tol=1e-12, stop_tol=1e-12):
    return _greedy_rank_score(s, reap(s, acp_form), beta, ridge, kernel, dead_tol, stop_tol)


_FUNCTIONS = {"selection_freq": selection_freq, "preselect_prob": preselect_prob, "postselect_prob": postselect_prob,
              "conditional_prob": conditional_prob, "reap": reap, "gram_logdet": gram_logdet, "gld_reap": gld_reap}
_OPTIONS = {"reap": ("acp_form",), "gram_logdet": ("beta", "ridge", "kernel"),
            "gld_reap": ("acp_form", "beta", "ridge", "kernel")}


@functools.partial(jax.jit, static_argnames=("scoring", "options"))
def _score_layers(sums: StatSums, scoring: str, options: tuple):
    fn = functools.partial(_FUNCTIONS[scoring], **dict(options))
    return jax.vmap(fn)(sums)


def _sums_of(stats) -> StatSums:
    return stats.sums if isinstance(stats, CalibrationStats) else stats


def _check_options(scoring: str, options: dict) -> tuple:
    if scoring not in SCORINGS:
        raise ValueError(f"unknown scoring {scoring!r}: expected one of {SCORINGS}")
    unknown = sorted(set(options) - set(_OPTIONS.get(scoring, ())))
    if unknown:
        raise ValueError(f"scoring {scoring!r} takes no option(s) {unknown} (options: {_OPTIONS.get(scoring, ())})")
    if options.get("acp_form", "reap") not in ACP_FORMS:
        raise ValueError(f"acp_form={options['acp_form']!r}: expected one of {ACP_FORMS}")
    if options.get("kernel", "cosine") not in KERNELS:
        raise ValueError(f"kernel={options['kernel']!r}: expected one of {KERNELS}")
    return tuple(sorted(options.items()))


def score(stats, scoring: str, **options) -> np.ndarray:
    """Scores [num_moe_layers, E] (float64) of one of ``SCORINGS`` for every layer at once."""
    frozen = _check_options(scoring, options)
    with jax.enable_x64(True):
        sums = StatSums(*(jnp.asarray(x, jnp.float64) for x in _sums_of(stats)))
        return np.asarray(_score_layers(sums, scoring, frozen))


class Selection(NamedTuple):
    selected: np.ndarray  # [L, K] int32, in order of importance (DO: greedy order)
    weight_scores: np.ndarray  # [L, E] merge / DP weights (SPEC §3: CP for DO-CP, ACP for DO-ACP, else the score)
    gains: np.ndarray | None  # [L, K] log-det gains of the greedy picks (DO only; -inf where filled by importance)
    filled: np.ndarray | None  # [L, K] bool: slot filled by importance after an early stop (DO only)


def run_selection(stats: CalibrationStats, scoring: str, num_selected: int, config=None, **options) -> Selection:
    """Select ``num_selected`` experts per MoE layer with ``scoring`` (see ``select_experts``)."""
    if not isinstance(stats, CalibrationStats):
        raise TypeError(f"expected CalibrationStats, got {type(stats).__name__}")
    validate(stats)
    if config is not None:
        stats.check_model(config)
    e, k = stats.num_experts, stats.top_k
    if not k <= num_selected <= e:
        raise StatsError(f"cannot keep K={num_selected} experts per layer: need top-k={k} <= K <= E={e}")
    frozen = dict(_check_options(scoring, options))
    sf = score(stats, "selection_freq")
    if scoring in DO_IMPORTANCE:
        base = DO_IMPORTANCE[scoring]
        importance = score(stats, base, **({"acp_form": frozen["acp_form"]} if "acp_form" in frozen else {}))
        kernel = logdet_kernel(stats.sums.gram, importance, beta=frozen.get("beta", 0.5),
                               ridge=frozen.get("ridge", 1e-4), kernel=frozen.get("kernel", "cosine"))
        greedy = greedy_logdet(kernel, num_selected, importance_order(importance, sf))
        return Selection(greedy.selected, importance, greedy.gains, greedy.filled)
    scores = score(stats, scoring, **frozen)
    return Selection(importance_order(scores, sf)[:, :num_selected], scores, None, None)


def select_experts(stats: CalibrationStats, scoring: str, num_selected: int, config=None,
                   **options) -> tuple[np.ndarray, np.ndarray]:
    """(selected [L, K] int32 ordered by importance / greedy order, weight_scores [L, E]) for every MoE layer.

    ``options``: ``acp_form`` (reap, gld_reap), ``beta`` / ``ridge`` / ``kernel`` (gram_logdet, gld_reap).
    ``config`` (a ModelConfig) checks that ``stats`` were collected on that model. Raises ``StatsError`` for
    K outside [top-k, E], non-finite statistics or a model mismatch. Selections are nested in K.
    """
    result = run_selection(stats, scoring, num_selected, config, **options)
    return result.selected, result.weight_scores
