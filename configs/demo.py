"""``m2d demo``: the end-to-end job on an embedded tiny teacher and the embedded real-text corpus.

Override any field from the command line, e.g. ``m2d demo --config.distill.steps=200 --config.workdir=runs/demo``.
"""

from ml_collections import ConfigDict

from m2d_jax.config_utils import load_config


def get_config() -> ConfigDict:
    return ConfigDict(dict(
        teacher=load_config("models/qwen3_moe_tiny"),  # transformers Qwen3MoeConfig kwargs (random init)
        teacher_init_std=0.1,  # random weights' std: large enough that the teacher's distributions are not flat
        tokenizer_vocab=512,  # byte-level BPE trained on the corpus (<= teacher vocab_size)
        heldout_docs=6,  # the corpus' last documents, kept out of calibration/distillation for perplexity
        seed=0,
        parity=dict(batch_size=2, seq_len=48),  # padded batch for the logits check against transformers
        calibration=dict(seq_len=64, num_seqs=64, gram_tokens=2048, batch_size=8),
        # the paper's best configuration: DO-ACP, pure pruning (K = k), uniform down-projection scaling
        conversion=dict(scoring="gld_reap", grouping="round_robin", dp_scaling="uniform", experts=4, groups=4),
        # the converted student starts close to the teacher: a small learning rate; the random-FFN baseline: larger
        distill=dict(steps=120, batch_size=8, seq_len=64, learning_rate=1e-4, baseline_learning_rate=2e-3,
                     warmup_steps=12, decay_steps=24),
        eval_seq_len=64,
        heldout_kl_windows=32,  # held-out windows for KL(teacher || student) before / after distillation
        workdir="",  # empty: a temporary directory, removed at the end
    ))
