"""Distillation train-step throughput of m2d_jax vs a PyTorch eager loop, interleaved best of N, and the memory of
the loss unchunked and at two chunk sizes.

    python benchmarks/distill_step.py            # d=256, 4 layers, 16 experts top-4 teacher; 4 x 256 tokens/step
    python benchmarks/distill_step.py --quick    # a small smoke run
    python benchmarks/distill_step.py --unfused  # the loss under jax.checkpoint (loss.fused=False)

Both loops run in this one process on the same CPU, float32, with the same random HF checkpoints (transformers
Qwen3-MoE teacher, Qwen3 dense student), the same token batches, the same loss (forward KL, T=1, masked token mean),
AdamW (0.9, 0.95, eps 1e-8, wd 0) and global-norm clipping at 1.0. The PyTorch loop is what a user would write:
teacher under no_grad, full logits of both models, F.kl_div. The sides are the PyTorch loop and the m2d_jax step
with the loss unchunked (chunk 0) and at two chunk sizes, each with its own training state; in each of ``--rounds``
rounds every side runs ``--steps`` timed steps on the same batches (the rounds rotate the order of the sides), so
all sides train on the same batch sequence and their losses compare step by step. Reported: best and median
tokens/s over the rounds, the load average at start and end, and the largest loss difference to PyTorch.
Memory: XLA's own buffer assignment (``compiled.memory_analysis()``) of the whole jitted train step at each chunk
size, at the throughput shapes and at a larger vocabulary. Prints Markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

TEACHER = dict(model_type="qwen3_moe", vocab_size=8192, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
               num_attention_heads=8, num_key_value_heads=4, head_dim=32, moe_intermediate_size=128, num_experts=16,
               num_experts_per_tok=4, norm_topk_prob=True, max_position_embeddings=4096, tie_word_embeddings=False)
STUDENT = dict(model_type="qwen3", vocab_size=8192, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
               num_attention_heads=8, num_key_value_heads=4, head_dim=32, max_position_embeddings=4096,
               tie_word_embeddings=False)
QUICK = dict(vocab_size=1024, hidden_size=64, num_hidden_layers=2, head_dim=8)


def model_configs(quick: bool) -> tuple[dict, dict]:
    """HF config kwargs of the benchmark's (teacher, student): the throughput shapes, or the --quick ones."""
    return ({**TEACHER, **QUICK}, {**STUDENT, **QUICK}) if quick else (dict(TEACHER), dict(STUDENT))
MEMORY = dict(vocab_size=32768, hidden_size=128, intermediate_size=256, moe_intermediate_size=64, head_dim=16)
LR = 1e-4


def batches(vocab: int, batch: int, seq: int, n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, vocab, (batch, seq)).astype(np.int32), np.ones((batch, seq), np.int32))
            for _ in range(n)]


def load_average() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def jax_step(teacher_dir, student_dir, chunk: int, fused: bool) -> SimpleNamespace:
    """The library's jitted train step on one device: state, teacher_params, step, mesh, and the parts it is made
    of (student_graphdef, teacher_graphdef, tx)."""
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
    return SimpleNamespace(state=state, teacher_params=t_state.to_pure_dict(), step=step, mesh=mesh,
                           student_graphdef=s_gd, teacher_graphdef=t_gd, tx=tx)


class JaxSide:
    """One m2d_jax training run: ``run(batches) -> losses`` advances its own state by one step per batch."""

    def __init__(self, teacher_dir, student_dir, chunk: int, fused: bool):
        from m2d_jax.distill.sharding import batch_sharding

        self.parts = jax_step(teacher_dir, student_dir, chunk, fused)
        self.sharding = batch_sharding(self.parts.mesh)

    def run(self, data) -> list[float]:
        import jax

        p, losses = self.parts, []
        for ids, mask in data:
            batch = {key: jax.device_put(x, self.sharding) for key, x in (("input_ids", ids), ("attention_mask", mask))}
            p.state, metrics = p.step(p.state, p.teacher_params, batch)
            losses.append(metrics["loss"])
        jax.block_until_ready(p.state)
        return [float(x) for x in losses]


def torch_models(teacher_dir, student_dir):
    """(teacher, student, AdamW) of the eager loop: transformers' default implementations, float32."""
    import torch
    import transformers

    teacher = transformers.AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    student = transformers.AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32).train()
    for p in teacher.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW(student.parameters(), lr=LR, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    return teacher, student, opt


def torch_step(teacher, student, opt):
    """The eager loop's step ``(ids, mask) -> loss`` (numpy int32 [B, S] in, Python float out)."""
    import torch
    import torch.nn.functional as F

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

    return step


class TorchSide:
    def __init__(self, teacher_dir, student_dir):
        self.step = torch_step(*torch_models(teacher_dir, student_dir))

    def run(self, data) -> list[float]:
        return [self.step(*b) for b in data]


def temp_bytes(parts: SimpleNamespace, batch: int, seq: int) -> int:
    """XLA's temporary buffer bytes of the compiled train step ``jax_step(...)`` at [batch, seq] (no execution)."""
    import jax
    import jax.numpy as jnp

    spec = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
    return parts.step.lower(parts.state, parts.teacher_params, {"input_ids": spec, "attention_mask": spec}) \
        .compile().memory_analysis().temp_size_in_bytes


def interleaved(sides: dict, data, rounds: int, steps: int) -> tuple[dict, dict]:
    """({side: [seconds of each round]}, {side: losses of every step}); batch data[0] warms every side up (compile),
    then round r runs data[1 + r*steps : 1 + (r+1)*steps] on each side, the order of the sides rotated by r."""
    names = list(sides)
    seconds = {name: [] for name in names}
    losses = {name: sides[name].run(data[:1]) for name in names}
    for r in range(rounds):
        chunk = data[1 + r * steps:1 + (r + 1) * steps]
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = time.perf_counter()
            losses[name] += sides[name].run(chunk)
            seconds[name].append(time.perf_counter() - start)
    return seconds, losses


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per side per round")
    parser.add_argument("--rounds", type=int, default=5, help="N: interleaved rounds (best and median reported)")
    parser.add_argument("--chunks", type=int, nargs=2, default=(64, 128), help="the two loss chunk sizes (and 0)")
    parser.add_argument("--memory-seq", type=int, default=512)
    parser.add_argument("--unfused", action="store_true", help="the loss under jax.checkpoint (loss.fused=False)")
    parser.add_argument("--json", default="", help="also write the raw results here")
    args = parser.parse_args()
    import torch

    from m2d_jax.hf.oracle import make_hf_checkpoint

    teacher_cfg, student_cfg = model_configs(args.quick)
    if args.quick:
        args.seq, args.steps, args.rounds, args.memory_seq, args.chunks = 64, 2, 2, 128, (16, 32)
    load_start = load_average()
    tmp = Path(tempfile.mkdtemp(prefix="distill_bench_"))
    t_dir = make_hf_checkpoint(teacher_cfg, tmp / "teacher", seed=0, init_std=0.05)
    s_dir = make_hf_checkpoint(student_cfg, tmp / "student", seed=1, init_std=0.05)
    data = batches(teacher_cfg["vocab_size"], args.batch, args.seq, 1 + args.rounds * args.steps)
    chunks = (0,) + tuple(args.chunks)
    fused = not args.unfused
    sides = {"torch": TorchSide(t_dir, s_dir), **{c: JaxSide(t_dir, s_dir, c, fused) for c in chunks}}
    seconds, losses = interleaved(sides, data, args.rounds, args.steps)
    load_end = load_average()

    mem_t = dict(teacher_cfg, **MEMORY)
    mem_s = dict(student_cfg, **{k: v for k, v in MEMORY.items() if k != "moe_intermediate_size"})
    mt_dir = make_hf_checkpoint(mem_t, tmp / "mem_teacher", seed=0)
    ms_dir = make_hf_checkpoint(mem_s, tmp / "mem_student", seed=1)
    memory = {c: {"benchmark": temp_bytes(sides[c].parts, args.batch, args.seq),
                  "large_vocab": temp_bytes(jax_step(mt_dir, ms_dir, c, fused), args.batch, args.memory_seq)}
              for c in chunks}

    tokens = args.batch * args.seq * args.steps
    rate = {name: [tokens / s for s in secs] for name, secs in seconds.items()}
    result = {"tokens_per_s": {str(k): v for k, v in rate.items()}, "memory_temp_bytes": memory,
              "losses": {str(k): v for k, v in losses.items()}, "load_average": [load_start, load_end],
              "torch_threads": torch.get_num_threads(), "cores": os.cpu_count()}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    loss_kind = "unfused (checkpointed)" if args.unfused else "fused"
    t = teacher_cfg
    print(f"\nteacher {t['num_hidden_layers']}L d={t['hidden_size']} E={t['num_experts']} "
          f"top-{t['num_experts_per_tok']}, dense student, vocab {t['vocab_size']}, batch {args.batch} x seq "
          f"{args.seq}; {args.rounds} interleaved rounds x {args.steps} steps per side after one warm-up step; "
          f"torch threads {torch.get_num_threads()}, {os.cpu_count()} cores; load average (1, 5, 15 min) "
          f"{load_start} at start, {load_end} at end\n")
    print(f"| train step (forward KL + AdamW) | tokens/s best | median | ratio best | ratio median | max abs loss diff "
          f"to PyTorch | XLA temp, these shapes | XLA temp, vocab {MEMORY['vocab_size']} x seq {args.memory_seq} |")
    print("|---|---|---|---|---|---|---|---|")
    best_t, med_t = max(rate["torch"]), float(np.median(rate["torch"]))
    print(f"| PyTorch eager (transformers teacher + student) | {best_t:.0f} | {med_t:.0f} | 1.00x | 1.00x | - | - "
          "| - |")
    full = memory[0]["large_vocab"]
    for c in chunks:
        diff = max(abs(a - b) for a, b in zip(losses[c], losses["torch"]))
        best, med = max(rate[c]), float(np.median(rate[c]))
        what = "unchunked (chunk 0)" if c == 0 else f"chunk {c}"
        print(f"| m2d_jax jitted step, {loss_kind} loss, {what} | {best:.0f} | {med:.0f} | {best / best_t:.2f}x | "
              f"{med / med_t:.2f}x | {diff:.1e} | {memory[c]['benchmark'] / 2**20:.0f} MiB | "
              f"{memory[c]['large_vocab'] / 2**20:.0f} MiB ({memory[c]['large_vocab'] / full:.2f}x) |")
    print(f"\nfull float32 logits of one model: {args.batch * args.seq * t['vocab_size'] * 4 / 2**20:.0f} MiB at these "
          f"shapes, {args.batch * args.memory_seq * MEMORY['vocab_size'] * 4 / 2**20:.0f} MiB at vocab "
          f"{MEMORY['vocab_size']} x seq {args.memory_seq}")


if __name__ == "__main__":
    main()
