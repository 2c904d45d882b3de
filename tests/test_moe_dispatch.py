"""Every MoE dispatch strategy is exact: equal to a per-token NumPy loop, with empty and overflowing experts."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import m2d_jax
from m2d_jax.models.config import DISPATCHES, FFNSpec
from m2d_jax.models.layers import glu_activation
from m2d_jax.models.moe import ExpertWeights, capacity, expert_outputs, route_softmax_topk

STRATEGIES = ["dense", "capacity", "blocks", "ragged"]
ACT = glu_activation(FFNSpec(intermediate_size=1))


CLAMPED = glu_activation(FFNSpec(intermediate_size=1, activation="clamped_swiglu", swiglu_alpha=1.702,
                                 swiglu_limit=7.0))


def _experts(rng, e, d, m, bias=False):
    shapes = ((e, d, m), (e, d, m), (e, m, d)) + (((e, m), (e, m), (e, d)) if bias else ())
    return ExpertWeights(*(jnp.asarray(rng.normal(size=s).astype(np.float32)) for s in shapes))


def _numpy_reference(x, top_idx, experts, clamped=False):
    """Per-token loop in float64 from the definitions (docs/METHOD.md §1), incl. GPT-OSS biases and clamped SwiGLU."""
    w = {k: (None if v is None else np.asarray(v, np.float64)) for k, v in experts._asdict().items()}
    x = np.asarray(x, np.float64)
    out = np.zeros(top_idx.shape + (x.shape[1],))
    for t in range(x.shape[0]):
        for j, e in enumerate(np.asarray(top_idx)[t]):
            gate, up = x[t] @ w["gate"][e], x[t] @ w["up"][e]
            if w["gate_bias"] is not None:
                gate, up = gate + w["gate_bias"][e], up + w["up_bias"][e]
            if clamped:
                gate, up = np.minimum(gate, 7.0), np.clip(up, -7.0, 7.0)
                h = (up + 1) * gate / (1 + np.exp(-1.702 * gate))
            else:
                h = gate / (1 + np.exp(-gate)) * up
            out[t, j] = h @ w["down"][e] + (0 if w["down_bias"] is None else w["down_bias"][e])
    return out


def _topk_without_repeats(rng, t, e, k, probs=None):
    return np.stack([rng.choice(e, size=k, replace=False, p=probs) for _ in range(t)]).astype(np.int32)


CASES = {
    "balanced": lambda rng, t, e, k: _topk_without_repeats(rng, t, e, k),
    # experts e/2.. never chosen (empty groups), the rest heavily loaded: groups overflow the capacity
    "empty_and_overflow": lambda rng, t, e, k: _topk_without_repeats(
        rng, t, e, k, np.r_[np.full(e // 2, 2.0 / e), np.zeros(e - e // 2)]),
    # every token picks experts 0..k-1: maximal overflow
    "all_same": lambda rng, t, e, k: np.tile(np.arange(k, dtype=np.int32), (t, 1)),
}


def _case_inputs(case: str, rng, t=37, e=8, k=3, d=16, m=12):
    """x [t, d], top_idx [t, k] routed as ``CASES[case]``, experts, and the per-expert assignment counts [e]."""
    x = jnp.asarray(rng.normal(size=(t, d)).astype(np.float32))
    top_idx = jnp.asarray(CASES[case](rng, t, e, k))
    return x, top_idx, _experts(rng, e, d, m), np.bincount(np.asarray(top_idx).ravel(), minlength=e)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_dispatch_equals_numpy_reference(strategy, case):
    t, e, k = 37, 8, 3
    x, top_idx, experts, counts = _case_inputs(case, np.random.default_rng(0), t, e, k)
    if case != "balanced":
        assert (counts == 0).any() and counts.max() > capacity(t, k, e, 1.25)  # the case really tests both
    want = _numpy_reference(x, top_idx, experts)
    got = jax.jit(lambda x, i: expert_outputs(strategy, x, i, experts, ACT))(x, top_idx)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("block_size, blocks_per_step", [(4, 3), (5, 1), (16, 7)])
def test_blocks_dispatch_over_many_steps(case, block_size, blocks_per_step):
    """Small blocks: many steps, a partly filled last real step, steps skipped past the last block, experts split
    over several blocks (and several steps) -- forward and gradients."""
    rng = np.random.default_rng(4)
    t, e, k, d = 37, 8, 3, 16
    x, top_idx, experts, counts = _case_inputs(case, rng, t, e, k, d)
    real_blocks = int(np.sum(-(-counts // block_size)))
    max_blocks = -(-t * k // block_size) + e  # what the static loop is sized for
    assert counts.max() > block_size and -(-real_blocks // blocks_per_step) < -(-max_blocks // blocks_per_step)

    def run(strategy, x, experts):
        return expert_outputs(strategy, x, top_idx, experts, ACT, block_size=block_size,
                              blocks_per_step=blocks_per_step)

    got = jax.jit(lambda x: run("blocks", x, experts))(x)
    np.testing.assert_allclose(np.asarray(got), _numpy_reference(x, top_idx, experts), rtol=1e-5, atol=1e-4)
    weights = jnp.asarray(rng.normal(size=(t, k, d)).astype(np.float32))
    grads = [jax.grad(lambda x, ex, s=s: jnp.sum(run(s, x, ex) * weights), argnums=(0, 1))(x, experts)
             for s in ("blocks", "dense")]
    for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_dispatch_with_biases_and_clamped_swiglu(strategy):
    """GPT-OSS experts: biases on gate/up/down and the clamped (up + 1) * gate * sigmoid(1.702 gate) unit."""
    rng = np.random.default_rng(3)
    t, e, k, d, m = 29, 6, 2, 8, 10
    x = jnp.asarray(3 * rng.normal(size=(t, d)).astype(np.float32))  # large enough that the clamp bites
    top_idx = jnp.asarray(CASES["empty_and_overflow"](rng, t, e, k))
    experts = _experts(rng, e, d, m, bias=True)
    want = _numpy_reference(x, top_idx, experts, clamped=True)
    got = jax.jit(lambda x, i: expert_outputs(strategy, x, i, experts, CLAMPED))(x, top_idx)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("strategy", ["capacity", "blocks", "ragged"])
def test_dispatch_gradients_equal_dense(strategy):
    """Training through the MoE (e.g. the demo teacher) gets the same gradients from every strategy."""
    rng = np.random.default_rng(1)
    t, e, k, d, m = 24, 6, 2, 8, 10
    x = jnp.asarray(rng.normal(size=(t, d)).astype(np.float32))
    logits = jnp.asarray(rng.normal(size=(t, e)).astype(np.float32))
    experts = _experts(rng, e, d, m)

    def loss(experts, x, strategy):
        routing = route_softmax_topk(logits, k, True)
        out = expert_outputs(strategy, x, routing.top_idx, experts, ACT, capacity_factor=0.5)  # forces overflow
        return jnp.sum(jnp.einsum("tk,tkd->td", routing.top_weight, out) ** 2)

    want = jax.grad(loss, argnums=(0, 1))(experts, x, "dense")
    got = jax.grad(loss, argnums=(0, 1))(experts, x, strategy)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        # float32, different summation order (ragged_dot's transpose) -> 1e-4 relative
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)


def test_router_softmax_topk_matches_definition():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(10, 6)).astype(np.float32)
    for norm in (True, False):
        r = route_softmax_topk(jnp.asarray(logits), 3, norm)
        p = np.exp(logits - logits.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        idx = np.argsort(-p, axis=-1, kind="stable")[:, :3]
        w = np.take_along_axis(p, idx, -1)
        if norm:
            w /= w.sum(-1, keepdims=True)
        np.testing.assert_array_equal(np.asarray(r.top_idx), idx)
        np.testing.assert_allclose(np.asarray(r.top_weight), w, rtol=1e-6)
        np.testing.assert_allclose(np.asarray(r.probs), p, rtol=1e-6)


def test_capacity_is_static_and_bounded():
    assert capacity(4096, 8, 64, 1.25) == 640
    assert capacity(10, 4, 4, 1.25) == 10  # never more than the token count
    assert capacity(1, 1, 128, 1.25) == 1


def _names_field_and_every_choice(message: str):
    assert "\n" not in message and "moe_dispatch" in message and "'magic'" in message, message
    assert all(f"'{choice}'" in message for choice in ["auto", *STRATEGIES]), message


def test_unknown_dispatch_is_rejected_before_any_compute(tmp_path):
    """An unknown ``moe_dispatch`` fails in one line that names the field and lists every valid choice: when the
    model is configured (before any weight is read), and in ``expert_outputs`` itself."""
    assert set(DISPATCHES) == {"auto", *STRATEGIES}  # every valid choice is one this file proves exact
    hf_dir = tmp_path / "config_only"  # no weights: loading them would fail with a different error
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text(json.dumps(dict(
        model_type="qwen3_moe", vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, moe_intermediate_size=8, num_experts=4,
        num_experts_per_tok=2)))
    with pytest.raises(ValueError) as err:
        m2d_jax.from_pretrained(hf_dir, moe_dispatch="magic")
    _names_field_and_every_choice(str(err.value))
    with pytest.raises(ValueError) as err:
        expert_outputs("magic", jnp.zeros((2, 4)), jnp.zeros((2, 1), jnp.int32),
                       ExpertWeights(jnp.zeros((2, 4, 3)), jnp.zeros((2, 4, 3)), jnp.zeros((2, 3, 4))), ACT)
    _names_field_and_every_choice(str(err.value))
