"""DeepSeek-V2, GPT-OSS, OLMoE, Mixtral and FlexOlmo (and their dense student forms) match transformers' own forward."""

import json
import shutil

import numpy as np
import pytest
from flax import nnx

import m2d_jax
from m2d_jax.hf import CheckpointError
from m2d_jax.hf.oracle import make_hf_checkpoint, padded_batch, reference_logits

TOL = 1e-4
DS_LITE_YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "mscale": 0.707, "mscale_all_dim": 0.707,
                "original_max_position_embeddings": 4096, "beta_fast": 32.0, "beta_slow": 1.0}
GPT_OSS_YARN = {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                "truncate": False, "original_max_position_embeddings": 4096}
DEFAULT_ROPE = {"rope_type": "default", "rope_theta": 10000.0}


def _ds(**kw):
    base = dict(model_type="deepseek_v2", vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                num_attention_heads=4, q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=12, qk_rope_head_dim=8,
                v_head_dim=10, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=2,
                moe_intermediate_size=16, first_k_dense_replace=1, max_position_embeddings=8192,
                rope_parameters=DEFAULT_ROPE)
    return {**base, **kw}


def _gpt_oss(**kw):
    base = dict(model_type="gpt_oss", vocab_size=128, hidden_size=64, intermediate_size=32, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
                sliding_window=6, max_position_embeddings=8192, rope_parameters=DEFAULT_ROPE)
    return {**base, **kw}


def _olmoe(**kw):
    base = dict(model_type="olmoe", vocab_size=128, hidden_size=64, intermediate_size=32, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, num_experts=8, num_experts_per_tok=2, eos_token_id=1,
                pad_token_id=0, max_position_embeddings=128)
    return {**base, **kw}


FAMILY_CONFIGS = {
    # DeepSeek-V2: q_lora None (V2-Lite) / set, group-limited top-k, first_k_dense_replace 0/1/2, rho != 1
    "ds_lite_like": _ds(),
    "ds_qlora_group_rho": _ds(q_lora_rank=24, topk_method="group_limited_greedy", n_group=4, topk_group=2,
                              routed_scaling_factor=1.5, first_k_dense_replace=0),
    "ds_two_dense_tied": _ds(first_k_dense_replace=2, num_hidden_layers=4, tie_word_embeddings=True,
                             n_shared_experts=1, norm_topk_prob=True),
    "ds_yarn_lite": _ds(rope_parameters=DS_LITE_YARN, max_position_embeddings=163840),
    # GPT-OSS: sinks, alternating sliding (6) / full layers, biases, clamped SwiGLU; YaRN of the real release
    "gptoss_default_rope": _gpt_oss(),
    "gptoss_yarn": _gpt_oss(rope_parameters=GPT_OSS_YARN, max_position_embeddings=131072),
    "gptoss_all_full_top1": _gpt_oss(layer_types=["full_attention"] * 3, num_experts_per_tok=1, sliding_window=4),
    # OLMoE: full-projection q/k norm, clip_qkv, with and without renormalisation
    "olmoe_clip": _olmoe(clip_qkv=2.0),
    "olmoe_norm_topk": _olmoe(norm_topk_prob=True, num_experts_per_tok=3, tie_word_embeddings=True),
    "olmoe_mha": _olmoe(num_key_value_heads=4, num_hidden_layers=3),
    "mixtral_sliding": dict(model_type="mixtral", vocab_size=128, hidden_size=64, intermediate_size=32,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                            num_experts_per_tok=2, sliding_window=5, max_position_embeddings=128),
    # stock FlexOlmo: post-norm layers, full-projection q/k norm, renormalised top-3 of 5, tied, head_dim != d / H
    "flex_olmo_norm_topk": dict(model_type="flex_olmo", vocab_size=128, hidden_size=64, intermediate_size=32,
                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=12,
                                num_experts=5, num_experts_per_tok=3, norm_topk_prob=True, tie_word_embeddings=True,
                                max_position_embeddings=128, pad_token_id=0, eos_token_id=1),
    # dense student forms (docs/METHOD.md §9): DeepSeek with every layer dense, GPT-OSS with one expert and top-1
    "ds_student_all_dense": _ds(first_k_dense_replace=3, n_routed_experts=8),
    "gptoss_student_one_expert": _gpt_oss(num_local_experts=1, num_experts_per_tok=1, intermediate_size=64),
}


@pytest.fixture(scope="module")
def family_checkpoint(tmp_path_factory):
    cache = {}

    def build(name):
        if name not in cache:
            cache[name] = make_hf_checkpoint(FAMILY_CONFIGS[name], tmp_path_factory.mktemp("fam") / name,
                                             seed=len(name), init_std=0.1)
        return cache[name]

    return build


def _max_valid_diff(got, want, mask):
    valid = mask.astype(bool)
    return float(np.abs(np.asarray(got, np.float32) - want)[valid].max())


@pytest.mark.parametrize("name", sorted(FAMILY_CONFIGS))
def test_family_logits_match_transformers(family_checkpoint, name):
    path = family_checkpoint(name)
    model = m2d_jax.from_pretrained(path, progress=False)
    ids, mask = padded_batch(model.config.vocab_size, batch=3, seq=15, seed=1)  # longer than the sliding windows
    want = reference_logits(path, ids, mask)
    assert np.abs(want).max() > 0.5
    assert _max_valid_diff(model(ids, mask), want, mask) <= TOL


@pytest.mark.parametrize("name", ["ds_yarn_lite", "gptoss_yarn"])
def test_yarn_beyond_the_original_context(family_checkpoint, name):
    """Real checkpoints' YaRN parameters, at positions past original_max_position_embeddings (4096)."""
    path = family_checkpoint(name)
    model = m2d_jax.from_pretrained(path, progress=False)
    assert model.config.rope.type == "yarn"
    ids, mask = padded_batch(model.config.vocab_size, batch=2, seq=12, seed=2)
    mask[:] = 1
    pos = np.broadcast_to(np.arange(12) + 6000, (2, 12))
    want = reference_logits(path, ids, mask, position_ids=pos)
    assert _max_valid_diff(model(ids, mask, pos), want, mask) <= TOL


def test_dense_student_forms_have_the_structure_transformers_builds(family_checkpoint):
    """The imported student forms are what transformers' own model of each checkpoint is made of: DeepSeek with
    no MoE block at all, GPT-OSS with one expert routed top-1 in every layer."""
    from m2d_jax.hf.oracle import load_reference

    path = family_checkpoint("ds_student_all_dense")
    ds = m2d_jax.from_pretrained(path, progress=False).config
    ref_layers = load_reference(path).model.layers
    ref_kinds = tuple("moe" if hasattr(layer.mlp, "experts") else "dense" for layer in ref_layers)
    assert ds.ffn_kinds == ref_kinds and set(ref_kinds) == {"dense"} and not ds.is_moe
    path = family_checkpoint("gptoss_student_one_expert")
    oss = m2d_jax.from_pretrained(path, progress=False).config
    routing = {(layer.mlp.experts.gate_up_proj.shape[0], layer.mlp.router.top_k)
               for layer in load_reference(path).model.layers}
    assert routing == {(oss.moe.experts.num_experts, oss.moe.router.top_k)} == {(1, 1)}


def test_info_reports_family_structure(family_checkpoint, capsys):
    from m2d_jax.cli import main

    assert main(["info", str(family_checkpoint("ds_lite_like")), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["shared_expert_width"] == 32 and info["dense_layers"] == 1 and info["moe_layers"] == 2
    assert info["attention"].startswith("MLA")
    import torch  # noqa: F401  (the oracle's count)
    from m2d_jax.hf.oracle import load_reference

    assert info["total_params"] == load_reference(family_checkpoint("ds_lite_like")).num_parameters()


def _edit_config(src, dst, **changes):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("name, changes, match", [
    ("ds_lite_like", {"topk_method": "noaux_tc"}, "topk_method.*unsupported 'noaux_tc'"),
    ("ds_lite_like", {"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}},
     "unsupported RoPE type 'longrope'"),
    ("gptoss_default_rope", {"quantization_config": {"quant_method": "gptq"}},
     "quantization_config.*unsupported quantization method 'gptq'"),
    ("olmoe_clip", {"quantization_config": {"quant_method": "mxfp4"}}, "unsupported quantization method 'mxfp4'"),
])
def test_unsupported_family_options_are_clear_errors(family_checkpoint, tmp_path, name, changes, match):
    d = _edit_config(family_checkpoint(name), tmp_path / "ckpt", **changes)
    with pytest.raises(CheckpointError, match=f"config.json: .*{match}"):
        m2d_jax.from_pretrained(d, progress=False)


@pytest.mark.parametrize("name", ["ds_qlora_group_rho", "gptoss_default_rope", "olmoe_clip", "mixtral_sliding"])
def test_kv_cache_decoding_equals_full_recompute(family_checkpoint, name):
    """Greedy decoding with the KV cache (MLA caches its compressed latent; GPT-OSS has sinks and sliding windows)
    produces exactly the tokens of re-running the whole sequence at every step, prompts longer than the window."""
    from m2d_jax.eval import generate_tokens

    model = m2d_jax.from_pretrained(family_checkpoint(name), progress=False)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, model.config.vocab_size, n).tolist() for n in (4, 11)]
    assert max(map(len, prompts)) > (model.config.attention.sliding_window or 0)
    cached = generate_tokens(model, prompts, 8)
    last_logits = nnx.jit(lambda m, ids, n: m(ids)[0, n - 1])  # one compiled shape: right-padded buffer
    for prompt, tokens in zip(prompts, cached):
        buf = np.zeros((1, 24), np.int32)
        buf[0, :len(prompt)] = prompt
        for n in range(len(prompt), len(prompt) + 8):
            buf[0, n] = int(np.argmax(np.asarray(last_logits(model, buf, n))))
        assert tokens == buf[0, len(prompt):len(prompt) + 8].tolist()
