"""Calibration pass throughput: m2d_jax's observed jitted forward vs transformers + forward hooks, same statistics.

    python benchmarks/calibration.py             # d=256, 4 MoE layers, 64 experts top-8, 4 x (4 x 512) tokens
    python benchmarks/calibration.py --batch 16  # the same 16 sequences as one batch of 16 x 512
    python benchmarks/calibration.py --quick     # a small smoke run

Both sides compute every docs/METHOD.md §2 statistic (counts, probability / weight / norm sums, router-logit moments,
and the all-experts Gram / mean output / norms on the same Gram subsample) on the same batches, float32 model, float64
accumulation, in one process on the same CPU, for two Gram subsample sizes (1/32 of the tokens, the default ratio, and a
Gram-heavy 1/4). The transformers side is the natural hook design for v5 fused experts: a forward hook on each router
captures (logits, weights, indices), a hook on each MoE block captures its input; routed expert outputs (not exposed by
the fused expert module) and the all-experts subsample outputs are recomputed from the expert parameters in the hook.
torch is timed with 1 thread and with all cores and the faster is kept (OpenMP can collapse on a loaded machine);
transformers' forward without hooks is timed for context. m2d_jax's compile time is reported separately and excluded
from the rates.

The two results are checked to agree under the same routing: torch and XLA round differently, so a token whose k-th
and (k+1)-th router probabilities nearly tie can select a different expert on each side (a count off by exactly 1,
and every later layer of that sequence sees a different input). For the check, the torch side is run once more
(untimed) with its routers' top-k decisions replaced by m2d_jax's (weights from torch's own probabilities of those
experts); the number of decisions where torch's own top-k differs is reported, and so is the difference under each
side's own routing.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

FULL = dict(model_type="qwen3_moe", vocab_size=4096, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, head_dim=64, moe_intermediate_size=128, num_experts=64,
            num_experts_per_tok=8, norm_topk_prob=True, max_position_embeddings=1024, tie_word_embeddings=False)
QUICK = dict(FULL, vocab_size=512, hidden_size=64, num_hidden_layers=2, head_dim=16, moe_intermediate_size=32,
             num_experts=16, num_experts_per_tok=4)


class TorchHookStatistics:
    """docs/METHOD.md §2 sums of a transformers Qwen3-MoE model collected with forward hooks (float64 accumulators)."""

    def __init__(self, ref, chunk: int):
        import torch

        self.torch, self.ref, self.chunk = torch, ref, chunk
        self.layers = [i for i, layer in enumerate(ref.model.layers) if hasattr(layer.mlp, "experts")]
        self.route = {}
        self.sums = None
        self.valid = self.gram_index = None
        self.enabled = True  # False: the hooks return at once (times transformers' bare forward)
        self.forced = None  # {layer: [T, k] expert ids} replacing the routers' own top-k for the current batch
        self.flipped = 0  # decisions (token, layer, slot) where the router's own top-k differs from the forced one
        for i in self.layers:
            mlp = ref.model.layers[i].mlp
            mlp.gate.register_forward_hook(lambda m, inp, out, i=i: self._route(i, m, out))
            mlp.register_forward_hook(lambda m, inp, out, i=i: self._observe(i, m, inp[0]) if self.enabled else None)

    def _route(self, layer, gate, out):
        """Record the router's (logits, weights, indices); with ``forced`` routing, return it with the forced top-k
        (weights: the router's own probabilities of the forced experts, renormalised as the router does)."""
        if self.forced is not None:
            torch = self.torch
            logits, _, own = out
            indices = self.forced[layer]  # [T, k]
            weights = torch.softmax(logits, dim=-1, dtype=torch.float).gather(1, indices)  # [T, k]
            if gate.norm_topk_prob:
                weights = weights / weights.sum(dim=-1, keepdim=True)
            chosen = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, indices, True)  # [T, E]
            self.flipped += int((~chosen.gather(1, own)).sum())
            out = (logits, weights.to(logits.dtype), indices)
        self.route[layer] = out
        return out

    def _experts(self, experts, x, expert_ids: slice):
        """f_e(x) for a slice of experts (parameter views, no copies) on the same tokens: [len(ids), n, d]."""
        torch = self.torch
        gate_up = experts.gate_up_proj[expert_ids]  # [e, 2m, d]
        h = torch.einsum("nd,emd->enm", x, gate_up)
        gate, up = h.chunk(2, dim=-1)
        return torch.einsum("enm,edm->end", experts.act_fn(gate) * up, experts.down_proj[expert_ids])

    def _observe(self, layer, block, hidden):
        torch = self.torch
        x = hidden.reshape(-1, hidden.shape[-1])  # [T, d]
        logits, weights, indices = self.route[layer]
        e = logits.shape[-1]
        valid = self.valid
        probs = torch.softmax(logits.float(), dim=-1) * valid[:, None]
        sel = torch.zeros_like(probs).scatter_(1, indices, 1.0) * valid[:, None]
        w = torch.zeros_like(probs).scatter_(1, indices, weights.float()) * valid[:, None]
        norm = torch.zeros_like(probs)
        for expert in torch.unique(indices).tolist():  # routed outputs, recomputed per expert
            tokens = torch.nonzero((indices == expert).any(-1)).squeeze(-1)
            f = self._experts(block.experts, x[tokens], slice(expert, expert + 1))[0]
            norm[tokens, expert] = torch.linalg.vector_norm(f, dim=-1)
        norm = norm * sel
        gram = torch.zeros(e, e, dtype=torch.float64)
        out_sum = torch.zeros(e, x.shape[-1], dtype=torch.float64)
        out_norm = torch.zeros(e, dtype=torch.float64)
        xs = x[self.gram_index]
        for start in range(0, len(xs), self.chunk):
            f = self._experts(block.experts, xs[start:start + self.chunk], slice(None))  # [E, c, d]
            gram += torch.einsum("ecd,fcd->ef", f, f).double()
            out_sum += f.sum(1).double()
            out_norm += torch.linalg.vector_norm(f, dim=-1).sum(1).double()
        z = logits.float() * valid[:, None]
        values = [valid.sum(), sel.sum(0), probs.sum(0), w.sum(0), (sel * probs).sum(0), (probs * norm).sum(0),
                  (w * norm).sum(0), norm.sum(0), z.T @ z, gram, out_sum, out_norm, float(len(xs))]
        row = [torch.as_tensor(v).double() for v in values]
        self.sums[layer] = row if self.sums.get(layer) is None else [a + b for a, b in zip(self.sums[layer], row)]

    def batch(self, ids, mask, gram_index, routing=None):
        """One forward; ``routing`` [num_moe_layers, T, k] expert ids replaces the routers' own top-k."""
        torch = self.torch
        self.valid = torch.tensor(mask.reshape(-1), dtype=torch.float32)
        self.gram_index = torch.tensor(gram_index, dtype=torch.long)
        self.forced = None if routing is None else {l: torch.tensor(r, dtype=torch.long)
                                                    for l, r in zip(self.layers, routing)}
        with torch.no_grad():
            self.ref.model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
        self.forced = None

    def run(self, batches, routings=None):
        """Float64 sums over ``batches`` of (ids, mask, gram_index), each under its own routing or the forced one."""
        self.sums, self.flipped = {}, 0
        for b, (ids, mask, gram_index) in enumerate(batches):
            self.batch(ids, mask, gram_index, None if routings is None else routings[b])
        return [np.stack([self.sums[l][f].numpy() for l in self.layers]) for f in range(13)]


def routing_decisions(model, batches):
    """m2d_jax's top-k experts in every MoE layer for each batch: [num_moe_layers, batch * seq, k] int32 each."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    graphdef, state = nnx.split(model)

    @jax.jit
    def top_experts(state, ids, mask):
        _, observations = nnx.merge(graphdef, state).hidden_states(ids, mask, observe=lambda v: v.routing.top_idx)
        return jnp.concatenate([o for o in observations if o is not None])  # stacks in layer order

    return [np.asarray(top_experts(state, ids, mask)) for ids, mask, _ in batches]


def max_relative_error(ours, theirs) -> float:
    return max(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30) for a, b in zip(ours, theirs))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4, help="sequences per batch (of 16 sequences of 512 tokens)")
    args = parser.parse_args()
    import torch

    import m2d_jax
    from m2d_jax.calibration import accumulate, gram_positions, gram_slots
    from m2d_jax.hf.oracle import load_reference, make_hf_checkpoint

    cfg = QUICK if args.quick else FULL
    if not args.quick and 16 % args.batch:
        parser.error("--batch must divide the 16 sequences")
    batch, seq, num_batches, chunk = (2, 64, 3, 32) if args.quick else (args.batch, 512, 16 // args.batch, 256)
    # Gram tokens per batch: 1/32 of the tokens (the default 32768 of 512 x 2048) and a Gram-heavy 1/4
    gram_fractions = (batch * seq // 32, batch * seq // 4)
    thread_counts = sorted({1, os.cpu_count() or 1})
    num_seqs = batch * num_batches
    tokens = num_seqs * seq
    rng = np.random.default_rng(0)
    seqs = rng.integers(0, cfg["vocab_size"], size=(num_seqs, seq)).astype(np.int32)
    batches = [(seqs[b * batch:(b + 1) * batch], np.ones((batch, seq), np.int32), np.arange(b * batch, (b + 1) * batch))
               for b in range(num_batches)]
    with tempfile.TemporaryDirectory() as tmp:
        path = make_hf_checkpoint(cfg, tmp, seed=0, init_std=0.05)
        model = m2d_jax.from_pretrained(path)
        ref = load_reference(path)
    print(f"model: d={cfg['hidden_size']}, {cfg['num_hidden_layers']} MoE layers, E={cfg['num_experts']}, "
          f"top-{cfg['num_experts_per_tok']}, m={cfg['moe_intermediate_size']}; {num_batches} batches of "
          f"{batch}x{seq} tokens; torch threads tried: {thread_counts}", flush=True)
    hooks = TorchHookStatistics(ref, chunk)
    routings = routing_decisions(model, batches)
    decisions = num_batches * batch * seq * len(hooks.layers) * cfg["num_experts_per_tok"]

    def torch_time(hook_batches, enabled):
        """Best over rounds and thread counts (OpenMP with all cores can collapse on a loaded machine)."""
        hooks.enabled = enabled
        best, result = np.inf, None
        for threads in thread_counts:
            torch.set_num_threads(threads)
            hooks.sums = {}
            hooks.batch(*hook_batches[0])  # warm-up
            for _ in range(args.rounds):
                start = time.perf_counter()
                out = hooks.run(hook_batches) if enabled else [hooks.batch(*b) for b in hook_batches]
                seconds = time.perf_counter() - start
                if seconds < best:
                    best, result = seconds, (out, threads)
        return best, result

    rows = []
    for gram_per_batch in gram_fractions:
        gram_tokens = gram_per_batch * num_batches
        slots = gram_slots(batch, num_seqs, gram_tokens, seq, chunk)
        gram_index = [gram_positions(m, s, num_seqs, gram_tokens, 0, slots)[0][:gram_per_batch]
                      for _, m, s in batches]
        start = time.perf_counter()
        accumulate(model, batches[:1], num_seqs, gram_tokens, chunk=chunk)
        compile_s = time.perf_counter() - start
        ours_s = np.inf
        for _ in range(args.rounds):
            start = time.perf_counter()
            ours = accumulate(model, batches, num_seqs, gram_tokens, chunk=chunk)
            ours_s = min(ours_s, time.perf_counter() - start)
        hook_batches = [(ids, m, g) for (ids, m, _), g in zip(batches, gram_index)]
        theirs_s, (theirs, hook_threads) = torch_time(hook_batches, True)
        bare_s, (_, bare_threads) = torch_time(hook_batches, False)
        own_routing = max_relative_error(ours, theirs)
        hooks.enabled = True
        torch.set_num_threads(hook_threads)
        same_routing = hooks.run(hook_batches, routings)
        # the forced routing is the one m2d_jax's statistics used iff the integer counts agree exactly
        assert np.array_equal(ours[1], same_routing[1]), "m2d_jax's routing differs from its statistics' routing"
        worst = max_relative_error(ours, same_routing)
        assert worst < 1e-4, worst
        print(f"Gram {gram_per_batch}/{batch * seq} tokens per batch: statistics agree under the same routing (max "
              f"relative error {worst:.1e}; torch's own top-k differs in {hooks.flipped} of {decisions:,} decisions, "
              f"max relative error {own_routing:.1e} under each side's own routing); m2d_jax {ours_s:.2f} s, hooks "
              f"{theirs_s:.2f} s ({hook_threads} threads), bare transformers {bare_s:.2f} s ({bare_threads} threads)",
              flush=True)
        rows.append((gram_per_batch, ours_s, compile_s, theirs_s, hook_threads, bare_s, bare_threads))

    print(f"\nload average at the end: {os.getloadavg()[0]:.1f}; best of {args.rounds} rounds (torch: and of "
          f"{thread_counts} threads)\n")
    print("| Gram tokens / batch | transformers + hooks tok/s | transformers forward alone tok/s | m2d_jax tok/s "
          "(compile s) | m2d_jax vs hooks | m2d_jax vs forward alone |")
    print("|---|---|---|---|---|---|")
    for g, ours_s, comp_s, theirs_s, ht, bare_s, bt in rows:
        print(f"| {g} of {batch * seq} | {tokens / theirs_s:,.0f} ({ht} thr) | {tokens / bare_s:,.0f} ({bt} thr) | "
              f"{tokens / ours_s:,.0f} ({comp_s:.1f}) | {theirs_s / ours_s:.2f}x | {bare_s / ours_s:.2f}x |")


if __name__ == "__main__":
    main()
