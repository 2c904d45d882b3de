"""Distillation numerics against independent references: the chunked forward KL vs NumPy and torch's kl_div, the
fused LM-head + KL loss and its own gradient vs the unfused loss under autodiff (and its backward pass computing no
logits), the next-token CE and Switch load-balancing loss vs NumPy, the WSD schedule vs transformers'
get_wsd_schedule, and the mesh / logical-axis rules."""

import types

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest

from m2d_jax.distill import loss as L
from m2d_jax.distill.schedule import wsd_schedule
from m2d_jax.distill.sharding import MeshError, check_batch, logical_to_spec, make_mesh, mesh_shape

B, S, D, V = 3, 11, 8, 40


def _np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.fixture()
def case():
    rng = np.random.default_rng(0)
    hs, ht = rng.normal(size=(B, S, D)), rng.normal(size=(B, S, D))
    ws, wt = rng.normal(size=(D, V)), rng.normal(size=(D, V)) * 2
    mask = np.ones((B, S), np.int32)
    mask[0, :4] = 0  # left padding
    mask[2, 7:] = 0  # right padding
    return {k: np.asarray(v, np.float32) if k != "mask" else v for k, v in
            dict(hs=hs, ht=ht, ws=ws, wt=wt, mask=mask).items()}


def _kl(c, chunk, temperature=1.0, hs=None):
    total, count = L.forward_kl_sums(jnp.asarray(c["hs"] if hs is None else hs), jnp.asarray(c["ht"]),
                                     jnp.asarray(c["mask"]), lambda h: h @ jnp.asarray(c["ws"]),
                                     lambda h: h @ jnp.asarray(c["wt"]), temperature, chunk)
    return float(total / count), float(count)


def test_kl_zero_for_identical_models(case):
    total, count = L.forward_kl_sums(jnp.asarray(case["ht"]), jnp.asarray(case["ht"]), jnp.asarray(case["mask"]),
                                     lambda h: h @ case["wt"], lambda h: h @ case["wt"], 1.0, 4)
    assert count == case["mask"].sum() and abs(float(total)) < 1e-6


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kl_equals_numpy_and_torch_kl_div(case, temperature):
    import torch

    s_logits, t_logits = case["hs"] @ case["ws"] / temperature, case["ht"] @ case["wt"] / temperature
    ls, lt = _np_log_softmax(s_logits.astype(np.float64)), _np_log_softmax(t_logits.astype(np.float64))
    per_token = (np.exp(lt) * (lt - ls)).sum(-1)
    ref = (per_token * case["mask"]).sum() / case["mask"].sum()
    torch_per_token = torch.nn.functional.kl_div(torch.tensor(ls), torch.tensor(lt), reduction="none",
                                                 log_target=True).sum(-1).numpy()
    np.testing.assert_allclose(torch_per_token, per_token, rtol=1e-12)
    value, _ = _kl(case, 4, temperature)
    assert value > 0.1  # non-trivial case
    np.testing.assert_allclose(value, ref, rtol=1e-5)


@pytest.mark.parametrize("chunk", [1, 3, 4, 7, 11, 64])
def test_kl_and_grads_independent_of_chunk_size(case, chunk):
    def loss(ws, chunk):
        total, count = L.forward_kl_sums(jnp.asarray(case["hs"]), jnp.asarray(case["ht"]), jnp.asarray(case["mask"]),
                                         lambda h: h @ ws, lambda h: h @ jnp.asarray(case["wt"]), 1.0, chunk)
        return total / count

    ws = jnp.asarray(case["ws"])
    ref_value, ref_grad = jax.value_and_grad(loss)(ws, 0)
    value, grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)(ws, chunk)
    np.testing.assert_allclose(value, ref_value, rtol=1e-6)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-5, atol=1e-7)


def test_kl_ignores_masked_positions(case):
    perturbed = case["hs"].copy()
    perturbed[case["mask"] == 0] = 1e3  # garbage where the mask is 0
    assert _kl(case, 4) == pytest.approx(_kl(case, 4, hs=perturbed), rel=1e-6)
    assert _kl(case, 0)[1] == case["mask"].sum()


def _kl_mean(fused, hs, ws, c, temperature, chunk, ht=None):
    """Mean KL of ``fused_forward_kl_sums`` or of ``forward_kl_sums`` with the heads ``h @ kernel.astype(h.dtype)``
    (as ``CausalLM.logits``)."""
    ht, wt, mask = jnp.asarray(c["ht"]) if ht is None else ht, jnp.asarray(c["wt"]), jnp.asarray(c["mask"])
    if fused:
        total, count = L.fused_forward_kl_sums(hs, ws, ht, wt, mask, temperature, chunk)
    else:
        total, count = L.forward_kl_sums(hs, ht, mask, lambda h: h @ ws.astype(h.dtype),
                                         lambda h: h @ wt.astype(h.dtype), temperature, chunk)
    return total / count


def _value_and_grads(fused, c, temperature, chunk, hs=None, ws=None):
    hs = jnp.asarray(c["hs"]) if hs is None else hs
    ws = jnp.asarray(c["ws"]) if ws is None else ws
    f = jax.jit(jax.value_and_grad(_kl_mean, argnums=(1, 2)), static_argnums=(0, 4, 5))
    return f(fused, hs, ws, c, temperature, chunk)


@pytest.mark.parametrize("temperature, chunk", [(1.0, 0), (1.0, 4), (2.5, 4), (2.5, 3), (0.7, 11), (1.0, 64)])
def test_fused_kl_equals_unfused_loss_and_grads(case, temperature, chunk):
    """Padding on both sides, T != 1, chunks that do not divide S = 11 (3, 4) and one chunk (0, 11, 64)."""
    ref_value, (ref_dh, ref_dw) = _value_and_grads(False, case, temperature, chunk)
    value, (dh, dw) = _value_and_grads(True, case, temperature, chunk)
    assert float(ref_value) > 0.1  # non-trivial case
    np.testing.assert_allclose(value, ref_value, rtol=1e-6)
    np.testing.assert_allclose(dh, ref_dh, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(dw, ref_dw, rtol=1e-5, atol=1e-7)
    assert not np.any(np.asarray(dh)[case["mask"] == 0])  # masked positions get no gradient
    assert dh.dtype == jnp.float32 and dw.dtype == jnp.float32


def test_fused_kl_tied_head_grads_reach_the_embedding(case):
    """A tied head passes ``embed.T`` [d, V]; the gradient with respect to embed [V, d] equals the unfused one."""
    embed = jnp.asarray(case["ws"].T.copy())  # [V, d]

    def loss(embed, fused):
        return _kl_mean(fused, jnp.asarray(case["hs"]), embed.T, case, 2.0, 4)

    ref_value, ref_grad = jax.value_and_grad(loss)(embed, False)
    value, grad = jax.value_and_grad(loss)(embed, True)
    assert grad.shape == (V, D)
    np.testing.assert_allclose(value, ref_value, rtol=1e-6)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-5, atol=1e-7)


def test_fused_kl_ignores_masked_positions_and_the_teacher_gets_no_gradient(case):
    perturbed = case["hs"].copy()
    perturbed[case["mask"] == 0] = 1e3  # garbage where the mask is 0
    value, (dh, dw) = _value_and_grads(True, case, 1.0, 4)
    value_p, (dh_p, dw_p) = _value_and_grads(True, case, 1.0, 4, hs=jnp.asarray(perturbed))
    np.testing.assert_allclose(value_p, value, rtol=1e-6)
    np.testing.assert_allclose(dw_p, dw, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(dh_p, dh)
    teacher_grad = jax.grad(lambda ht: _kl_mean(True, jnp.asarray(case["hs"]), jnp.asarray(case["ws"]), case, 1.0,
                                                4, ht=ht))(jnp.asarray(case["ht"]))
    assert not np.any(np.asarray(teacher_grad))


def test_fused_kl_bf16_compute_close_to_float32(case):
    """bf16 hidden states (bf16 matmuls) over a float32 head kernel: loss within 2% and gradients within 3% of
    their largest entry of the float32 values, for fused and unfused alike; gradient dtypes follow the inputs."""
    ref_value, (ref_dh, ref_dw) = _value_and_grads(False, case, 2.0, 4)
    hs16 = jnp.asarray(case["hs"], jnp.bfloat16)
    for fused in (False, True):
        value, (dh, dw) = _value_and_grads(fused, case, 2.0, 4, hs=hs16)
        assert dh.dtype == jnp.bfloat16 and dw.dtype == jnp.float32
        np.testing.assert_allclose(value, ref_value, rtol=2e-2)
        np.testing.assert_allclose(np.asarray(dh, np.float32), ref_dh, atol=3e-2 * float(jnp.abs(ref_dh).max()))
        np.testing.assert_allclose(dw, ref_dw, atol=3e-2 * float(jnp.abs(ref_dw).max()))


def _logits_matmuls(jaxpr, shape) -> int:
    """Number of dot_general equations with output ``shape`` in ``jaxpr`` and every sub-jaxpr (scan bodies,
    checkpoints, custom rules), each body counted once."""
    n = 0
    for eqn in jaxpr.eqns:
        n += eqn.primitive.name == "dot_general" and tuple(eqn.outvars[0].aval.shape) == shape
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            n += _logits_matmuls(sub, shape)
    return n


@pytest.mark.parametrize("chunk", [3, 4])
def test_fused_kl_backward_recomputes_no_logits(case, chunk):
    """In the gradient's jaxpr the unfused loss computes the [B, chunk, V] logits of both models twice (forward and
    rematerialised backward); the fused loss once each."""
    counts = {fused: _logits_matmuls(jax.make_jaxpr(jax.grad(_kl_mean, argnums=(1, 2)), static_argnums=(0, 4, 5))(
        fused, jnp.asarray(case["hs"]), jnp.asarray(case["ws"]), case, 1.0, chunk).jaxpr, (B, chunk, V))
        for fused in (False, True)}
    assert counts == {False: 4, True: 2}


def test_fused_kl_gradient_memory_is_o_chunk():
    """XLA's temporary buffers of the compiled gradient: chunked (16 of 256 positions) <= 0.35x of one chunk (full
    logits), and the fused loss needs no more than the unfused one at either setting."""
    b, s, d, v = 2, 256, 32, 4096
    spec = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)  # noqa: E731

    def temp_bytes(fused, chunk):
        def loss(hs, ws, ht, wt, mask):
            if fused:
                total, count = L.fused_forward_kl_sums(hs, ws, ht, wt, mask, 1.0, chunk)
            else:
                total, count = L.forward_kl_sums(hs, ht, mask, lambda h: h @ ws, lambda h: h @ wt, 1.0, chunk)
            return total / count

        compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(spec(b, s, d), spec(d, v), spec(b, s, d),
                                                                  spec(d, v), spec(b, s)).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    fused = {chunk: temp_bytes(True, chunk) for chunk in (0, 16)}
    assert fused[16] <= 0.35 * fused[0]
    assert fused[0] >= b * s * v * 4  # full float32 logits live: the comparison is meaningful
    assert all(fused[chunk] <= temp_bytes(False, chunk) for chunk in fused)


def _tiny_lm(tie_word_embeddings, compute_dtype="float32", seed=0):
    from flax import nnx

    from m2d_jax.models import AttentionSpec, CausalLM, FFNSpec, ModelConfig, RuntimeConfig

    config = ModelConfig(family="qwen3", vocab_size=V, hidden_size=D, num_layers=2, ffn_kinds=("dense",) * 2,
                         attention=AttentionSpec(num_heads=2, num_kv_heads=1, head_dim=4,
                                                 layer_types=("full_attention",) * 2),
                         ffn=FFNSpec(intermediate_size=16), tie_word_embeddings=tie_word_embeddings)
    model = CausalLM(config, RuntimeConfig(compute_dtype=compute_dtype), nnx.Rngs(seed))
    rng = np.random.default_rng(seed)  # larger weights than the default init: a non-trivial KL between two models
    state = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree.map(lambda x: x + jnp.asarray(rng.normal(0, 0.5, x.shape), x.dtype), state))
    return model


@pytest.mark.parametrize("student_tied, teacher_tied, compute_dtype", [(True, False, "float32"),
                                                                       (False, True, "float32"),
                                                                       (True, False, "bfloat16")])
def test_objective_fused_equals_unfused_on_models(case, student_tied, teacher_tied, compute_dtype):
    """ForwardKLDistillation(fused=True) vs (fused=False) on CausalLM models: the loss and the gradient of every
    student parameter (embedding included, tied or not). float32: rtol 1e-5; bf16 compute: within 5% of each
    parameter's largest gradient entry (on this tiny model with its enlarged weights bf16 compute itself is up to 20%
    of that scale away from the float32 gradients, either loss; a wrong gradient is off by O(1))."""
    from flax import nnx

    from m2d_jax.distill.objectives import ForwardKLDistillation

    student, teacher = _tiny_lm(student_tied, compute_dtype, 1), _tiny_lm(teacher_tied, seed=2)
    graphdef, params = nnx.split(student, nnx.Param)
    batch = {"input_ids": jnp.asarray(np.random.default_rng(3).integers(0, V, (B, S)), jnp.int32),
             "attention_mask": jnp.asarray(case["mask"])}
    tokens = jnp.sum(batch["attention_mask"]).astype(jnp.float32)

    def loss(params, fused):
        objective = ForwardKLDistillation(temperature=2.0, chunk=4, fused=fused)
        return objective(nnx.merge(graphdef, params), teacher, batch, tokens, 1)[0]

    grad_fn = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    (ref_value, ref_grads), (value, grads) = grad_fn(params, False), grad_fn(params, True)
    assert float(ref_value) > 0.1
    float32 = compute_dtype == "float32"
    np.testing.assert_allclose(value, ref_value, rtol=1e-6 if float32 else 2e-2)
    for ref, got in zip(jax.tree.leaves(ref_grads), jax.tree.leaves(grads)):
        scale = float(jnp.abs(ref).max())
        assert scale > 0
        rtol, atol = (1e-5, 1e-6 * scale) if float32 else (0, 5e-2 * scale)
        np.testing.assert_allclose(got, ref, rtol=rtol, atol=atol)


def test_next_token_ce_equals_numpy(case):
    rng = np.random.default_rng(1)
    ids = rng.integers(0, V, size=(B, S)).astype(np.int32)
    total, count = L.next_token_ce_sums(jnp.asarray(case["hs"]), jnp.asarray(ids), jnp.asarray(case["mask"]),
                                        lambda h: h @ jnp.asarray(case["ws"]), chunk=4)
    logp = _np_log_softmax((case["hs"] @ case["ws"]).astype(np.float64))
    nll, n = 0.0, 0
    for b in range(B):
        for i in range(S - 1):
            if case["mask"][b, i] and case["mask"][b, i + 1]:
                nll -= logp[b, i, ids[b, i + 1]]
                n += 1
    assert float(count) == n
    np.testing.assert_allclose(float(total), nll, rtol=1e-5)


def test_load_balance_loss_equals_switch_formula():
    rng = np.random.default_rng(2)
    t, e, k = 12, 5, 2
    probs = rng.dirichlet(np.ones(e), size=t).astype(np.float32)
    top_idx = np.argsort(-probs, axis=1)[:, :k].astype(np.int32)
    mask = np.array([[1] * 8 + [0] * 4], np.int32).reshape(2, 6)
    view = types.SimpleNamespace(routing=types.SimpleNamespace(probs=jnp.asarray(probs),
                                                               top_idx=jnp.asarray(top_idx)), real_experts=None)
    f, p, real = L.router_load_observer(jnp.asarray(mask))(view)
    assert float(real) == e
    valid = mask.reshape(-1).astype(bool)
    counts = np.zeros(e)
    for row in top_idx[valid]:
        counts[row] += 1
    f_ref, p_ref = counts / (valid.sum() * k), probs[valid].mean(0)
    np.testing.assert_allclose(f, f_ref, rtol=1e-6)
    np.testing.assert_allclose(p, p_ref, rtol=1e-6)
    # two layers in one stack, a dense stack (None): mean over layers of E * sum_e f_e P_e
    obs = [(jnp.stack([f, jnp.full(e, 1 / e)]), jnp.stack([p, jnp.full(e, 1 / e)]), jnp.full(2, float(e))), None]
    expected = (e * (f_ref * p_ref).sum() + 1.0) / 2
    np.testing.assert_allclose(float(L.load_balance_loss(obs)), expected, rtol=1e-6)
    assert float(L.load_balance_loss([None])) == 0.0
    # a padded layer (per-layer expert counts): 3 real experts of 5, balanced over them -> 1.0, not 5/3
    real_experts = jnp.arange(e) < 3
    padded = np.where(np.arange(e) < 3, 1 / 3, 0.0).astype(np.float32)
    view = types.SimpleNamespace(routing=types.SimpleNamespace(
        probs=jnp.broadcast_to(jnp.asarray(padded), (t, e)), top_idx=jnp.asarray(np.arange(t) % 3)[:, None]),
        real_experts=real_experts)
    f, p, real = L.router_load_observer(jnp.ones((1, t), jnp.int32))(view)
    assert float(real) == 3
    obs = [tuple(x[None] for x in (f, p, real))]
    np.testing.assert_allclose(float(L.load_balance_loss(obs)), 1.0, rtol=1e-6)


@pytest.mark.parametrize("decay_type", ["cosine", "linear", "1-sqrt"])
def test_wsd_matches_transformers(decay_type):
    import torch
    import transformers

    lr, total, warmup, decay, ratio = 1e-4, 40, 5, 12, 0.1
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = transformers.get_wsd_schedule(opt, warmup, decay, num_training_steps=total, decay_type=decay_type,
                                          min_lr_ratio=ratio)
    ref = []
    for _ in range(total + 3):
        ref.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    ours = wsd_schedule(lr, total, warmup, decay, ratio, decay_type)
    np.testing.assert_allclose(np.asarray([ours(s) for s in range(total + 3)]), ref, rtol=1e-5, atol=1e-12)
    assert ref[0] == pytest.approx(ratio * lr) and max(ref) == pytest.approx(lr)


def test_wsd_rejects_bad_phases():
    with pytest.raises(ValueError, match="warmup_steps=10 \\+ decay_steps=10"):
        wsd_schedule(1e-4, 15, 10, 10)
    with pytest.raises(ValueError, match="decay_type"):
        wsd_schedule(1e-4, 15, 1, 1, decay_type="exp")


def test_mesh_shapes_and_errors():
    assert mesh_shape({"data": 2, "fsdp": -1, "tensor": 2, "expert": 1}, 8) == dict(data=2, fsdp=2, tensor=2,
                                                                                     expert=1)
    with pytest.raises(MeshError, match="does not divide the 8 devices"):
        mesh_shape({"data": 3, "fsdp": -1}, 8)
    with pytest.raises(MeshError, match="use 4 devices but 8 are available"):
        mesh_shape({"data": 2, "fsdp": 2, "tensor": 1, "expert": 1}, 8)
    with pytest.raises(MeshError, match="at most one -1"):
        mesh_shape({"data": -1, "fsdp": -1}, 8)
    with pytest.raises(MeshError, match="unknown axes \\['model'\\]"):
        mesh_shape({"model": 2}, 8)


def test_logical_rules_and_batch_checks():
    mesh = make_mesh({"data": 1, "fsdp": 2, "tensor": 2, "expert": 2})
    P = jax.sharding.PartitionSpec
    assert logical_to_spec(("layers", "exp", "embed", "mlp"), (3, 4, 32, 16), mesh) == P(None, "expert", "fsdp",
                                                                                        "tensor")
    assert logical_to_spec(("embed", "vocab"), (32, 320), mesh) == P("fsdp", "tensor")
    # one KV head cannot split over tensor=2: replicated, not an error; head_dim is never split
    assert logical_to_spec(("layers", "embed", "kv_heads", "head_dim"), (2, 32, 1, 16), mesh) == P(
        None, "fsdp", None, None)
    with pytest.raises(MeshError, match="logical axis 'bogus' has no rule"):
        logical_to_spec(("bogus",), (4,), mesh)
    check_batch(8, 2, mesh)  # 4 rows per micro-batch over data x fsdp = 2
    with pytest.raises(MeshError, match="not divisible by data x fsdp = 1 x 2 = 2"):
        check_batch(6, 6, mesh)  # 1 row per micro-batch
    with pytest.raises(MeshError, match="not divisible by config.micro_batches=4"):
        check_batch(6, 4, mesh)
