"""The distillation train step compiled ahead of time for a TPU topology: fused vs checkpointed loss (compiler
estimates).

    JAX_PLATFORMS=cpu python benchmarks/distill_step_tpu_aot.py
    ... --topology v5p:2x2x1 --shapes benchmark qwen3   # the defaults; --quick: tiny shapes, a smoke run

No weights and no TPU: the library's own ``m2d_jax.distill.train.make_train_step`` (the step ``m2d distill`` runs)
is lowered with abstract, sharded arguments (``jax.ShapeDtypeStruct`` over the topology's devices, fsdp over all
chips) and compiled by libtpu on this CPU machine, once with ``loss.fused=True`` (the default) and once with
``loss.fused=False`` (the LM heads + KL under ``jax.checkpoint``, logits recomputed in the backward pass).

Shapes: ``benchmark`` is ``benchmarks/distill_step.py``'s (vocab 8192, d 256, 4 layers, 16-expert top-4 teacher,
4 x 256 tokens, loss chunk 64, float32); ``qwen3`` is Qwen3-scale (vocab 151,936, d 2048, 2 layers, 128-expert
top-8 teacher with expert width 768, bf16 teacher, float32 student with bf16 compute, 8 x 2048 tokens, chunk 256).

XLA's ``cost_analysis()`` counts the body of a ``while`` loop once, and the step has three kinds of loop (the
micro-batch scan, one scan per stack of layers, the loss-chunk scan). So the step is compiled twice per variant:
- **costs** (flops, bytes accessed, XLA's estimated time ``optimal_seconds``) from a compile with every
  ``jax.lax.scan`` fully unrolled (``unroll=True``), checked to contain no ``while`` loop, so every trip is counted;
- **memory** (per-chip arguments, temporaries) from the ordinary, scanned compile: the program ``m2d distill`` runs.
The analytic LM-head FLOPs of each variant are printed beside XLA's: the fused loss computes each chunk's logits
once (teacher 2·d_T·V, student 2·d_S·V forward + 4·d_S·V gradients per token), the checkpointed loss recomputes
both heads in the backward pass (+ 2·(d_T + d_S)·V per token).
Prints JSON and a Markdown table (BENCHMARKS.md, "Distillation step on TPU (compiler estimates)").
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import time

SHAPES = {
    "benchmark": dict(
        teacher=dict(model_type="qwen3_moe", vocab_size=8192, hidden_size=256, intermediate_size=512,
                     num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4, head_dim=32,
                     moe_intermediate_size=128, num_experts=16, num_experts_per_tok=4, norm_topk_prob=True,
                     max_position_embeddings=4096, tie_word_embeddings=False),
        student=dict(model_type="qwen3", vocab_size=8192, hidden_size=256, intermediate_size=512,
                     num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4, head_dim=32,
                     max_position_embeddings=4096, tie_word_embeddings=False),
        batch=4, seq=256, chunk=64, teacher_dtype="float32", compute_dtype="float32"),
    "qwen3": dict(
        teacher=dict(model_type="qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                     num_hidden_layers=2, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                     moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
                     max_position_embeddings=40960, tie_word_embeddings=False),
        student=dict(model_type="qwen3", vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                     num_hidden_layers=2, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                     max_position_embeddings=40960, tie_word_embeddings=False),
        batch=8, seq=2048, chunk=256, teacher_dtype="bfloat16", compute_dtype="bfloat16"),
}
LOSSES = {"fused": True, "checkpointed": False}  # name -> loss.fused
QUICK = dict(vocab_size=1024, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
             head_dim=8, num_experts=8, num_experts_per_tok=2)


@contextlib.contextmanager
def unrolled_scans():
    """Every ``jax.lax.scan`` traced inside is fully unrolled (no ``while`` loop in the compiled program)."""
    import jax

    original = jax.lax.scan
    jax.lax.scan = functools.partial(original, unroll=True)
    try:
        yield
    finally:
        jax.lax.scan = original


def _cost(compiled) -> dict:
    cost = compiled.cost_analysis()
    return cost[0] if isinstance(cost, list) else cost


def model_config(hf: dict):
    from m2d_jax.hf.adapters import adapter_for

    return adapter_for(hf["model_type"], "SHAPES").config_from_hf(hf, "SHAPES")


def uncosted_ops(cfg: dict, mesh) -> int:
    """How many ops of one teacher MoE layer XLA's TPU cost model cannot cost: it adds -1 s to ``optimal_seconds``
    for each (the stable argsort and bincount of the token sort, ``moe._sort_assignments``). Measured by compiling
    that function alone at the step's shape; the costed part of it is microseconds, so the count is exact."""
    import jax
    import jax.numpy as jnp

    from m2d_jax.distill.sharding import replicated
    from m2d_jax.models import moe

    hf = cfg["teacher"]
    top_idx = jax.ShapeDtypeStruct((cfg["batch"] * cfg["seq"], hf["num_experts_per_tok"]), jnp.int32,
                                   sharding=replicated(mesh))
    seconds = _cost(jax.jit(lambda i: moe._sort_assignments(i, hf["num_experts"])).lower(top_idx).compile())[
        "optimal_seconds"]
    if not -10.5 < seconds < 0.5 or abs(seconds - round(seconds)) > 0.01:
        raise RuntimeError(f"XLA's estimate for the MoE token sort is {seconds} s: not a count of uncosted ops")
    return -round(seconds)


def abstract_args(cfg: dict, mesh, fused: bool):
    """(jitted step, abstract state, abstract teacher params, abstract batch): sharded ShapeDtypeStructs only."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from m2d_jax.distill import train
    from m2d_jax.distill.objectives import ForwardKLDistillation
    from m2d_jax.distill.schedule import wsd_schedule
    from m2d_jax.distill.sharding import batch_sharding, param_shardings
    from m2d_jax.models import abstract_model, load_runtime

    def model(hf: dict, runtime):
        abstract = abstract_model(model_config(hf), runtime)
        shardings = param_shardings(abstract, mesh)
        graphdef, state = nnx.split(abstract, nnx.Param)
        params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                              state.to_pure_dict(), shardings)
        return graphdef, params, shardings

    s_gd, s_params, s_sh = model(cfg["student"], load_runtime("float32", compute_dtype=cfg["compute_dtype"]))
    t_gd, t_params, t_sh = model(cfg["teacher"], load_runtime(cfg["teacher_dtype"], moe_dispatch="ragged"))
    schedule = wsd_schedule(1e-4, 10 ** 6, 0, 0)
    tx = train.make_optimizer(dict(grad_clip=1.0, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0), schedule)
    state_sh = train.train_state_shardings(s_params, tx, mesh, s_sh)
    abstract_state = {"params": s_params, "opt_state": jax.eval_shape(tx.init, s_params),
                      "step": jax.ShapeDtypeStruct((), jnp.int32)}
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, state_sh)
    step = train.make_train_step(s_gd, t_gd, tx, schedule, ForwardKLDistillation(chunk=cfg["chunk"], fused=fused),
                                 1, mesh, state_sh, t_sh)
    ids = jax.ShapeDtypeStruct((cfg["batch"], cfg["seq"]), jnp.int32, sharding=batch_sharding(mesh))
    return step, state, t_params, {"input_ids": ids, "attention_mask": ids}


def compile_variant(cfg: dict, mesh, fused: bool) -> dict:
    """Memory of the scanned compile and costs of the unrolled compile of one loss variant (per chip)."""
    t0 = time.perf_counter()
    def compiled():
        step, *args = abstract_args(cfg, mesh, fused)
        return step.lower(*args).compile()

    memory = compiled().memory_analysis()
    with unrolled_scans():
        unrolled = compiled()
    if " while(" in unrolled.as_text():
        raise RuntimeError("the unrolled compile still contains a while loop: its costs would miss trip counts")
    cost = _cost(unrolled)
    uncosted = uncosted_ops(cfg, mesh) * sum(num for kind, _, num in model_config(cfg["teacher"]).stacks
                                             if kind == "moe")
    return {"flops": cost["flops"], "bytes_accessed": cost["bytes accessed"],
            "optimal_seconds": cost["optimal_seconds"], "uncosted_ops": uncosted,
            "estimated_seconds": cost["optimal_seconds"] + uncosted,
            "argument_bytes": memory.argument_size_in_bytes, "temp_bytes": memory.temp_size_in_bytes,
            "output_bytes": memory.output_size_in_bytes, "alias_bytes": memory.alias_size_in_bytes,
            "compile_s": time.perf_counter() - t0}


def head_flops(cfg: dict, fused: bool, chips: int) -> float:
    """Analytic LM-head + loss-gradient FLOPs per chip (matmuls only) of one step."""
    tokens, vocab = cfg["batch"] * cfg["seq"], cfg["student"]["vocab_size"]
    d_s, d_t = cfg["student"]["hidden_size"], cfg["teacher"]["hidden_size"]
    per_token = 2 * d_t * vocab + 2 * d_s * vocab + 4 * d_s * vocab  # heads forward + d hidden + d kernel
    if not fused:
        per_token += 2 * (d_t + d_s) * vocab  # both heads recomputed in the backward pass
    return tokens * per_token / chips


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--topology", default="v5p:2x2x1", help="TPU topology name for get_topology_desc")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--losses", nargs="+", default=list(LOSSES), choices=list(LOSSES))
    parser.add_argument("--quick", action="store_true", help="tiny models (a smoke run)")
    args = parser.parse_args()

    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compile only: other processes may hold libtpu
    import jax
    from jax.experimental import topologies

    from m2d_jax.distill.sharding import make_mesh

    devices = topologies.get_topology_desc(topology_name=args.topology, platform="tpu").devices
    mesh = make_mesh({"data": 1, "fsdp": -1, "tensor": 1, "expert": 1}, devices)
    results = {}
    for name in args.shapes:
        cfg = json.loads(json.dumps(SHAPES[name]))
        if args.quick:
            for model in ("teacher", "student"):
                cfg[model].update({k: v for k, v in QUICK.items() if k in cfg[model]})
            cfg.update(seq=128, chunk=32)
        results[name] = {}
        for variant in args.losses:
            fused = LOSSES[variant]
            results[name][variant] = dict(compile_variant(cfg, mesh, fused),
                                          head_flops_analytic=head_flops(cfg, fused, mesh.size))
            print(f"{name} {variant}: {json.dumps(results[name][variant])}", flush=True)
    print(json.dumps({"topology": args.topology, "devices": len(devices), "device_kind": devices[0].device_kind,
                      "jax": jax.__version__, "results": results}, indent=1))

    print(f"\n{args.topology} ({len(devices)} x {devices[0].device_kind}), fsdp={mesh.size}; per chip, one step\n")
    print("| shapes | loss | XLA GFLOP | analytic LM-head GFLOP | XLA GB accessed | XLA est. ms | arguments MiB "
          "| temporaries MiB |\n|---|---|---|---|---|---|---|---|")
    for name, variants in results.items():
        for variant, r in variants.items():
            print(f"| {name} | {variant} | {r['flops'] / 1e9:,.1f} | {r['head_flops_analytic'] / 1e9:,.1f} "
                  f"| {r['bytes_accessed'] / 1e9:,.2f} | {r['estimated_seconds'] * 1e3:,.2f} "
                  f"| {r['argument_bytes'] / 2**20:,.0f} | {r['temp_bytes'] / 2**20:,.0f} |")
        if len(variants) < 2:
            continue
        f, c = variants["fused"], variants["checkpointed"]
        print(f"| {name} | fused / checkpointed | {f['flops'] / c['flops']:.3f}x "
              f"| {f['head_flops_analytic'] / c['head_flops_analytic']:.3f}x "
              f"| {f['bytes_accessed'] / c['bytes_accessed']:.3f}x "
              f"| {f['estimated_seconds'] / c['estimated_seconds']:.3f}x "
              f"| | {f['temp_bytes'] / c['temp_bytes']:.3f}x |")


if __name__ == "__main__":
    main()
