"""The scoring and selection stage (docs/METHOD.md): the seven expert scorings, the log-det kernel and greedy of
the D-optimal scorings, and ``select_experts(stats, scoring, K) -> Selection``.

- ``scores``: ``score`` and the per-layer scoring functions, ``SCORINGS``, ``ACP_FORMS``;
- ``logdet``: ``logdet_kernel``, ``greedy_logdet``, ``importance_order``, ``KERNELS``;
- ``selection``: ``Selection``, ``select_experts``, ``save_selection`` / ``load_selection``.
"""

from m2d_jax.scoring.logdet import KERNELS, GreedyResult, greedy_logdet, importance_order, logdet_kernel
from m2d_jax.scoring.scores import (ACP_FORMS, DEFAULT_OPTIONS, DO_IMPORTANCE, SCORING_OPTIONS, SCORINGS,
                                    logdet_greedy, resolve_options, score)
from m2d_jax.scoring.selection import SELECTION_FORMAT, Selection, load_selection, save_selection, select_experts

__all__ = ["ACP_FORMS", "DEFAULT_OPTIONS", "DO_IMPORTANCE", "GreedyResult", "KERNELS", "SCORINGS", "SCORING_OPTIONS",
           "SELECTION_FORMAT", "Selection", "greedy_logdet", "importance_order", "load_selection", "logdet_greedy",
           "logdet_kernel", "resolve_options", "save_selection", "score", "select_experts"]
