"""KV-cache decoding: exactly the tokens of full-recompute greedy decoding, for every family in conftest."""

import json

import numpy as np
import pytest
from conftest import ALL_CONFIGS
from eval_support import checkpoint_with_tokenizer
from flax import nnx

import m2d_jax
from m2d_jax.cli import main
from m2d_jax.data import load_tokenizer
from m2d_jax.eval import generate, generate_tokens
from m2d_jax.hf.oracle import load_reference

FAST = {"moe_allexperts_sliding", "dense_sliding_layers"}  # the rest are @slow (lm-eval generate_until parity
# with transformers' own KV cache covers moe_gqa_norm_mlponly in test_eval_harness)


@nnx.jit
def _last_logits(model, ids, length):
    """Logits at position ``length - 1`` of a right-padded row: full recompute, one shape per buffer size."""
    return model(ids)[0, length - 1]


def recompute_greedy(model, prompt, n, buffer=48):
    """Greedy decoding by re-running the whole sequence every step (no cache)."""
    buf = np.zeros((1, buffer), np.int32)
    buf[0, :len(prompt)] = prompt
    for i in range(len(prompt), len(prompt) + n):
        buf[0, i] = int(np.argmax(np.asarray(_last_logits(model, buf, i))))
    return buf[0, len(prompt):len(prompt) + n].tolist()


def prompts_for(config, lengths=(5, 13, 21)):
    """Prompts of different lengths (batched with left padding), longer than any sliding window."""
    rng = np.random.default_rng(len(lengths))
    return [rng.integers(0, config.vocab_size, n).tolist() for n in lengths]


@pytest.mark.parametrize("name", [n if n in FAST else pytest.param(n, marks=pytest.mark.slow) for n in ALL_CONFIGS])
def test_kv_cache_greedy_equals_full_recompute(hf_checkpoint, name):
    model = m2d_jax.from_pretrained(hf_checkpoint(name))
    if model.config.attention.sliding_window:
        assert max(map(len, prompts_for(model.config))) > model.config.attention.sliding_window
    prompts = prompts_for(model.config)
    new = generate_tokens(model, prompts, 12, batch_size=4)  # a filler row too
    assert new == [recompute_greedy(model, p, 12) for p in prompts]


def test_kv_cache_greedy_equals_transformers_generate(hf_checkpoint):
    import torch

    path = hf_checkpoint("moe_allexperts_sliding")
    model, reference = m2d_jax.from_pretrained(path), load_reference(path)
    prompts = prompts_for(model.config)
    ours = generate_tokens(model, prompts, 10)
    for prompt, tokens in zip(prompts, ours):
        out = reference.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, eos_token_id=None,
                                 pad_token_id=0)
        assert out[0, len(prompt):].tolist() == tokens


def test_stopping_and_sampling(hf_checkpoint):
    model = m2d_jax.from_pretrained(hf_checkpoint("dense_gqa_headdim"))
    prompts = prompts_for(model.config)
    greedy = generate_tokens(model, prompts, 8)
    eos = greedy[0][3]  # EOS = row 0's 4th greedy token: row 0 stops before it, the others go on until they hit it
    stopped = generate_tokens(model, prompts, 8, eos_ids=[eos])
    for full, cut in zip(greedy, stopped):
        assert cut == (full[:full.index(eos)] if eos in full else full)
    assert generate_tokens(model, prompts, 8, stop=lambda row: len(row) == 2) == [g[:2] for g in greedy]
    # a nucleus smaller than the top token's probability is the top token: sampling == greedy
    assert generate_tokens(model, prompts, 8, temperature=1.0, top_p=1e-6, seed=3) == greedy
    sampled = generate_tokens(model, prompts, 8, temperature=2.0, seed=3)
    assert sampled == generate_tokens(model, prompts, 8, temperature=2.0, seed=3)
    assert sampled != greedy and all(0 <= t < model.config.vocab_size for row in sampled for t in row)
    with pytest.raises(ValueError, match="exceeds the model's max_position_embeddings"):
        generate_tokens(model, prompts, model.config.max_position_embeddings)
    with pytest.raises(ValueError, match="at least one token"):
        generate_tokens(model, [[]], 4)


def test_generate_text_until_and_cli(tmp_path, capsys):
    ckpt = checkpoint_with_tokenizer("dense_tied_mha", tmp_path / "model")
    model, tokenizer = m2d_jax.from_pretrained(ckpt), load_tokenizer(ckpt)
    prompt = "The interpreter reads"
    (tokens,) = generate_tokens(model, tokenizer.encode_batch([prompt]), 16)
    full = tokenizer.decode(tokens)
    until = full[len(full) // 2: len(full) // 2 + 2]  # a stop string from the middle of the greedy continuation
    (text,) = generate(model, tokenizer, [prompt], max_new_tokens=16, until=[until])
    assert text == full.split(until)[0]
    # on a mesh (gpu-1x8-h100: the 8 test devices on fsdp): parameters sharded, the same greedy continuation
    assert main(["generate", "--model", str(ckpt), "--prompt", prompt, "--max-new-tokens", "16", "--mesh",
                 "gpu-1x8-h100"]) == 0
    assert json.loads(capsys.readouterr().out) == {"prompt": prompt, "completion": full}
