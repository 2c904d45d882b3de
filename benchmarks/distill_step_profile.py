"""Where the distillation train step's time goes: its pieces timed separately on both sides, and the GEMM limit.

    python benchmarks/distill_step_profile.py                # benchmarks/distill_step.py's shapes, chunk 64
    python benchmarks/distill_step_profile.py --quick        # a small smoke run
    python benchmarks/distill_step_profile.py --trace DIR    # also a jax.profiler trace of the whole step

Same checkpoints, batch and loss as ``benchmarks/distill_step.py``. Each piece is its own jitted function on the
m2d_jax side (separately compiled, so XLA cannot overlap it with the rest) and the same computation on the PyTorch
side (transformers models with their default implementations, as in the eager loop):

- teacher forward: final-norm hidden states [B, S, d] (no LM head; the head is part of the loss);
- student forward, and student forward + backward (the body's gradient for a fixed cotangent of its hidden states);
- the loss forward + backward: both LM heads, the forward KL and its gradient with respect to the student's hidden
  states and head (m2d_jax: the fused chunked loss; PyTorch: full logits, ``F.kl_div``, autograd);
- the optimizer: global-norm clip + AdamW on the student's gradients;
- the whole train step (``m2d_jax.distill.train.make_train_step`` / the eager loop of ``distill_step.py``).

XLA's own counts of the student's forward and forward + backward (temporaries, bytes accessed) follow the table.

Then the GEMM table: every matmul shape of the step (forward, and both gradient GEMMs of the student's), timed on
XLA:CPU (``jnp.matmul`` jitted) and torch (MKL), and the step's GEMM time on each side if every matmul ran at that
side's measured rate. Their ratio is the GEMM-bound limit of the throughput ratio. Rounds alternate the two sides;
each figure is the best of ``--reps`` rounds. Prints Markdown.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from distill_step import batches, model_configs, jax_step, load_average, torch_models, torch_step


def best_of(fns: dict, reps: int) -> dict:
    """{name: best seconds of ``reps`` calls}; every call of every fn once per round, rounds alternating them."""
    for fn in fns.values():
        fn()  # warm-up (and compile)
    best = {name: np.inf for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def xla_counts(fn, *args) -> dict:
    """XLA's own deterministic counts of a jitted ``fn`` compiled for ``args``: temporaries (buffer assignment) and
    bytes accessed (cost analysis, which counts a while loop's body once: the scanned layers as one layer)."""
    compiled = fn.lower(*args).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return {"temp MiB": compiled.memory_analysis().temp_size_in_bytes / 2 ** 20,
            "bytes accessed MB": cost["bytes accessed"] / 1e6}


def jax_pieces(t_dir, s_dir, batch, chunk: int) -> tuple[dict, dict]:
    """({piece: timed call}, {student piece: xla_counts})."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from m2d_jax.distill.loss import fused_forward_kl_sums
    from m2d_jax.distill.objectives import head_kernel

    parts = jax_step(t_dir, s_dir, chunk, True)
    s_gd, t_gd, tx, teacher_params = parts.student_graphdef, parts.teacher_graphdef, parts.tx, parts.teacher_params
    ids, mask = (jnp.asarray(x) for x in batch)
    params, opt_state = jax.tree.map(jnp.copy, (parts.state["params"], parts.state["opt_state"]))  # step donates

    def body(graphdef, p, ids, mask):
        return nnx.merge(graphdef, p).hidden_states(ids, mask)  # [B, S, d]

    teacher_fwd = jax.jit(lambda tp, ids, mask: body(t_gd, tp, ids, mask))
    student_fwd = jax.jit(lambda sp, ids, mask: body(s_gd, sp, ids, mask))
    student_bwd = jax.jit(jax.grad(lambda sp, ids, mask, ct: jnp.sum(body(s_gd, sp, ids, mask) * ct)))
    t_hidden, s_hidden = teacher_fwd(teacher_params, ids, mask), student_fwd(params, ids, mask)
    cotangent = jnp.asarray(np.random.default_rng(2).standard_normal(s_hidden.shape, np.float32))
    s_kernel = head_kernel(nnx.merge(s_gd, params))
    t_kernel = head_kernel(nnx.merge(t_gd, teacher_params))
    loss_grad = jax.jit(jax.value_and_grad(
        lambda hs, ws, ht, wt, m: fused_forward_kl_sums(hs, ws, ht, wt, m, 1.0, chunk)[0], argnums=(0, 1)))
    grads = student_bwd(params, ids, mask, cotangent)

    def update(grads, opt_state, params):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    optimizer = jax.jit(update)
    put = {"input_ids": ids, "attention_mask": mask}

    def whole_step():
        parts.state, metrics = parts.step(parts.state, teacher_params, put)
        jax.block_until_ready(metrics)

    ready = jax.block_until_ready
    counts = {"student forward": xla_counts(student_fwd, params, ids, mask),
              "student forward + backward": xla_counts(student_bwd, params, ids, mask, cotangent)}
    return {
        "teacher forward": lambda: ready(teacher_fwd(teacher_params, ids, mask)),
        "student forward": lambda: ready(student_fwd(params, ids, mask)),
        "student forward + backward": lambda: ready(student_bwd(params, ids, mask, cotangent)),
        "loss forward + backward": lambda: ready(loss_grad(s_hidden, s_kernel, t_hidden, t_kernel, mask)),
        "optimizer (clip + AdamW)": lambda: ready(optimizer(grads, opt_state, params)),
        "whole train step": whole_step,
    }, counts


def torch_pieces(t_dir, s_dir, batch) -> dict:
    import torch
    import torch.nn.functional as F

    teacher, student, opt = torch_models(t_dir, s_dir)
    ids, mask = torch.from_numpy(batch[0]).long(), torch.from_numpy(batch[1]).long()
    with torch.no_grad():
        t_hidden = teacher.model(input_ids=ids, attention_mask=mask).last_hidden_state
        s_hidden = student.model(input_ids=ids, attention_mask=mask).last_hidden_state
    cotangent = torch.from_numpy(np.random.default_rng(2).standard_normal(s_hidden.shape, np.float32))

    def teacher_fwd():
        with torch.no_grad():
            teacher.model(input_ids=ids, attention_mask=mask)

    def student_fwd():
        with torch.no_grad():
            student.model(input_ids=ids, attention_mask=mask)

    def student_bwd():
        student.zero_grad(set_to_none=True)
        student.model(input_ids=ids, attention_mask=mask).last_hidden_state.backward(cotangent)

    def loss_grad():
        hs = s_hidden.detach().requires_grad_(True)
        with torch.no_grad():
            t_logp = F.log_softmax(teacher.lm_head(t_hidden), -1)
        s_logp = F.log_softmax(student.lm_head(hs), -1)
        kl = F.kl_div(s_logp, t_logp, reduction="none", log_target=True).sum(-1)  # [B, S]
        student.lm_head.zero_grad(set_to_none=True)
        ((kl * mask).sum()).backward()

    student_bwd()  # gradients in place for the optimizer piece

    def optimizer():
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()

    step = torch_step(teacher, student, opt)
    return {"teacher forward": teacher_fwd, "student forward": student_fwd, "student forward + backward": student_bwd,
            "loss forward + backward": loss_grad, "optimizer (clip + AdamW)": optimizer,
            "whole train step": lambda: step(*batch)}


def step_gemms(teacher: dict, student: dict, b: int, s: int, chunk: int) -> list[tuple[str, int, tuple, int]]:
    """The train step's matmuls: (name, batch count G, (M, K, N), times per step); a batched [G, M, K] @ [G, K, N].

    Student matmuls appear with their two gradient GEMMs ((M, N, K) and (K, M, N)); the teacher's forward only; the
    loss: both heads forward per chunk, the student head's two gradients. MoE experts at T*k routed rows (the
    CPU ``blocks`` dispatch pads each expert's last block, so it runs a few more)."""
    t, d, v = b * s, student["hidden_size"], student["vocab_size"]
    h, kv, hd = student["num_attention_heads"], student["num_key_value_heads"], student["head_dim"]
    rows = b * min(chunk, s) if chunk > 0 else t
    out = []

    def add(name, g, mkn, count, backward):
        m, k, n = mkn
        out.append((name, g, mkn, count))
        if backward:
            out.append((name + " dX", g, (m, n, k), count))
            out.append((name + " dW", g, (k, m, n), count))

    for who, cfg, backward in (("teacher", teacher, False), ("student", student, True)):
        layers = cfg["num_hidden_layers"]
        add(f"{who} q/o proj", 1, (t, d, h * hd), 2 * layers, backward)
        add(f"{who} k/v proj", 1, (t, d, kv * hd), 2 * layers, backward)
        add(f"{who} attention QK^T / PV", b * h, (s, hd, s), 2 * layers, backward)
        if "num_experts" in cfg:
            e, k, m = cfg["num_experts"], cfg["num_experts_per_tok"], cfg["moe_intermediate_size"]
            add(f"{who} router", 1, (t, d, e), layers, backward)
            add(f"{who} expert gate/up", e, (t * k // e, d, m), 2 * layers, backward)
            add(f"{who} expert down", e, (t * k // e, m, d), layers, backward)
        else:
            m = cfg["intermediate_size"]
            add(f"{who} MLP gate/up", 1, (t, d, m), 2 * layers, backward)
            add(f"{who} MLP down", 1, (t, m, d), layers, backward)
    add("LM heads (teacher + student) per chunk", 1, (rows, d, v), 2 * t // rows, False)
    out.append(("student head d hidden per chunk", 1, (rows, v, d), t // rows))
    out.append(("student head d kernel per chunk", 1, (d, rows, v), t // rows))
    return out


def gemm_table(gemms, reps: int) -> list[tuple]:
    """[(name, G, (M, K, N), count, XLA s, torch s)] best of ``reps`` alternating rounds per distinct shape."""
    import jax
    import jax.numpy as jnp
    import torch

    matmul = jax.jit(jnp.matmul)
    rng = np.random.default_rng(0)
    timed = {}
    for _, g, (m, k, n), _ in gemms:
        if (g, m, k, n) in timed:
            continue
        a = rng.standard_normal((g, m, k), dtype=np.float32)
        w = rng.standard_normal((g, k, n), dtype=np.float32)
        ja, jw, ta, tw = jnp.asarray(a), jnp.asarray(w), torch.from_numpy(a), torch.from_numpy(w)
        best = best_of({"xla": lambda: matmul(ja, jw).block_until_ready(), "torch": lambda: torch.bmm(ta, tw)}, reps)
        timed[(g, m, k, n)] = (best["xla"], best["torch"])
    return [(name, g, mkn, count) + timed[(g,) + mkn] for name, g, mkn, count in gemms]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--reps", type=int, default=7, help="alternating rounds; each figure is the best")
    parser.add_argument("--trace", default="", help="write a jax.profiler trace of 3 whole steps to this directory")
    args = parser.parse_args()
    import jax
    import torch

    from m2d_jax.hf.oracle import make_hf_checkpoint

    teacher_cfg, student_cfg = model_configs(args.quick)
    if args.quick:
        args.seq, args.reps = 64, 2
    load_start = load_average()
    tmp = Path(tempfile.mkdtemp(prefix="distill_profile_"))
    t_dir = make_hf_checkpoint(teacher_cfg, tmp / "teacher", seed=0, init_std=0.05)
    s_dir = make_hf_checkpoint(student_cfg, tmp / "student", seed=1, init_std=0.05)
    batch = batches(teacher_cfg["vocab_size"], args.batch, args.seq, 1)[0]
    (jax_fns, counts), torch_fns = jax_pieces(t_dir, s_dir, batch, args.chunk), torch_pieces(t_dir, s_dir, batch)
    interleaved = {f"{side} {name}": fn for name in jax_fns
                   for side, fn in (("jax", jax_fns[name]), ("torch", torch_fns[name]))}
    best = best_of(interleaved, args.reps)
    if args.trace:
        with jax.profiler.trace(args.trace):
            for _ in range(3):
                jax_fns["whole train step"]()
    gemms = gemm_table(step_gemms(teacher_cfg, student_cfg, args.batch, args.seq, args.chunk), args.reps)
    load_end = load_average()

    tokens = args.batch * args.seq
    print(f"\nteacher {teacher_cfg['num_hidden_layers']}L d={teacher_cfg['hidden_size']} E={teacher_cfg['num_experts']}"
          f" top-{teacher_cfg['num_experts_per_tok']}, dense student, vocab {teacher_cfg['vocab_size']}, batch "
          f"{args.batch} x seq {args.seq} ({tokens} tokens), loss chunk {args.chunk}; best of {args.reps} rounds; "
          f"torch threads {torch.get_num_threads()}, cores {os.cpu_count()}; load average {load_start} at start, "
          f"{load_end} at end\n")
    print("| piece (separately compiled / called) | m2d_jax ms | PyTorch ms | PyTorch / m2d_jax |\n|---|---|---|---|")
    for name in jax_fns:
        j, t = best[f"jax {name}"], best[f"torch {name}"]
        print(f"| {name} | {j * 1e3:.1f} | {t * 1e3:.1f} | {t / j:.2f}x |")
    print("\nXLA's counts of the separately compiled student pieces (deterministic; bytes accessed counts the layer "
          "loop's body once):\n\n| piece | temporaries MiB | bytes accessed MB |\n|---|---|---|")
    for name, c in counts.items():
        print(f"| {name} | {c['temp MiB']:.1f} | {c['bytes accessed MB']:.1f} |")

    print("\n| GEMM | G x (M, K, N) | per step | XLA GFLOP/s | torch GFLOP/s | XLA / torch |")
    print("|---|---|---|---|---|---|")
    total_x = total_t = flops = 0.0
    for name, g, (m, k, n), count, xs, ts in gemms:
        f = 2.0 * g * m * k * n
        flops += f * count
        total_x, total_t = total_x + xs * count, total_t + ts * count
        print(f"| {name} | {g} x ({m}, {k}, {n}) | {count} | {f / xs / 1e9:.0f} | {f / ts / 1e9:.0f} | "
              f"{ts / xs:.2f} |")
    print(f"\nthe step's {flops / 1e9:.2f} GFLOP of matmuls at the measured rates: XLA {total_x * 1e3:.1f} ms, torch "
          f"{total_t * 1e3:.1f} ms -> GEMM-bound limit of the m2d_jax / PyTorch throughput ratio: "
          f"{total_t / total_x:.2f}x")


if __name__ == "__main__":
    main()
