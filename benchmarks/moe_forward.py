"""Teacher forward throughput of m2d_jax vs transformers, import memory, and compile time vs depth.

    python benchmarks/moe_forward.py            # the issue's config: d=512, 8 layers, 64 experts, top-8, 8x512 tokens
    python benchmarks/moe_forward.py --quick    # a small smoke run

Everything is measured in this one process on the same CPU, float32. Prints a Markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

FULL = dict(model_type="qwen3_moe", vocab_size=8192, hidden_size=512, intermediate_size=1024, num_hidden_layers=8,
            num_attention_heads=8, num_key_value_heads=4, head_dim=64, moe_intermediate_size=256, num_experts=64,
            num_experts_per_tok=8, norm_topk_prob=True, max_position_embeddings=4096, tie_word_embeddings=False)
QUICK = dict(FULL, vocab_size=1024, hidden_size=128, num_hidden_layers=2, moe_intermediate_size=64, num_experts=16,
             num_experts_per_tok=4, head_dim=16)


def useful_flops_per_token(c: dict, seq: int) -> float:
    """Matmul FLOPs of the routed computation (k experts, not E), attention at the mean causal length, LM head."""
    d, h, kv, hd = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
    proj = 2 * d * (2 * h * hd + 2 * kv * hd)
    attn = 2 * 2 * h * hd * (seq + 1) / 2
    experts = c["num_experts_per_tok"] * 3 * 2 * d * c["moe_intermediate_size"] + 2 * d * c["num_experts"]
    return c["num_hidden_layers"] * (proj + attn + experts) + 2 * d * c["vocab_size"]


def time_calls(fn, reps: int) -> float:
    fn()  # warm-up (and compile)
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def bench_transformers(path, ids, reps, experts_impl):
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count())
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager", experts_implementation=experts_impl).eval()
    tids = torch.tensor(ids)

    def run():
        with torch.no_grad():
            return model(input_ids=tids).logits

    return time_calls(run, reps)


def bench_m2d(path, ids, reps, dispatch):
    import jax
    from flax import nnx

    import m2d_jax

    model = m2d_jax.from_pretrained(path, moe_dispatch=dispatch)
    graphdef, state = nnx.split(model)
    fwd = jax.jit(lambda state, ids: nnx.merge(graphdef, state)(ids))
    start = time.perf_counter()
    compiled = fwd.lower(state, ids).compile()
    compile_s = time.perf_counter() - start
    return time_calls(lambda: jax.block_until_ready(compiled(state, ids)), reps), compile_s


def compile_seconds(config_kwargs: dict, layers: int, seq: int) -> float:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from m2d_jax.hf.adapters import ADAPTERS
    from m2d_jax.models import abstract_model

    hf = dict(config_kwargs, num_hidden_layers=layers)
    config = ADAPTERS["qwen3_moe"].config_from_hf(hf, "benchmark")
    graphdef, state = nnx.split(abstract_model(config))
    fwd = jax.jit(lambda state, ids: nnx.merge(graphdef, state)(ids))
    start = time.perf_counter()
    fwd.lower(state, jax.ShapeDtypeStruct((1, seq), jnp.int32)).compile()
    return time.perf_counter() - start


IMPORT_PROBE = """
import sys, threading, time, json
def rss(field):
    for line in open('/proc/self/status'):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
import jax, m2d_jax, m2d_jax.hf.load  # baseline after imports
base_anon = rss('RssAnon:')
peak = [base_anon]; done = [False]
def sample():
    while not done[0]:
        peak[0] = max(peak[0], rss('RssAnon:')); time.sleep(0.005)
t = threading.Thread(target=sample); t.start()
model = m2d_jax.from_pretrained(sys.argv[1], progress=False)
done[0] = True; t.join()
print(json.dumps({"peak_anon_increase": peak[0] - base_anon, "final_anon_increase": rss('RssAnon:') - base_anon}))
"""


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    cfg = QUICK if args.quick else FULL
    batch, seq = (2, 128) if args.quick else (args.batch, args.seq)
    tokens = batch * seq
    flops = useful_flops_per_token(cfg, seq)

    from m2d_jax.hf.oracle import make_hf_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        path = make_hf_checkpoint(cfg, Path(tmp) / "teacher", seed=0)
        ckpt_bytes = sum(f.stat().st_size for f in path.glob("*.safetensors"))
        ids = np.random.default_rng(0).integers(0, cfg["vocab_size"], size=(batch, seq)).astype(np.int32)

        rows = []
        for impl in ("eager", "grouped_mm"):
            s = bench_transformers(path, ids, args.reps, impl)
            rows.append((f"transformers (attn eager, experts {impl})", s, None))
        baseline = rows[0][1]
        for dispatch in ("blocks", "capacity", "dense", "ragged"):
            s, c = bench_m2d(path, ids, args.reps, dispatch)
            rows.append((f"m2d_jax jit, dispatch={dispatch}", s, c))

        probe = subprocess.run([sys.executable, "-c", IMPORT_PROBE, str(path)], capture_output=True, text=True,
                               check=True)
        mem = json.loads(probe.stdout.strip().splitlines()[-1])

    compile_rows = [(n, compile_seconds(cfg, n, seq)) for n in (4, 32)]

    print(f"\nconfig: {json.dumps(cfg)}\nbatch {batch} x seq {seq} = {tokens} tokens, float32, "
          f"{os.cpu_count()} CPU cores, useful FLOPs/token {flops / 1e6:.1f} M\n")
    print("| implementation | s / forward | tokens/s | useful GFLOP/s | vs transformers eager | compile s |")
    print("|---|---|---|---|---|---|")
    for name, s, c in rows:
        print(f"| {name} | {s:.3f} | {tokens / s:,.0f} | {tokens * flops / s / 1e9:.1f} | {baseline / s:.2f}x | "
              f"{'' if c is None else f'{c:.1f}'} |")
    print(f"\nimport: checkpoint {ckpt_bytes / 2**20:.0f} MiB on disk; peak anonymous RSS increase "
          f"{mem['peak_anon_increase'] / 2**20:.0f} MiB ({mem['peak_anon_increase'] / ckpt_bytes:.2f}x checkpoint), "
          f"after import {mem['final_anon_increase'] / 2**20:.0f} MiB ({mem['final_anon_increase'] / ckpt_bytes:.2f}x)")
    print("\n| layers | compile s (jit forward) |\n|---|---|")
    for n, s in compile_rows:
        print(f"| {n} | {s:.1f} |")


if __name__ == "__main__":
    main()
