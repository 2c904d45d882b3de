"""Expert-block GEMM throughput on this CPU: XLA (what m2d_jax's jitted MoE runs) vs torch/MKL (what transformers'
eager per-expert loop runs), same shapes, same process.

    python benchmarks/expert_gemm.py           # the calibration benchmark's expert shapes (d=256, m=128)
    python benchmarks/expert_gemm.py --d 512 --m 256

An MoE layer's routed compute is a grouped matmul: blocks of b token rows, each against one expert's
[d, 2m] gate/up and [m, d] down weights. On the accelerator these run on the MXU / tensor cores; on the 2-core
development CPU they bound how fast a jitted forward can be next to transformers' eager forward, and with it the
calibration-pass and forward-throughput ratios in BENCHMARKS.md. Both sides get float32 operands already in memory
(no gathers), G blocks per call, best of ``--reps`` calls; torch uses every core (``torch.get_num_threads()``).
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def best_seconds(fn, reps: int) -> float:
    fn()  # warm-up (and compile)
    best = np.inf
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--d", type=int, default=256, help="hidden size")
    parser.add_argument("--m", type=int, default=128, help="expert width (moe_intermediate_size)")
    parser.add_argument("--rows", type=int, default=8192, help="token rows per call (G blocks of b rows)")
    parser.add_argument("--reps", type=int, default=9)
    args = parser.parse_args()
    import jax
    import jax.numpy as jnp
    import torch

    d, m = args.d, args.m
    rng = np.random.default_rng(0)
    matmul = jax.jit(jnp.matmul)
    print(f"d={d}, m={m}, {args.rows} rows per call; torch threads: {torch.get_num_threads()}; "
          f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__}\n")
    print("| GEMM | blocks x rows | XLA GFLOP/s | torch GFLOP/s | XLA / torch |")
    print("|---|---|---|---|---|")
    for name, k, n in (("gate+up [b, d] @ [d, 2m]", d, 2 * m), ("down [b, m] @ [m, d]", m, d)):
        for rows in (128, 256, 512, args.rows):
            g = args.rows // rows
            a = rng.standard_normal((g, rows, k), dtype=np.float32)
            b = rng.standard_normal((g, k, n), dtype=np.float32)
            ja, jb = jnp.asarray(a), jnp.asarray(b)
            ta, tb = torch.from_numpy(a), torch.from_numpy(b)
            xla_s = best_seconds(lambda: matmul(ja, jb).block_until_ready(), args.reps)
            torch_s = best_seconds(lambda: torch.bmm(ta, tb), args.reps)
            flops = 2 * g * rows * k * n
            print(f"| {name} | {g} x {rows} | {flops / xla_s / 1e9:.0f} | {flops / torch_s / 1e9:.0f} | "
                  f"{torch_s / xla_s:.2f} |", flush=True)


if __name__ == "__main__":
    main()
