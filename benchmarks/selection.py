"""Greedy log-det (DO) selection: m2d_jax jitted vs NumPy naive greedy vs NumPy incremental Cholesky.

    python benchmarks/selection.py            # E=128, K in {8,16,32,64}, 48 layers (the issue's setting)
    python benchmarks/selection.py --quick    # E=32, K in {4,8}, 4 layers

One process, same CPU, float64 everywhere. Kernels come from random expert-output Gram matrices (rank 96 < E, so
diversity matters) and random importances. The jitted time excludes compilation (reported separately); NumPy naive
recomputes slogdet for every candidate at every step and, when it would take too long, is timed on a subset of
layers and scaled (marked "extrapolated"). All three must pick identical experts (checked).
Prints a Markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from m2d_jax.scoring import greedy_logdet, logdet_kernel


def numpy_naive(kernel, k):
    picks = []
    for _ in range(k):
        cand = [j for j in range(len(kernel)) if j not in picks]
        vals = [np.linalg.slogdet(kernel[np.ix_(picks + [j], picks + [j])])[1] for j in cand]
        picks.append(cand[int(np.argmax(vals))])
    return picks


def numpy_incremental(kernel, k):
    """The docs/METHOD.md §4 pseudo-code in NumPy (vectorised over candidates), one layer."""
    e = len(kernel)
    d2 = np.diag(kernel).copy()
    v = np.zeros((e, k))
    available = np.ones(e, bool)
    picks = []
    for i in range(k):
        j = int(np.argmax(np.where(available, d2, -np.inf)))
        col = (kernel[j] - v[:, :i] @ v[j, :i]) / np.sqrt(d2[j])
        v[:, i] = col
        d2 -= col ** 2
        available[j] = False
        picks.append(j)
    return picks


def timed(fn, reps=1):
    best = np.inf
    for _ in range(reps):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--naive-budget", type=float, default=20.0, help="seconds; beyond, time fewer layers")
    args = parser.parse_args()
    layers, experts, ks = (4, 32, (4, 8)) if args.quick else (48, 128, (8, 16, 32, 64))
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(layers, experts, 96)) @ rng.normal(size=(layers, 96, 256))
    gram = feats @ feats.transpose(0, 2, 1)
    importance = rng.uniform(0.01, 1.0, size=(layers, experts))
    kernel = logdet_kernel(gram, importance)

    rows = []
    for k in ks:
        start = time.perf_counter()
        greedy_logdet(kernel, k)  # compile + first run
        compile_s = time.perf_counter() - start
        jit_s, result = timed(lambda: greedy_logdet(kernel, k), reps=5)
        pipeline_s, _ = timed(lambda: greedy_logdet(logdet_kernel(gram, importance), k), reps=5)
        inc_s, inc = timed(lambda: [numpy_incremental(kernel[l], k) for l in range(layers)], reps=3)
        one_s, _ = timed(lambda: numpy_naive(kernel[0], k))
        naive_layers = layers if one_s * layers <= args.naive_budget else max(1, int(args.naive_budget / one_s))
        naive_s, naive = timed(lambda: [numpy_naive(kernel[l], k) for l in range(naive_layers)])
        naive_s *= layers / naive_layers
        assert np.array_equal(result.selected, np.array(inc)), "jitted vs NumPy incremental picks differ"
        assert np.array_equal(result.selected[:naive_layers], np.array(naive)), "jitted vs naive picks differ"
        rows.append((k, jit_s, pipeline_s, compile_s, inc_s, naive_s, naive_layers))
        print(f"K={k}: jit {jit_s * 1e3:.1f} ms (kernel+greedy {pipeline_s * 1e3:.1f} ms, compile {compile_s:.2f} s), "
              f"numpy incremental {inc_s * 1e3:.1f} ms, numpy naive {naive_s:.2f} s"
              f"{'' if naive_layers == layers else f' (extrapolated from {naive_layers} layers)'}", flush=True)

    print(f"\nE={experts}, {layers} layers, float64; times for the whole {layers}-layer selection "
          "(best of 5 / 3 / 1 runs); identical picks checked\n")
    print("| K | m2d_jax jit greedy | + kernel build | compile | NumPy incremental | NumPy naive slogdet | "
          "jit vs incremental | jit vs naive |")
    print("|---|---|---|---|---|---|---|---|")
    for k, jit_s, pipe_s, comp_s, inc_s, naive_s, nl in rows:
        naive = f"{naive_s:.2f} s" + ("" if nl == layers else f" (extrap. from {nl} layers)")
        print(f"| {k} | {jit_s * 1e3:.1f} ms | {pipe_s * 1e3:.1f} ms | {comp_s:.2f} s | {inc_s * 1e3:.1f} ms | "
              f"{naive} | {inc_s / jit_s:.1f}x | {naive_s / jit_s:.0f}x |")


if __name__ == "__main__":
    main()
