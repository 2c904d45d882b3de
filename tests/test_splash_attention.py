"""The fused splash-attention path (``m2d_jax.models.splash``) against ``layers.dot_product_attention`` in float32 on
CPU (the Pallas TPU kernels in interpret mode): forward and gradients, GQA, causal, left / right key padding, and a
layer scan mixing a full and a sliding window; and which kernel ``RuntimeConfig.attention`` picks."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m2d_jax.models import RuntimeConfig
from m2d_jax.models.layers import dot_product_attention, make_attention_mask
from m2d_jax.models.splash import attention_kernel, splash_attention
from m2d_jax.errors import M2DError
from m2d_jax.plan import PlanOptions, load_model, plan_once


def test_splash_attention_equals_dot_product_attention_forward_and_gradients():
    """Two scanned layers (full causal, then a 100-token window) over 384 tokens (3 x 3 kernel tiles of 128, so the
    tiles above the diagonal are skipped and the diagonal ones masked), 4 query heads on 2 KV heads, one row
    left-padded and one right-padded. Padded query rows differ by design (the XLA path averages every value there,
    the kernel its padded keys) and are left out of the loss, as every training loss masks them; the gradients
    w.r.t. q, k, v then agree everywhere."""
    layers, b, t, h, kv, d = 2, 2, 384, 4, 2, 16
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(layers, b, t, heads, d)), jnp.float32) for heads in (h, kv, kv))
    cotangent = jnp.asarray(rng.normal(size=(b, t, h, d)), jnp.float32)
    key_mask = np.ones((b, t), np.int32)
    key_mask[0, :37] = 0  # left padding
    key_mask[1, 300:] = 0  # right padding
    key_mask = jnp.asarray(key_mask)
    windows = jnp.asarray([0, 100], jnp.int32)
    real = key_mask[:, :, None, None].astype(jnp.float32)  # [B, T, 1, 1]
    scale = d ** -0.5

    def xla(qkv, window):
        return dot_product_attention(*qkv, make_attention_mask(key_mask, t, window), scale)

    def splash(qkv, window):
        return splash_attention(*qkv, key_mask, window, scale, windows=(0, 100), interpret=True)

    def loss_and_outputs(attend, q, k, v):
        def body(total, xs):
            *qkv, window = xs
            out = attend(qkv, window)  # [B, T, H, D]
            return total + jnp.sum(out * cotangent * real), out

        return jax.lax.scan(body, jnp.float32(0), (q, k, v, windows))

    results = {}
    for name, attend in (("xla", xla), ("splash", splash)):
        (loss, outs), grads = jax.value_and_grad(lambda *a, f=attend: loss_and_outputs(f, *a), argnums=(0, 1, 2),
                                                 has_aux=True)(q, k, v)
        results[name] = (loss, np.asarray(outs), [np.asarray(g) for g in grads])
    (loss_x, outs_x, grads_x), (loss_s, outs_s, grads_s) = results["xla"], results["splash"]
    rows = np.asarray(key_mask, bool)  # compare real query rows
    np.testing.assert_allclose(outs_s[:, rows], outs_x[:, rows], atol=2e-6, rtol=1e-5)
    assert np.isfinite(outs_s).all()  # padded rows too: no empty softmax row
    assert not np.allclose(outs_x[0], outs_x[1])  # the two layers' windows really differ
    np.testing.assert_allclose(loss_s, loss_x, rtol=1e-5)
    for g_s, g_x in zip(grads_s, grads_x):
        np.testing.assert_allclose(g_s, g_x, atol=2e-5, rtol=1e-4)
        assert np.abs(g_x).max() > 0.1


def test_attention_kernel_picks_splash_on_tpu_only_where_supported():
    """"auto": splash for a GQA model on TPU, xla on the CPU (tests, demo) and for MLA / sinks / untiled sequences;
    an explicit "splash" that cannot run is a one-line error naming the field (or the plan flag) and why."""
    qwen, _ = load_model("qwen3_30b_a3b")
    deepseek, _ = load_model("deepseek_v2_lite")
    gpt_oss, _ = load_model("gpt_oss_20b")
    auto, splash = RuntimeConfig(), RuntimeConfig(attention="splash")
    assert attention_kernel(qwen, auto, 2048) == "xla"  # jax's default backend here: the CPU
    assert attention_kernel(qwen, auto, 2048, platform="tpu") == "splash"
    assert attention_kernel(qwen, auto, 2000, platform="tpu") == "xla"
    assert attention_kernel(qwen, RuntimeConfig(attention="xla"), 2048, platform="tpu") == "xla"
    assert attention_kernel(qwen, splash, 2048) == "splash"
    for model, reason in ((deepseek, "MLA attention"), (gpt_oss, "learned attention sinks")):
        assert attention_kernel(model, auto, 2048, platform="tpu") == "xla"
        with pytest.raises(ValueError, match=f"RuntimeConfig.attention='splash' .*: {reason}"):
            attention_kernel(model, splash, 2048)
    with pytest.raises(ValueError, match="not a multiple of the kernel's 128-token block"):
        attention_kernel(qwen, splash, 100)
    with pytest.raises(ValueError, match="attention='flash' not in"):
        dataclasses.replace(auto, attention="flash")
    # the calibrate / eval steps have no activation layout to place the kernel on a mesh: refused before any build
    with pytest.raises(M2DError, match="--attention splash: the eval step is not traced under an activation layout"):
        plan_once("qwen3_moe_tiny", "eval", "gpu-1x8-h100", PlanOptions(attention="splash", groups=2))
