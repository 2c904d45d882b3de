"""Distillation train-step throughput of m2d_jax vs a PyTorch eager loop, and peak memory of the chunked loss.

    python benchmarks/distill_step.py            # d=256, 4 layers, 16 experts top-4 teacher; 4 x 256 tokens/step
    python benchmarks/distill_step.py --quick    # a small smoke run
    python benchmarks/distill_step.py --unfused  # the loss under jax.checkpoint (loss.fused=False)

Both loops run in this one process on the same CPU, float32, with the same random HF checkpoints (transformers
Qwen3-MoE teacher, Qwen3 dense student), the same token batches, the same loss (forward KL, T=1, masked token mean),
AdamW (0.9, 0.95, eps 1e-8, wd 0) and global-norm clipping at 1.0. The PyTorch loop is what a user would write:
teacher under no_grad, full logits of both models, F.kl_div. Memory: XLA's own buffer assignment
(``compiled.memory_analysis()``) of the whole jitted train step with the loss chunked vs unchunked. Prints Markdown.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

TEACHER = dict(model_type="qwen3_moe", vocab_size=8192, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
               num_attention_heads=8, num_key_value_heads=4, head_dim=32, moe_intermediate_size=128, num_experts=16,
               num_experts_per_tok=4, norm_topk_prob=True, max_position_embeddings=4096, tie_word_embeddings=False)
STUDENT = dict(model_type="qwen3", vocab_size=8192, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
               num_attention_heads=8, num_key_value_heads=4, head_dim=32, max_position_embeddings=4096,
               tie_word_embeddings=False)
QUICK = dict(vocab_size=1024, hidden_size=64, num_hidden_layers=2, head_dim=8)
MEMORY = dict(vocab_size=32768, hidden_size=128, intermediate_size=256, moe_intermediate_size=64, head_dim=16)
LR = 1e-4


def batches(vocab: int, batch: int, seq: int, n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, vocab, (batch, seq)).astype(np.int32), np.ones((batch, seq), np.int32))
            for _ in range(n)]


def jax_step(teacher_dir, student_dir, chunk: int, fused: bool):
    """The library's jitted train step on one device: (state, teacher params, step fn, mesh)."""
    import jax

    from m2d_jax.distill import train
    from m2d_jax.distill.objectives import ForwardKLDistillation
    from m2d_jax.distill.schedule import wsd_schedule
    from m2d_jax.distill.sharding import make_mesh
    from flax import nnx

    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1, "expert": 1}, jax.devices()[:1])
    student, s_sh = train.load_for_mesh(student_dir, mesh, "float32")
    teacher, t_sh = train.load_for_mesh(teacher_dir, mesh, "float32")
    schedule = wsd_schedule(LR, 10 ** 6, 0, 0)
    tx = train.make_optimizer(dict(grad_clip=1.0, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0), schedule)
    s_gd, s_state = nnx.split(student, nnx.Param)
    t_gd, t_state = nnx.split(teacher, nnx.Param)
    state, state_sh = train.init_train_state(s_state.to_pure_dict(), tx, mesh, s_sh)
    step = train.make_train_step(s_gd, t_gd, tx, schedule, ForwardKLDistillation(chunk=chunk, fused=fused), 1, mesh,
                                 state_sh, t_sh)
    return state, t_state.to_pure_dict(), step, mesh


def run_jax(teacher_dir, student_dir, data, chunk: int, fused: bool) -> tuple[float, list[float]]:
    import jax

    from m2d_jax.distill.sharding import batch_sharding

    state, teacher_params, step, mesh = jax_step(teacher_dir, student_dir, chunk, fused)
    put = lambda b: {"input_ids": jax.device_put(b[0], batch_sharding(mesh)),  # noqa: E731
                     "attention_mask": jax.device_put(b[1], batch_sharding(mesh))}
    state, metrics = step(state, teacher_params, put(data[0]))  # compile + warm-up
    jax.block_until_ready(metrics)
    losses = []
    t0 = time.perf_counter()
    for b in data[1:]:
        state, metrics = step(state, teacher_params, put(b))
        losses.append(metrics["loss"])
    jax.block_until_ready(state)
    return time.perf_counter() - t0, [float(x) for x in losses]


def run_torch(teacher_dir, student_dir, data) -> tuple[float, list[float]]:
    import torch
    import torch.nn.functional as F
    import transformers

    teacher = transformers.AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    student = transformers.AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32).train()
    for p in teacher.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW(student.parameters(), lr=LR, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)

    def step(ids, mask):
        ids, mask = torch.from_numpy(ids).long(), torch.from_numpy(mask).long()
        with torch.no_grad():
            t_logp = F.log_softmax(teacher(input_ids=ids, attention_mask=mask).logits.float(), -1)
        s_logp = F.log_softmax(student(input_ids=ids, attention_mask=mask).logits.float(), -1)
        kl = F.kl_div(s_logp, t_logp, reduction="none", log_target=True).sum(-1)  # [B, S]
        loss = (kl * mask).sum() / mask.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        return loss.item()

    step(*data[0])  # warm-up
    losses = []
    t0 = time.perf_counter()
    for b in data[1:]:
        losses.append(step(*b))
    return time.perf_counter() - t0, losses


def step_memory(teacher_dir, student_dir, batch: int, seq: int, chunk: int, fused: bool) -> dict:
    """XLA buffer sizes of the compiled train step (no execution)."""
    import jax
    import jax.numpy as jnp

    state, teacher_params, step, mesh = jax_step(teacher_dir, student_dir, chunk, fused)
    spec = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
    analysis = step.lower(state, teacher_params, {"input_ids": spec, "attention_mask": spec}).compile() \
        .memory_analysis()
    return {"temp_bytes": analysis.temp_size_in_bytes, "argument_bytes": analysis.argument_size_in_bytes}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per framework (after one warm-up)")
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--memory-seq", type=int, default=512)
    parser.add_argument("--unfused", action="store_true", help="the loss under jax.checkpoint (loss.fused=False)")
    args = parser.parse_args()
    import torch

    from m2d_jax.hf.oracle import make_hf_checkpoint

    teacher_cfg, student_cfg = dict(TEACHER), dict(STUDENT)
    if args.quick:
        teacher_cfg.update(QUICK)
        student_cfg.update(QUICK)
        args.seq, args.steps, args.memory_seq = 64, 3, 128
    tmp = Path(tempfile.mkdtemp(prefix="distill_bench_"))
    t_dir = make_hf_checkpoint(teacher_cfg, tmp / "teacher", seed=0, init_std=0.05)
    s_dir = make_hf_checkpoint(student_cfg, tmp / "student", seed=1, init_std=0.05)
    data = batches(teacher_cfg["vocab_size"], args.batch, args.seq, args.steps + 1)
    tokens = args.batch * args.seq * args.steps

    jax_s, jax_losses = run_jax(t_dir, s_dir, data, args.chunk, not args.unfused)
    torch_s, torch_losses = run_torch(t_dir, s_dir, data)
    mem_t = dict(teacher_cfg, **MEMORY)
    mem_s = dict(student_cfg, **{k: v for k, v in MEMORY.items() if k != "moe_intermediate_size"})
    mt_dir = make_hf_checkpoint(mem_t, tmp / "mem_teacher", seed=0)
    ms_dir = make_hf_checkpoint(mem_s, tmp / "mem_student", seed=1)
    memory = {c: step_memory(mt_dir, ms_dir, args.batch, args.memory_seq, c, not args.unfused)
              for c in (0, args.chunk)}

    result = {"jax_tokens_per_s": tokens / jax_s, "torch_tokens_per_s": tokens / torch_s,
              "jax_losses": jax_losses, "torch_losses": torch_losses, "memory": memory,
              "torch_threads": torch.get_num_threads()}
    print(json.dumps(result, indent=1))
    ratio = result["jax_tokens_per_s"] / result["torch_tokens_per_s"]
    print(f"\nteacher {teacher_cfg['num_hidden_layers']}L d={teacher_cfg['hidden_size']} E={teacher_cfg['num_experts']} "
          f"top-{teacher_cfg['num_experts_per_tok']}, student dense, vocab {teacher_cfg['vocab_size']}, "
          f"batch {args.batch} x seq {args.seq}, {args.steps} timed steps\n")
    print("| train step (forward KL + AdamW) | tokens/s | ratio |\n|---|---|---|")
    print(f"| PyTorch eager (transformers teacher + student) | {result['torch_tokens_per_s']:.0f} | 1.00x |")
    loss_kind = "unfused" if args.unfused else "fused"
    print(f"| m2d_jax jitted step ({loss_kind} loss, chunk {args.chunk}) | {result['jax_tokens_per_s']:.0f} "
          f"| {ratio:.2f}x |")
    full, chunked = memory[0]["temp_bytes"], memory[args.chunk]["temp_bytes"]
    print(f"\nvocab {MEMORY['vocab_size']}, batch {args.batch} x seq {args.memory_seq}: full float32 logits of one "
          f"model = {args.batch * args.memory_seq * MEMORY['vocab_size'] * 4 / 2**20:.0f} MiB\n")
    print("| loss | XLA temp buffers of the train step | ratio |\n|---|---|---|")
    print(f"| unchunked | {full / 2**20:.0f} MiB | 1.00x |")
    print(f"| chunked ({args.chunk} positions) | {chunked / 2**20:.0f} MiB | {chunked / full:.2f}x |")


if __name__ == "__main__":
    main()
