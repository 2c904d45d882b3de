"""Cost of ``m2d sweep`` on the full paper grid (7 scorings x 5 groupings x 2 DP scalings x K in k..16k = 350
configurations) on a tiny random Qwen3-MoE teacher (4 layers, hidden 64, E = 64, top-4, so every K is valid).

    python benchmarks/sweep.py WORKDIR                 # the grid only
    python benchmarks/sweep.py WORKDIR --distill 30    # then distil the best of 2 scorings x 2 groupings, 30 steps

The teacher (built with transformers, BPE tokenizer on the embedded corpus) and the train / held-out files (the
corpus' last 6 documents held out) are written to WORKDIR; the sweep runs in WORKDIR/work (run the same command
again to resume). Prints the sweep's summary; rows/s and seconds per row are in it and in results.csv.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

TEACHER = dict(model_type="qwen3_moe", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
               num_attention_heads=4, num_key_value_heads=2, head_dim=32, moe_intermediate_size=32, num_experts=64,
               num_experts_per_tok=4, norm_topk_prob=True, max_position_embeddings=256, tie_word_embeddings=False)
HELDOUT_DOCS = 6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--distill", type=int, default=0, help="distillation steps (0 = the grid only)")
    args = parser.parse_args()

    from m2d_jax.config_utils import load_config
    from m2d_jax.data import EMBEDDED_CORPUS, read_documents, train_bpe_tokenizer
    from m2d_jax.hf.oracle import make_hf_checkpoint
    from m2d_jax.sweep import format_summary, run_sweep

    root = args.root.absolute()
    root.mkdir(parents=True, exist_ok=True)
    docs = read_documents([EMBEDDED_CORPUS])
    files = {"train": root / "train.jsonl", "heldout": root / "heldout.jsonl"}
    for name, part in (("train", docs[:-HELDOUT_DOCS]), ("heldout", docs[-HELDOUT_DOCS:])):
        files[name].write_text("".join(json.dumps({"text": d}) + "\n" for d in part))
    teacher = root / "teacher"
    if not teacher.exists():
        make_hf_checkpoint(TEACHER, teacher, seed=0, init_std=0.1)
        train_bpe_tokenizer(docs[:-HELDOUT_DOCS], 480, teacher)

    c = load_config("sweep")
    c.teacher, c.workdir, c.num_devices, c.distill.mesh.fsdp = str(teacher), str(root / "work"), 1, 1
    c.calibration.files = (str(files["train"]),)
    c.calibration.seq_len, c.calibration.num_seqs, c.calibration.gram_tokens = 64, 64, 2048
    c.eval.files, c.eval.seq_len, c.eval.max_tokens = (str(files["heldout"]),), 64, 4096
    c.distill_best = args.distill > 0
    if c.distill_best:
        c.grid.scorings, c.grid.groupings = ("selection_freq", "gld_reap"), ("round_robin", "output_cluster")
        c.distill.steps, c.distill.data.batch_size, c.distill.data.seq_len = args.distill, 8, 64
        c.distill.data.files = (str(files["train"]),)
        c.distill.schedule.warmup_steps, c.distill.schedule.decay_steps = 3, 6
        c.distill.checkpoint.every = args.distill
    start = time.perf_counter()
    print(format_summary(run_sweep(c)))
    print(f"wall {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
