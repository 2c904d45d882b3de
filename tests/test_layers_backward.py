"""The building blocks' backward passes keep little and stay exact: attention (additive mask bias, softmax written
in terms of its output), RMSNorm and the SwiGLU unit (rematerialised), Linear (its kernel gradient as one 2-D GEMM)
equal plain references under autodiff, and what they save for the backward pass is what the gradient needs."""

import contextlib
import io
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.ad_checkpoint import print_saved_residuals

from m2d_jax.models.config import FFNSpec
from m2d_jax.models.layers import Linear, RMSNorm, dot_product_attention, glu_activation, make_attention_mask

B, T, KV, G, D = 2, 12, 2, 3, 8


def saved_residuals(f, *args) -> list[tuple[tuple[int, ...], str]]:
    """(shape, origin) of every array the backward pass of ``f`` keeps (jax's own listing, parsed)."""
    with contextlib.redirect_stdout(io.StringIO()) as listing:
        print_saved_residuals(f, *args)
    return [(tuple(int(n) for n in dims.split(",") if n), origin)
            for dims, origin in re.findall(r"^\w+\[([\d,]*)\] (.*)$", listing.getvalue(), re.M)]


def _reference_attention(q, k, v, mask, scale, sinks=None):
    """Textbook GQA: a 5-D einsum, the mask as a select, jax.nn.softmax (float32)."""
    qg = q.reshape(B, T, KV, G, D)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k) * scale  # [B, KV, G, T, S]
    scores = jnp.where(mask, scores, -1e30)
    if sinks is not None:
        sink = jnp.broadcast_to(sinks.reshape(1, KV, G, 1, 1), scores.shape[:-1] + (1,))
        probs = jax.nn.softmax(jnp.concatenate([scores, sink], -1), -1)[..., :-1]
    else:
        probs = jax.nn.softmax(scores, -1)
    return jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(B, T, KV * G, D)


@pytest.mark.parametrize("window, sinks", [(0, False), (5, False), (0, True)])
def test_attention_and_its_gradients_equal_the_reference(window, sinks):
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((B, T, KV * G, D), (B, T, KV, D),
                                                                           (B, T, KV, D)))
    sink = jnp.asarray(rng.standard_normal(KV * G), jnp.float32) if sinks else None
    key_mask = jnp.ones((B, T), jnp.int32).at[1, :4].set(0)  # row 1 left-padded: queries 0-3 see no key
    mask = make_attention_mask(key_mask, T, window)
    out = dot_product_attention(q, k, v, mask, 0.3, sink)
    np.testing.assert_allclose(out, _reference_attention(q, k, v, mask, 0.3, sink), rtol=1e-6, atol=1e-6)  # all rows
    # a masked loss gives padded query rows no cotangent
    cotangent = jnp.asarray(rng.standard_normal(out.shape), jnp.float32) * key_mask[:, :, None, None]
    args = (q, k, v) + ((sink,) if sinks else ())

    def loss(attention):
        return lambda q, k, v, *s: jnp.sum(attention(q, k, v, mask, 0.3, *s) * cotangent)

    grads = jax.grad(loss(dot_product_attention), argnums=tuple(range(len(args))))(*args)
    expected = jax.grad(loss(_reference_attention), argnums=tuple(range(len(args))))(*args)
    for got, want in zip(grads, expected):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # the backward keeps q, k, v in matmul layout and the probabilities once; no mask, scores or exponentials
    kept = [shape for shape, _ in saved_residuals(loss(dot_product_attention), *args)]
    assert kept.count((B, KV, G * T, T)) == 1 and not any(len(s) == 5 and s[-1] == T for s in kept), kept


@pytest.mark.parametrize("weight_in_float32", [False, True])
def test_rms_norm_gradients_equal_the_formula_and_keep_only_its_input(weight_in_float32):
    rng = np.random.default_rng(1)
    norm = RMSNorm(16, 1e-6, jnp.float32, nnx.Rngs(0), weight_in_float32=weight_in_float32)
    graphdef, params = nnx.split(norm)
    scale = jnp.asarray(rng.standard_normal(16), jnp.float32)
    params["scale"].set_value(scale)
    x, ct = (jnp.asarray(rng.standard_normal((3, 5, 16)), jnp.float32) for _ in range(2))

    def formula(x, params):
        return params["scale"][...] * x / jnp.sqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6)

    def loss(norm_fn):
        return lambda x, params: jnp.sum(norm_fn(x, params) * ct)

    module = lambda x, params: nnx.merge(graphdef, params)(x)  # noqa: E731
    got, want = (jax.grad(loss(f), (0, 1))(x, params) for f in (module, formula))
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
    kept = [shape for shape, _ in saved_residuals(loss(module), x, params)]
    # x, the scale and the loss's cotangent: no normalised copy, no per-row statistics
    assert sorted(kept) == sorted([x.shape, (16,), ct.shape]), kept


@pytest.mark.parametrize("activation", ["silu", "clamped_swiglu"])
def test_glu_gradients_equal_the_formula_and_keep_only_gate_and_up(activation):
    ffn = FFNSpec(intermediate_size=1, activation=activation, swiglu_alpha=1.702, swiglu_limit=2.0)
    rng = np.random.default_rng(2)
    gate, up, ct = (jnp.asarray(3 * rng.standard_normal((4, 32)), jnp.float32) for _ in range(3))

    def formula(gate, up):
        if activation == "silu":
            return gate / (1 + jnp.exp(-gate)) * up
        gate, up = jnp.minimum(gate, 2.0), jnp.clip(up, -2.0, 2.0)
        return (up + 1) * gate / (1 + jnp.exp(-1.702 * gate))

    phi = glu_activation(ffn)
    got = jax.grad(lambda g, u: jnp.sum(phi(g, u) * ct), (0, 1))(gate, up)
    want = jax.grad(lambda g, u: jnp.sum(formula(g, u) * ct), (0, 1))(gate, up)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
    kept = saved_residuals(lambda g, u: jnp.sum(phi(g, u) * ct), gate, up)  # ct: the constant
    assert sorted(origin for _, origin in kept) == ["from a constant", "from the argument g", "from the argument u"], \
        kept  # no sigmoid, no SiLU, no clamps


@pytest.mark.parametrize("in_shape, out_shape", [((16,), (3, 8)), ((3, 8), (16,))])
def test_linear_gradients_equal_the_contraction(in_shape, out_shape):
    """Multi-axis features (q_proj-like [d] -> [H, D], o_proj-like [H, D] -> [d]) with tokens on two axes: the
    custom kernel gradient (one 2-D GEMM over the flattened tokens) equals autodiff of the plain contraction."""
    rng = np.random.default_rng(3)
    layer = Linear(in_shape, out_shape, ("a",) * len(in_shape), ("b",) * len(out_shape), True, jnp.float32,
                   nnx.Rngs(0))
    graphdef, params = nnx.split(layer)
    x = jnp.asarray(rng.standard_normal((2, 5) + in_shape), jnp.float32)
    ct = jnp.asarray(rng.standard_normal((2, 5) + out_shape), jnp.float32)
    n_in = len(in_shape)

    def contraction(x, params):
        dims = (tuple(range(2, 2 + n_in)), tuple(range(n_in)))
        return jax.lax.dot_general(x, params["kernel"][...], (dims, ((), ()))) + params["bias"][...]

    module = lambda x, params: nnx.merge(graphdef, params)(x)  # noqa: E731
    np.testing.assert_allclose(module(x, params), contraction(x, params), rtol=1e-6, atol=1e-6)
    got, want = (jax.jit(jax.grad(lambda x, p: jnp.sum(f(x, p) * ct), (0, 1)))(x, params)
                 for f in (module, contraction))
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
