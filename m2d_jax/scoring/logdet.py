"""D-optimal (log-det) greedy expert selection (docs/METHOD.md): jitted array ops, vmapped over layers, float64.

Kernel (per layer): ``L = diag(q) C diag(q) + lam I`` with

- ``C`` the cosine-normalised expert-output Gram ``G_ij / sqrt(G_ii G_jj)`` with ``C_ii = 1`` exactly (dead experts,
  ``G_ii <= dead_tol * max_j G_jj``, get zero off-diagonals), or the raw Gram ``G`` (``kernel="raw"``, an ablation,
  docs/METHOD.md §13 open question 6);
- ``q_e = (s_e / mean of the positive s)^beta`` from an importance score ``s`` (CP for DO-CP, ACP for DO-ACP),
  ``s`` clamped to ``>= 1e-8 max s`` (``q = 1`` when every score is 0);
- ``lam = ridge * mean(diag(diag(q) C diag(q)))``.

Padded experts (per-layer expert counts: ``candidates`` False) are not part of a layer: ``lam`` is the mean over
its candidates, and the greedy picks a non-candidate only once every candidate is picked, as a filled slot, so a
padded layer selects exactly what its unpadded form does.

Greedy: the incremental-Cholesky argmax of the Schur complement ``d2[j] = L_jj - L_jS L_S^{-1} L_Sj`` (so the gain of
adding ``j`` is ``log d2[j]`` and the picks maximise ``log det L_S`` greedily), ``K`` steps of a ``lax.fori_loop``,
O(E K^2) time and O(E K) memory per layer. Properties:

- **nested**: the selection for K is the prefix of the selection for any K' > K (the loop never looks ahead);
- **deterministic ties**: among exactly equal residuals the expert earliest in ``fill_order`` wins (importance
  desc, then SF desc, then index asc when called from ``select_experts``; index asc by default). Equal
  importances give exactly equal kernel diagonals (``C_ii = 1``, equal ``q``), so e.g. ``beta = 0`` picks the most
  important expert first, and a layer whose importances are all equal starts with the most frequently selected;
- **early stop**: once the best residual is ``<= stop_tol * max diag(L)`` (it never is with ``ridge > 0``: every
  residual is ``>= lam``), the remaining slots are filled in importance order (score desc, then SF desc, then
  index asc: ``importance_order``); filled slots report gain ``-inf``.

Precision: the kernel and the greedy run in float64 under a scoped ``jax.enable_x64(True)`` (inputs are converted
to float64 inside the scope; nothing outside the scope changes). Every public function here takes and returns NumPy
arrays with a leading ``[layers]`` axis.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

KERNELS = ("cosine", "raw")


class GreedyResult(NamedTuple):
    selected: np.ndarray  # [L, K] int32 expert ids in pick order
    gains: np.ndarray  # [L, K] float64 log d2 of each pick (-inf where filled by importance after an early stop)
    filled: np.ndarray  # [L, K] bool: slot filled by importance order (early stop), not by the log-det greedy


def _kernel_one(gram, importance, candidates, beta, ridge, dead_tol, cosine: bool):
    """One layer: gram [E, E], importance [E], candidates [E] bool -> (L [E, E], q [E])."""
    diag = jnp.diagonal(gram)  # [E]
    dead = diag <= dead_tol * jnp.max(diag)
    if cosine:
        scale = jnp.where(dead, 1.0, 1.0 / jnp.sqrt(jnp.where(dead, 1.0, diag)))
        sim = gram * scale[:, None] * scale[None, :]
        live = ~dead
        sim = jnp.where(live[:, None] & live[None, :], sim, 0.0)
        # exactly 1, dead or live: G_ii / sqrt(G_ii)^2 can be 1 ulp off, which would break exact ties
        sim = sim.at[jnp.diag_indices_from(sim)].set(1.0)
    else:
        sim = gram
    s_max = jnp.max(importance)
    positive = importance > 0
    s_bar = jnp.sum(jnp.where(positive, importance, 0.0)) / jnp.maximum(jnp.sum(positive), 1)
    s = jnp.maximum(importance, 1e-8 * s_max)
    q = jnp.where(s_max > 0, (s / jnp.where(s_bar > 0, s_bar, 1.0)) ** beta, 1.0)  # [E]
    weighted = sim * q[:, None] * q[None, :]
    lam = ridge * jnp.sum(jnp.where(candidates, jnp.diagonal(weighted), 0.0)) / jnp.maximum(jnp.sum(candidates), 1)
    return weighted + lam * jnp.eye(gram.shape[0], dtype=gram.dtype), q


def _greedy_one(kernel, fill_order, candidates, k: int, stop_tol):
    """One layer: kernel [E, E] SPD, fill_order [E] (importance order, non-candidates last), candidates [E] bool
    -> (selected [K], gains [K], filled [K])."""
    e = kernel.shape[0]
    stop_at = stop_tol * jnp.max(jnp.where(candidates, jnp.diagonal(kernel), -jnp.inf))

    def step(i, carry):
        d2, chol, available, stopped, selected, gains, filled = carry
        ranked = jnp.where((available & candidates)[fill_order], d2[fill_order], -jnp.inf)  # in importance order
        best = fill_order[jnp.argmax(ranked)]  # exact ties go to the more important expert
        stopped = stopped | (d2[best] <= stop_at) | ~jnp.any(available & candidates)  # or every candidate picked
        fill = fill_order[jnp.argmax(available[fill_order])]  # first unselected expert in importance order
        j = jnp.where(stopped, fill, best).astype(jnp.int32)
        residual = d2[j]
        pivot = jnp.sqrt(jnp.maximum(residual, jnp.finfo(kernel.dtype).tiny))
        column = (kernel[j] - chol @ chol[j]) / pivot  # [E] new Cholesky column (columns > i of chol are 0)
        column = jnp.where(stopped, 0.0, column)
        chol = chol.at[:, i].set(column)
        d2 = d2 - column ** 2
        available = available.at[j].set(False)
        gains = gains.at[i].set(jnp.where(stopped, -jnp.inf, jnp.log(residual)))
        return d2, chol, available, stopped, selected.at[i].set(j), gains, filled.at[i].set(stopped)

    init = (jnp.diagonal(kernel), jnp.zeros((e, k), kernel.dtype), jnp.ones(e, bool), jnp.asarray(False),
            jnp.zeros(k, jnp.int32), jnp.zeros(k, kernel.dtype), jnp.zeros(k, bool))
    _, _, _, _, selected, gains, filled = jax.lax.fori_loop(0, k, step, init)
    return selected, gains, filled


@functools.partial(jax.jit, static_argnames=("cosine",))
def _kernels(gram, importance, candidates, beta, ridge, dead_tol, cosine: bool):
    return jax.vmap(_kernel_one, in_axes=(0, 0, 0, None, None, None, None))(gram, importance, candidates, beta,
                                                                             ridge, dead_tol, cosine)


@functools.partial(jax.jit, static_argnames=("k",))
def _greedy(kernel, fill_order, candidates, k: int, stop_tol):
    return jax.vmap(_greedy_one, in_axes=(0, 0, 0, None, None))(kernel, fill_order, candidates, k, stop_tol)


def _candidates(candidates, shape) -> np.ndarray:
    """[L, E] bool (default: every expert a candidate)."""
    return np.ones(shape, bool) if candidates is None else np.broadcast_to(np.asarray(candidates, bool), shape)


def importance_order(scores, tie_break=None, candidates=None) -> np.ndarray:
    """Experts sorted by score desc, then ``tie_break`` (e.g. SF) desc, then index asc; non-``candidates`` [L, E]
    (padded experts) after every candidate. scores [L, E] -> [L, E]."""
    scores = np.asarray(scores, np.float64)
    tie_break = np.zeros_like(scores) if tie_break is None else np.asarray(tie_break, np.float64)
    padded = ~_candidates(candidates, scores.shape)
    index = np.broadcast_to(np.arange(scores.shape[-1]), scores.shape)
    return np.stack([np.lexsort((index[l], -tie_break[l], -scores[l], padded[l]))
                     for l in range(scores.shape[0])]).astype(np.int32)


def logdet_kernel(gram, importance, beta: float = 0.5, ridge: float = 1e-4, kernel: str = "cosine",
                  dead_tol: float = 1e-12, candidates=None) -> np.ndarray:
    """The selection kernels L [L, E, E] (float64) from Gram matrices [L, E, E] and importance scores [L, E];
    ``candidates`` [L, E] (default all): the experts the ridge is averaged over (padded experts are not)."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel={kernel!r}: expected one of {KERNELS}")
    if beta < 0 or ridge < 0:
        raise ValueError(f"beta={beta} and ridge={ridge} must be >= 0")
    importance = np.asarray(importance, np.float64)
    with jax.enable_x64(True):
        out, _ = _kernels(jnp.asarray(gram, jnp.float64), jnp.asarray(importance),
                          jnp.asarray(_candidates(candidates, importance.shape)), float(beta), float(ridge),
                          float(dead_tol), kernel == "cosine")
        return np.asarray(out)


def greedy_logdet(kernel, k: int, fill_order=None, stop_tol: float = 1e-12, candidates=None) -> GreedyResult:
    """Greedy log-det maximisation on kernels [L, E, E] (symmetric PSD), K picks per layer, float64.

    ``fill_order`` [L, E] is the importance order used after an early stop (default: expert index; with
    ``candidates``, it must rank the non-candidates last). ``candidates`` [L, E] bool (default all): a
    non-candidate (a padded expert) is picked only once every candidate of its layer is, as a filled slot.
    """
    kernel = np.asarray(kernel)
    if kernel.ndim != 3 or kernel.shape[1] != kernel.shape[2]:
        raise ValueError(f"kernel must be [layers, experts, experts], got shape {kernel.shape}")
    num_layers, e = kernel.shape[:2]
    if not 1 <= k <= e:
        raise ValueError(f"cannot select K={k} experts out of E={e}")
    if not np.isfinite(kernel).all():
        raise ValueError("kernel contains NaN or inf")
    candidates = _candidates(candidates, (num_layers, e))
    if fill_order is None:
        fill_order = importance_order(np.zeros((num_layers, e)), candidates=candidates)
    with jax.enable_x64(True):
        selected, gains, filled = _greedy(jnp.asarray(kernel, jnp.float64), jnp.asarray(fill_order, jnp.int32),
                                          jnp.asarray(candidates), int(k), float(stop_tol))
        return GreedyResult(np.asarray(selected), np.asarray(gains), np.asarray(filled))
