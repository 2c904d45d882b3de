"""``m2d demo``: the method end to end on the shipped self-trained teachers, with the paper's comparisons.

Override any field from the command line, e.g. ``m2d demo --config.distill.steps=300 --config.workdir=runs/demo``;
``m2d demo --quick`` is ``configs/demo_quick.py`` (the same path on a tiny budget).
"""

from ml_collections import ConfigDict

from m2d_jax.config_utils import load_config


def random_teachers(moe: ConfigDict) -> ConfigDict:
    """transformers config kwargs of the tiny random teachers: the MoE ``moe`` and a dense Qwen3 of its TOTAL
    parameter count (FFN width = experts x expert width), as the shipped pair."""
    shared = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "head_dim", "max_position_embeddings", "rope_theta", "tie_word_embeddings")
    dense = dict(model_type="qwen3", intermediate_size=moe.num_experts * moe.moe_intermediate_size,
                 **{key: moe[key] for key in shared})
    return ConfigDict(dict(moe=moe, dense=dense, init_std=0.1, tokenizer_vocab=512, tokenizer_docs=40))


def get_config() -> ConfigDict:
    return ConfigDict(dict(
        # "shipped": the project's trained teachers (m2d_jax.data.teachers: moe, dense); "random": tiny random
        # teachers built here with transformers (the pipeline runs, the numbers mean nothing)
        teachers="shipped",
        random_teachers=random_teachers(load_config("models/qwen3_moe_tiny")),
        seed=0,
        parity=dict(batch_size=2, seq_len=48),  # padded batch for the logits checks against transformers
        calibration=dict(seq_len=128, num_seqs=64, gram_tokens=4096, batch_size=8),  # on the calibration split
        # pure pruning K = k: k dense FFN blocks per layer, k = 0 -> the teacher's top-k (the student of its active
        # size); all 7 scorings are converted, round-robin grouping, uniform down-projection scaling
        conversion=dict(groups=0, grouping="round_robin", dp_scaling="uniform"),
        # the dense-to-dense baseline: the dense teacher pruned to the converted students' parameter count
        d2d=dict(axes=("ffn", "heads"), num_seqs=64, seq_len=128, batch_size=8),  # FFN neurons first, then heads
        # one recipe and token budget for every distilled student (steps x batch_size x seq_len tokens), on
        # train_chars characters of the train split's documents (seeded order; ~3.5 characters per token)
        distill=dict(students=("gld_reap", "selection_freq", "random_ffn", "d2d"), steps=160, batch_size=16,
                     seq_len=128, learning_rate=1e-3, warmup_steps=16, decay_steps=48, eval_every=20,
                     train_chars=1_500_000),
        eval=dict(tokens=16384, seq_len=128, batch_size=16),  # held-out perplexity: the split's first tokens
        # the local multiple-choice task from held-out documents (m2d_jax.eval.local_mc)
        choice=dict(num_items=200, context_len=48, continuation_len=16, choices=4, batch_size=32),
        step_time=dict(rounds=5),  # MoE- vs dense-teacher distillation step: interleaved rounds, best of each
        workdir="",  # output directory (report.md, results.json, PNGs); "" = a new temporary directory
        overwrite=False,  # replace an existing workdir
    ))
