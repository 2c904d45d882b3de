"""``m2d train-teacher configs/teachers/moe.py``: the shipped MoE teacher (Qwen3-MoE class), trained from scratch on
the corpus' train split. Every teacher config has these fields; override any from the command line, e.g.
``--config.train.steps=100 --config.out=runs/moe``."""

from ml_collections import ConfigDict

QWEN3_COMMON = dict(  # shared by every teacher: attention, norms, positions (HF config.json fields)
    hidden_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,  # GQA
    head_dim=32,
    max_position_embeddings=256,
    rope_theta=10000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
)


def get_config() -> ConfigDict:
    return ConfigDict(dict(
        model=dict(  # HF config.json fields (vocab_size is the tokenizer's)
            model_type="qwen3_moe",
            **QWEN3_COMMON,
            intermediate_size=256,  # unused: every layer is MoE
            moe_intermediate_size=64,
            num_experts=32,
            num_experts_per_tok=4,
            norm_topk_prob=True,
            decoder_sparse_step=1,
            mlp_only_layers=[],
        ),
        tokenizer="",  # directory with tokenizer.json to reuse; "" = train a BPE on the train split
        tokenizer_vocab=4096,
        seed=0,
        # 2000 x 16 x 128 = 4,096,000 tokens (1.47 epochs of the train split), as shipped
        train=dict(steps=2000, batch_size=16, seq_len=128, learning_rate=3e-3, weight_decay=0.1, warmup_steps=100,
                   decay_steps=400, load_balance_weight=0.03, log_every=50),
        eval=dict(seq_len=128, batch_size=16,  # held-out perplexity and expert load
                  heldout_docs=0),  # 0 = the whole held-out split; > 0: its first N documents (quick checks)
        export_dtype="bfloat16",  # weights as shipped (training is float32)
        out="",  # output HF directory (or --out)
        workdir="",  # "" = a temporary directory, removed at the end
    ))
