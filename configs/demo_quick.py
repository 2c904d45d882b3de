"""``m2d demo --quick``: the demo's whole path on a tiny budget (about two minutes on 2 CPU cores, mostly compiles)."""

from ml_collections import ConfigDict

from m2d_jax.config_utils import load_config


def get_config() -> ConfigDict:
    config = load_config("demo")
    config.parity.seq_len = 24
    config.calibration.update(num_seqs=16, gram_tokens=1024)
    config.d2d.num_seqs = 8
    config.distill.update(steps=30, batch_size=4, seq_len=64, warmup_steps=3, decay_steps=10, eval_every=10,
                          train_chars=60_000)
    config.eval.update(tokens=1024, seq_len=64, batch_size=8)
    config.choice.update(num_items=24, context_len=24, continuation_len=8, batch_size=32)
    config.step_time.rounds = 2
    return config
