"""Logits of m2d_jax models equal transformers' own forward (float32, max |dlogit| <= 1e-4) on padded batches."""

import json

import numpy as np
import pytest

import m2d_jax
from m2d_jax.hf.oracle import load_reference, padded_batch, reference_logits

from conftest import ALL_CONFIGS, QWEN3_MOE_CONFIGS, SHARDED

TOL = 1e-4


def _max_valid_diff(got, want, mask):
    valid = mask.astype(bool)
    assert np.isfinite(got[valid]).all()
    return float(np.abs(np.asarray(got, np.float32) - want)[valid].max())


@pytest.mark.parametrize("name", sorted(ALL_CONFIGS))
def test_logits_match_transformers(hf_checkpoint, name):
    path = hf_checkpoint(name)
    if name in SHARDED:
        assert (path / "model.safetensors.index.json").exists()
        assert len(set(json.loads((path / "model.safetensors.index.json").read_text())["weight_map"].values())) > 1
    model = m2d_jax.from_pretrained(path)
    assert model.config.family == ALL_CONFIGS[name]["model_type"]
    ids, mask = padded_batch(model.config.vocab_size, batch=3, seq=21, seed=1)
    want = reference_logits(path, ids, mask)
    assert np.abs(want).max() > 0.5  # the random model is not trivially flat
    got = model(ids, mask)
    assert got.shape == want.shape
    assert _max_valid_diff(got, want, mask) <= TOL


@pytest.mark.parametrize("dispatch", ["dense", "capacity", "blocks", "ragged"])
def test_every_dispatch_matches_transformers(hf_checkpoint, dispatch):
    path = hf_checkpoint("moe_gqa_norm_mlponly")
    model = m2d_jax.from_pretrained(path, moe_dispatch=dispatch)
    ids, mask = padded_batch(model.config.vocab_size, batch=2, seq=16, seed=2)
    assert _max_valid_diff(model(ids, mask), reference_logits(path, ids, mask), mask) <= TOL


def test_position_ids_offset_matches_transformers(hf_checkpoint):
    path = hf_checkpoint("moe_gqa_norm_mlponly")
    model = m2d_jax.from_pretrained(path)
    ids, _ = padded_batch(model.config.vocab_size, batch=2, seq=12, seed=3)
    pos = np.broadcast_to(np.arange(12) + 100, (2, 12))
    mask = np.ones_like(ids)
    want = reference_logits(path, ids, mask, position_ids=pos)
    assert _max_valid_diff(model(ids, mask, pos), want, mask) <= TOL


def test_jit_and_eager_agree(hf_checkpoint):
    from flax import nnx

    model = m2d_jax.from_pretrained(hf_checkpoint("moe_allexperts_sliding"))
    ids, mask = padded_batch(model.config.vocab_size, batch=2, seq=20, seed=4)
    eager = np.asarray(model(ids, mask))
    jitted = np.asarray(nnx.jit(lambda m, i, a: m(i, a))(model, ids, mask))
    np.testing.assert_allclose(jitted, eager, atol=1e-5)


# bfloat16 params and compute vs the float32 path of the same checkpoint. bfloat16 keeps 8 mantissa bits (relative
# rounding 2^-9), compounded over layers, and in MoE layers a rounding can flip a token's top-k choice, which moves
# that token's logits by O(expert output). Stated tolerance: mean |dlogit| <= 1% and max |dlogit| <= 15% of the
# float32 logit range, and no worse than 1.5x the error of transformers' own bfloat16 forward against float32.
@pytest.mark.parametrize("name", ["moe_gqa_norm_mlponly", "dense_gqa_headdim"])
def test_bfloat16_close_to_float32(hf_checkpoint, name):
    import jax.numpy as jnp
    import torch
    import transformers

    path = hf_checkpoint(name)
    f32 = m2d_jax.from_pretrained(path)
    bf16 = m2d_jax.from_pretrained(path, dtype="bfloat16")
    assert bf16.embed[...].dtype == jnp.bfloat16
    ids, mask = padded_batch(f32.config.vocab_size, batch=2, seq=16, seed=5)
    valid = mask.astype(bool)
    want = np.asarray(f32(ids, mask))
    got = bf16(ids, mask)
    assert got.dtype == jnp.bfloat16
    hf_bf16 = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, attn_implementation="eager")
    with torch.no_grad():
        hf_got = hf_bf16(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.float().numpy()
    ours = np.abs(np.asarray(got, np.float32) - want)[valid]
    theirs = np.abs(hf_got - want)[valid]
    scale = np.abs(want[valid]).max()
    assert ours.mean() <= 0.01 * scale and ours.max() <= 0.15 * scale
    assert ours.mean() <= 1.5 * theirs.mean() and ours.max() <= 1.5 * theirs.max()


def _imported_structure(config) -> dict:
    """What m2d_jax's imported config says about the model's structure."""
    a, moe = config.attention, config.moe
    return dict(vocab_size=config.vocab_size, hidden_size=config.hidden_size, num_heads=a.num_heads,
                num_kv_heads=a.num_kv_heads, head_dim=a.head_dim, attention_bias=a.bias,
                sliding_windows=tuple(a.sliding_window if kind == "sliding_attention" else None
                                      for kind in a.layer_types),
                moe_layers=tuple(config.moe_layers), num_experts=moe.experts.num_experts,
                top_k=moe.router.top_k, moe_intermediate_size=moe.experts.intermediate_size,
                norm_topk_prob=moe.router.norm_topk_prob, tie_word_embeddings=config.tie_word_embeddings,
                rope_theta=config.rope.theta, rms_norm_eps=config.norm.eps)


def _transformers_structure(path) -> dict:
    """The same, read from transformers' own model for the checkpoint: its modules, and its config class for what
    no module shape shows (RoPE theta, norm epsilon)."""
    ref = load_reference(path)
    layers = ref.model.layers
    attention = layers[0].self_attn
    moe = [i for i, layer in enumerate(layers) if hasattr(layer.mlp, "experts")]
    block = layers[moe[0]].mlp
    embed = ref.model.embed_tokens.weight
    return dict(vocab_size=embed.shape[0], hidden_size=embed.shape[1],
                num_heads=attention.q_proj.out_features // attention.head_dim,
                num_kv_heads=attention.k_proj.out_features // attention.head_dim, head_dim=attention.head_dim,
                attention_bias=attention.q_proj.bias is not None,
                sliding_windows=tuple(layer.self_attn.sliding_window for layer in layers),
                moe_layers=tuple(moe), num_experts=block.experts.gate_up_proj.shape[0], top_k=block.gate.top_k,
                moe_intermediate_size=block.experts.down_proj.shape[-1], norm_topk_prob=block.gate.norm_topk_prob,
                tie_word_embeddings=ref.lm_head.weight.data_ptr() == embed.data_ptr(),
                rope_theta=ref.config.rope_parameters["rope_theta"], rms_norm_eps=ref.config.rms_norm_eps)


def test_imported_configs_equal_transformers_and_cover_the_issue_matrix(hf_checkpoint):
    """Each Qwen3-MoE test checkpoint's imported config is what transformers builds from it, and the imported
    configs together cover the issue's matrix (renormalised or not, tied or not, >= 3 GQA ratios, head_dim !=
    d / heads, >= 3 top-k, dense mlp_only layers, sliding windows)."""
    imported = []
    for name in sorted(QWEN3_MOE_CONFIGS):
        path = hf_checkpoint(name)
        ours = _imported_structure(m2d_jax.from_pretrained(path).config)
        assert ours == _transformers_structure(path), name
        imported.append(ours)
    assert {s["norm_topk_prob"] for s in imported} == {True, False}
    assert {s["tie_word_embeddings"] for s in imported} == {True, False}
    assert len({s["num_heads"] // s["num_kv_heads"] for s in imported}) >= 3
    assert any(s["head_dim"] != s["hidden_size"] // s["num_heads"] for s in imported)
    assert len({s["top_k"] for s in imported}) >= 3
    assert any(len(s["moe_layers"]) < len(s["sliding_windows"]) for s in imported)
    assert any(s["sliding_windows"][0] for s in imported)


def test_observer_sees_routing_and_expert_outputs(hf_checkpoint):
    """``observe`` runs inside each scanned MoE layer: its routing equals transformers' router logits and the
    weighted sum of the expert outputs it sees is the MoE block output."""
    import jax.numpy as jnp

    path = hf_checkpoint("moe_gqa_norm_mlponly")
    model = m2d_jax.from_pretrained(path)
    ids, mask = padded_batch(model.config.vocab_size, batch=2, seq=9, seed=6)
    seen = lambda v: (v.routing.logits, v.routing.top_idx, jnp.einsum("tk,tkd->td", v.routing.top_weight,
                                                                       v.expert_out))
    hidden, obs = model.hidden_states(ids, mask, observe=seen)
    assert [o is None for o in obs] == [False, True, False]  # stacks: moe, dense, moe
    import torch

    ref = load_reference(path)
    block_out = {}
    for layer in (0, 2):  # the oracle's MoE block outputs, captured with torch hooks (test-side only)
        ref.model.layers[layer].mlp.register_forward_hook(
            lambda mod, inp, out, layer=layer: block_out.__setitem__(layer, out.reshape(-1, out.shape[-1])))
    with torch.no_grad():
        out = ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), output_router_logits=True)
    valid = mask.reshape(-1).astype(bool)
    for stack, layer in ((0, 0), (2, 2)):
        logits, top_idx, moe_out = (np.asarray(o[0]) for o in obs[stack])
        np.testing.assert_allclose(logits[valid], out.router_logits[[0, 2].index(layer)].numpy()[valid], atol=1e-4)
        np.testing.assert_allclose(moe_out[valid], block_out[layer].numpy()[valid], atol=1e-4)
        assert top_idx.shape == (18, 2)
