import os

# 8 fake CPU devices for sharding tests; must be set before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One persistent XLA compilation cache per test run, shared by the xdist workers and the subprocesses the tests
# start (they inherit the variable): many tests compile the same tiny programs (each builds its own train step or
# forward), and a hit skips XLA's compile; measured on tests/test_faults.py, 41% less CPU time from a cold cache.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="m2d_jax_test_xla_cache_")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)

import pytest  # noqa: E402

from m2d_jax.data import EMBEDDED_CORPUS, read_documents, train_bpe_tokenizer  # noqa: E402
from m2d_jax.hf.oracle import make_hf_checkpoint  # noqa: E402

# Tiny random checkpoints, built with transformers at test time. The name says what each varies.
QWEN3_MOE_CONFIGS = {
    # GQA 4/2, head_dim 24 != 64/4, renormalised top-2 of 8, a dense mlp_only layer, untied
    "moe_gqa_norm_mlponly": dict(model_type="qwen3_moe", vocab_size=160, hidden_size=64, intermediate_size=96,
                                 num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                                 moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
                                 mlp_only_layers=[1], max_position_embeddings=128, tie_word_embeddings=False),
    # MHA, no renormalisation, top-4, tied embeddings, decoder_sparse_step=2 (layers 0, 2 dense)
    "moe_mha_tied_sparsestep": dict(model_type="qwen3_moe", vocab_size=128, hidden_size=48, intermediate_size=80,
                                    num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, head_dim=12,
                                    moe_intermediate_size=24, num_experts=8, num_experts_per_tok=4,
                                    norm_topk_prob=False, decoder_sparse_step=2, max_position_embeddings=128,
                                    tie_word_embeddings=True),
    # GQA ratio 4, top-1 of 4, attention biases, rope_theta 1e6, sharded on disk
    "moe_top1_bias_sharded": dict(model_type="qwen3_moe", vocab_size=96, hidden_size=64, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2, head_dim=8,
                                  moe_intermediate_size=48, num_experts=4, num_experts_per_tok=1,
                                  norm_topk_prob=True, attention_bias=True, rope_theta=1e6,
                                  max_position_embeddings=128, tie_word_embeddings=False),
    # top-k = E, sliding window (8) shorter than the sequence, mlp_only_layers at both ends
    "moe_allexperts_sliding": dict(model_type="qwen3_moe", vocab_size=128, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                   moe_intermediate_size=16, num_experts=4, num_experts_per_tok=4,
                                   norm_topk_prob=True, mlp_only_layers=[0, 3], use_sliding_window=True,
                                   sliding_window=8, max_position_embeddings=128, tie_word_embeddings=False),
}
QWEN3_CONFIGS = {
    "dense_gqa_headdim": dict(model_type="qwen3", vocab_size=160, hidden_size=64, intermediate_size=160,
                              num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                              max_position_embeddings=128, tie_word_embeddings=False),
    "dense_tied_mha": dict(model_type="qwen3", vocab_size=128, hidden_size=48, intermediate_size=96,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, head_dim=12,
                           max_position_embeddings=128, tie_word_embeddings=True),
    "dense_bias_sharded": dict(model_type="qwen3", vocab_size=96, hidden_size=64, intermediate_size=128,
                               num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2, head_dim=8,
                               attention_bias=True, rope_theta=1e6, max_position_embeddings=128,
                               tie_word_embeddings=False),
    # sliding window on layers >= max_window_layers only
    "dense_sliding_layers": dict(model_type="qwen3", vocab_size=128, hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                 use_sliding_window=True, sliding_window=6, max_window_layers=1,
                                 max_position_embeddings=128, tie_word_embeddings=False),
}
ALL_CONFIGS = {**QWEN3_MOE_CONFIGS, **QWEN3_CONFIGS}
SHARDED = {"moe_top1_bias_sharded", "dense_bias_sharded"}


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """``hf_checkpoint(name)`` -> directory of a tiny random HF checkpoint (built once per session)."""
    cache = {}

    def build(name: str):
        if name not in cache:
            out = tmp_path_factory.mktemp("hf") / name
            make_hf_checkpoint(ALL_CONFIGS[name], out, seed=len(name), init_std=0.1,
                               max_shard_size="40KB" if name in SHARDED else None)
            cache[name] = out
        return cache[name]

    return build


def corpus_documents(count: int, max_chars: int | None = None) -> list[str]:
    """The first ``count`` documents of the embedded real-text corpus, each cut to ``max_chars``."""
    docs = read_documents([EMBEDDED_CORPUS])[:count]
    return docs if max_chars is None else [d[:max_chars] for d in docs]


def make_checkpoint_with_tokenizer(hf_config: dict, out, *, seed: int, tokenizer_vocab: int, docs: list[str],
                                   init_std: float = 0.1):
    """A tiny random HF checkpoint (built with transformers) saved together with a byte-level BPE tokenizer trained
    on ``docs`` (loadable by transformers.AutoTokenizer and m2d_jax.data). Returns ``out``."""
    make_hf_checkpoint(hf_config, out, seed=seed, init_std=init_std)
    train_bpe_tokenizer(docs, tokenizer_vocab, out)
    return out
