"""MoE -> dense conversion: groupings, merging, DP scaling, concatenation, student assembly
(docs/METHOD.md §5-§10, §15)."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.cluster.hierarchy as sch
from scipy.spatial.distance import squareform

import m2d_jax
from convert_helpers import IDENTITY_TEACHERS, identity_teacher_config as _identity_teacher_config
from m2d_jax.convert import grouping
from m2d_jax.convert.dense import (DenseFFN, append_ffn, concat_experts, dp_scales, merge_matrix, pad_ffn,
                                   plan_layer)
from m2d_jax.convert.plan import plan_conversion
from m2d_jax.convert.student import build_dense_student, build_random_ffn_student
from m2d_jax.hf.oracle import make_hf_checkpoint, padded_batch
from m2d_jax.models import ExpertWeights, abstract_model


# ---- groupings ---------------------------------------------------------------------------------------------
def _partition(labels, items=None):
    items = np.arange(len(labels)) if items is None else np.asarray(items)
    return {frozenset(items[labels == g].tolist()) for g in np.unique(labels)}


def _random_distances(rng, n):
    points = rng.normal(size=(n, 5))
    return np.sqrt(((points[:, None] - points[None]) ** 2).sum(-1))


@pytest.mark.parametrize("n,k", [(12, 3), (16, 4), (9, 1), (7, 6), (30, 8)])
def test_average_linkage_equals_scipy(n, k):
    rng = np.random.default_rng(n * 100 + k)
    dist = _random_distances(rng, n)
    reference = sch.cut_tree(sch.linkage(squareform(dist, checks=False), method="average"), n_clusters=k)[:, 0]
    ours = grouping.average_linkage(dist, k)
    assert _partition(ours) == _partition(reference)
    assert sorted(np.unique(ours)) == list(range(k))


def _reference_labels(dist, k):
    return sch.cut_tree(sch.linkage(squareform(dist, checks=False), method="average"), n_clusters=k)[:, 0]


def test_clustering_groupings_equal_scipy_on_their_distances():
    rng = np.random.default_rng(0)
    e, d, kk = 16, 6, 4
    selected = rng.permutation(e)[:12]
    # weight clustering: cosine distance of flattened weights
    features = rng.normal(size=(e, 40))
    sel_f = features[selected]
    unit = sel_f / np.linalg.norm(sel_f, axis=1, keepdims=True)
    labels = grouping.group_labels("weight_cluster", selected, kk, weight_gram=features @ features.T)
    assert _partition(labels, selected) == _partition(_reference_labels(1 - unit @ unit.T, kk), selected)
    # router clustering: 1 - cosine of router-logit profiles, from Z = E[z z^T]
    logits = rng.normal(size=(500, e)) + rng.normal(size=e)
    z = logits.T @ logits / len(logits)
    prof = logits[:, selected]
    cos = (prof.T @ prof) / np.outer(np.linalg.norm(prof, axis=0), np.linalg.norm(prof, axis=0))
    labels = grouping.group_labels("router_cluster", selected, kk, router_moment=z)
    assert _partition(labels, selected) == _partition(_reference_labels(np.clip(1 - cos, 0, None), kk), selected)
    # output clustering: Euclidean distance of mean outputs
    mu = rng.normal(size=(e, d))
    ref_dist = np.linalg.norm(mu[selected][:, None] - mu[selected][None], axis=-1)
    labels = grouping.group_labels("output_cluster", selected, kk, mean_output=mu)
    assert _partition(labels, selected) == _partition(_reference_labels(ref_dist, kk), selected)
    # dominant expert: anchors are the first k; others join the most router-similar anchor
    labels = grouping.group_labels("dominant_expert", selected, kk, router_moment=z)
    assert list(labels[:kk]) == list(range(kk))
    for r in range(kk, len(selected)):
        assert labels[r] == int(np.argmax(cos[r, :kk]))


@pytest.mark.parametrize("method", grouping.GROUPINGS)
@pytest.mark.parametrize("num_selected,k", [(8, 8), (12, 4), (10, 4), (7, 3), (5, 1)])
def test_grouping_partition_invariants(method, num_selected, k):
    rng = np.random.default_rng(num_selected * 10 + k)
    e = 16
    selected = rng.permutation(e)[:num_selected]
    logits = rng.normal(size=(300, e))
    features = rng.normal(size=(e, 20))
    labels = grouping.group_labels(method, selected, k, weight_gram=features @ features.T,
                                   router_moment=logits.T @ logits / 300, mean_output=rng.normal(size=(e, 4)))
    assert labels.shape == (num_selected,)
    assert sorted(set(labels.tolist())) == list(range(k))  # exactly k non-empty groups, every expert in one
    if num_selected == k:
        np.testing.assert_array_equal(labels, np.arange(k))  # singletons in selection order
    if method == "round_robin":
        sizes = np.bincount(labels, minlength=k)
        assert sizes.max() - sizes.min() <= 1
        np.testing.assert_array_equal(labels[:k], np.arange(k))  # each top-k expert leads its own group


def test_grouping_bad_input():
    with pytest.raises(ValueError, match="unknown grouping 'kmeans'"):
        grouping.group_labels("kmeans", np.arange(4), 2)
    with pytest.raises(ValueError, match="k=5 non-empty groups"):
        grouping.group_labels("round_robin", np.arange(4), 5)
    with pytest.raises(ValueError, match="router_logit_moment"):
        grouping.group_labels("router_cluster", np.arange(4), 2)


# ---- merging, DP scaling, concatenation ------------------------------------------------------------------------
def test_merge_matrix_and_dp_scales():
    scores = np.array([4.0, 0.0, 1.0, 3.0, 0.0, 2.0])
    alpha = merge_matrix([np.array([0, 2]), np.array([3]), np.array([1, 4])], scores)
    np.testing.assert_allclose(alpha[0], [0.8, 0, 0.2, 0, 0, 0])
    np.testing.assert_allclose(alpha[1], [0, 0, 0, 1, 0, 0])
    np.testing.assert_allclose(alpha[2], [0, 0.5, 0, 0, 0.5, 0])  # zero-score group: uniform
    np.testing.assert_allclose(dp_scales("uniform", alpha, scores, 1.0), [1 / 3] * 3)
    prop = dp_scales("proportional", alpha, scores, 1.0)
    np.testing.assert_allclose(prop, [5 / 8, 3 / 8, 0])
    assert abs(prop.sum() - 1) < 1e-12  # normalised routers: sum c = 1
    np.testing.assert_allclose(dp_scales("uniform", alpha, scores, 0.6), [0.2] * 3)  # un-normalised: mass / k
    np.testing.assert_allclose(dp_scales("proportional", alpha, scores, 0.6).sum(), 0.6)
    cp = np.array([0.5, 0.1, 0.25, 0.4, 0.2, 0.3])  # DeepSeek released rule: rho * alpha-weighted CP
    np.testing.assert_allclose(dp_scales("uniform", alpha, scores, 0.6, "conditional_prob", cp, 2.0),
                               2.0 * np.array([0.8 * 0.5 + 0.2 * 0.25, 0.4, 0.15]))
    with pytest.raises(ValueError, match="unknown DP scaling 'equal'"):
        dp_scales("equal", alpha, scores, 1.0)


def test_plan_orders_groups_by_importance():
    scores = np.array([1.0, 5.0, 2.0, 0.5, 3.0, 0.1])
    selected = np.array([1, 4, 2, 0])  # best first
    plan = plan_layer(np.array([0, 1, 1, 0]), selected, scores, "proportional", 1.0)
    assert plan.groups == ((1, 0), (4, 2))  # S = 6 and 5
    np.testing.assert_allclose(plan.scales, [6 / 11, 5 / 11])
    np.testing.assert_allclose(plan.alpha.sum(1), 1.0)


def _numpy_ffn(x, gate, up, down, act, gate_bias=None, up_bias=None, down_bias=None):
    g, u = x @ gate, x @ up
    g = g if gate_bias is None else g + gate_bias
    u = u if up_bias is None else u + up_bias
    y = np.asarray(act(jnp.asarray(g), jnp.asarray(u)), np.float64) @ down
    return y if down_bias is None else y + down_bias


def _silu_glu(gate, up):
    return jax.nn.silu(gate) * up


def _clamped_swiglu(gate, up, alpha=1.702, limit=7.0):  # GPT-OSS's gate (docs/METHOD.md §1), written independently
    gate = jnp.minimum(gate, limit)
    up = jnp.clip(up, -limit, limit)
    return (up + 1) * gate * jax.nn.sigmoid(alpha * gate)


@pytest.mark.parametrize("with_bias,with_shared,act", [(False, False, _silu_glu),
                                                        (True, True, _clamped_swiglu),
                                                        (False, True, _silu_glu)])
def test_concatenation_identity(with_bias, with_shared, act):
    """dense(x) == sum_g c_g f~_g(x) + shared(x): merged representatives evaluated one by one (float64 NumPy)."""
    rng = np.random.default_rng(1)
    e, d, m, ms, k = 6, 8, 5, 4, 3
    w = lambda *s: rng.normal(size=s) * 2  # noqa: E731  large enough that the clamp is active
    experts = ExpertWeights(w(e, d, m), w(e, d, m), w(e, m, d), *((w(e, m), w(e, m), w(e, d)) if with_bias else ()))
    shared = DenseFFN(w(d, ms), w(d, ms), w(ms, d), *((w(ms), w(ms), w(d)) if with_bias else ())) if with_shared \
        else None
    groups = [np.array([0, 3]), np.array([5]), np.array([1, 2, 4])]
    alpha = merge_matrix(groups, rng.uniform(0.1, 1, size=e))
    scales = rng.uniform(0.1, 1, size=k)
    f32 = lambda t: None if t is None else jnp.asarray(t, jnp.float32)  # noqa: E731
    dense = concat_experts(ExpertWeights(*map(f32, experts)), f32(alpha), f32(scales),
                           None if shared is None else DenseFFN(*map(f32, shared)))
    assert dense.width == k * m + (ms if with_shared else 0)
    x = rng.normal(size=(32, d))
    expected = np.zeros((32, d))
    for g in range(k):
        merged = [None if t is None else np.einsum("e,e...->...", alpha[g], t) for t in experts]
        expected += scales[g] * _numpy_ffn(x, *merged[:3], act, *merged[3:])
    if shared is not None:
        expected += _numpy_ffn(x, *shared[:3], act, *shared[3:])
    got = _numpy_ffn(x, *[None if t is None else np.asarray(t, np.float64) for t in dense[:3]], act,
                     *[None if t is None else np.asarray(t, np.float64) for t in dense[3:]])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4 * np.abs(expected).max())


def test_pad_ffn_preserves_function_and_rejects_wider():
    rng = np.random.default_rng(2)
    ffn = DenseFFN(*(jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((4, 6), (4, 6), (6, 4))))
    padded = pad_ffn(ffn, 10, "layer 0")
    x = rng.normal(size=(5, 4)).astype(np.float32)
    act = _silu_glu
    np.testing.assert_array_equal(np.asarray(padded.gate)[:, 6:], 0)  # zero neurons contribute exactly 0
    np.testing.assert_array_equal(np.asarray(padded.down)[6:], 0)
    np.testing.assert_array_equal(np.asarray(padded.up)[:, :6], np.asarray(ffn.up))
    np.testing.assert_allclose(_numpy_ffn(x, *padded[:3], act), _numpy_ffn(x, *ffn[:3], act), rtol=1e-5)
    with pytest.raises(ValueError, match="layer 0: dense FFN of width 6 is wider than the student's FFN width 5"):
        pad_ffn(ffn, 5, "layer 0")
    both = append_ffn(ffn, padded)
    np.testing.assert_allclose(_numpy_ffn(x, *both[:3], act), 2 * _numpy_ffn(x, *ffn[:3], act), rtol=1e-5)


# ---- students ------------------------------------------------------------------------------------------------
def _zero_router(model):
    """Zero router weights (and bias): a uniform softmax, so with k = E every expert gets weight 1/k (x rho)."""
    for stack, (kind, _, _) in zip(model.stacks, model.config.stacks):
        if kind == "moe":
            for name in ("router", "router_bias"):
                if hasattr(stack.moe, name):
                    leaf = getattr(stack.moe, name)
                    leaf.set_value(jnp.zeros_like(leaf.get_value()))
    return model


@pytest.fixture(scope="module")
def identity_teacher_dir(tmp_path_factory):
    return make_hf_checkpoint(_identity_teacher_config(), tmp_path_factory.mktemp("t") / "teacher", seed=3,
                              init_std=0.1)


@pytest.mark.parametrize("name", sorted(IDENTITY_TEACHERS))
def test_exactness_identity_pure_pruning(tmp_path, name):
    """E = k, zero router: every expert selected with weight rho/k; pure pruning + uniform DP is exact
    (docs/METHOD.md §15 check 2).

    Un-normalised routers: E[sum_e w_e] = rho * (sum of all E softmax probabilities) = rho; DeepSeek's released rule
    c_g = rho * CP_g with CP_e = 1/E; shared experts appended with c = 1; GPT-OSS biases merged and down biases
    summed with the scales, and a zeroed 1-expert router.
    """
    hf_config, family, width = IDENTITY_TEACHERS[name]
    src = make_hf_checkpoint(hf_config, tmp_path / "t", seed=3, init_std=0.1)
    teacher = _zero_router(m2d_jax.from_pretrained(src, moe_dispatch="dense"))
    k = teacher.config.moe.experts.num_experts
    rho = teacher.config.moe.router.routed_scaling_factor
    moe_layers = [i for i, kind in enumerate(teacher.config.ffn_kinds) if kind == "moe"]
    selected = np.tile(np.arange(k)[::-1], (len(moe_layers), 1))  # any order: the function does not change
    plans = plan_conversion(teacher, selected, np.ones((len(moe_layers), k)), k, "round_robin", "uniform",
                            routed_mass=np.full(len(moe_layers), rho),
                            conditional_prob=np.full((len(moe_layers), k), 1.0 / k))
    student = build_dense_student(teacher, plans, k)
    c = student.config
    assert c.family == family
    if family in ("gpt_oss", "olmoe", "mixtral"):  # the one-expert student form
        assert c.moe.experts.num_experts == 1 and c.moe.router.top_k == 1 and c.moe.experts.intermediate_size == width
    else:
        assert set(c.ffn_kinds) == {"dense"} and c.ffn.intermediate_size == width and c.moe is None
    ids, mask = padded_batch(c.vocab_size, 2, 12, 0)
    want, got = np.asarray(teacher(ids, mask)), np.asarray(student(ids, mask))
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    assert np.abs(want).max() > 0.1  # the logits are not trivially small


def test_random_ffn_baseline_copies_everything_else(identity_teacher_dir):
    teacher = m2d_jax.from_pretrained(identity_teacher_dir)
    student = build_random_ffn_student(teacher, k=2, seed=5)
    assert student.config.ffn.intermediate_size == 64
    from flax import nnx
    s_leaves = {tuple(k): np.asarray(v.get_value()) for k, v in nnx.state(student, nnx.Param).flat_state()}
    t_leaves = {tuple(k): np.asarray(v.get_value()) for k, v in nnx.state(teacher, nnx.Param).flat_state()}
    ffn = [p for p in s_leaves if "mlp" in p]
    assert len(ffn) == 3
    for p in ffn:
        assert abs(s_leaves[p].std() - 0.02) < 0.003 and abs(s_leaves[p].mean()) < 0.003
    # attention of global layer 1 (the teacher's dense stack 1) is copied into row 1 of the student's one stack
    np.testing.assert_array_equal(s_leaves[("stacks", 0, "attn", "q_proj", "kernel")][1],
                                  t_leaves[("stacks", 1, "attn", "q_proj", "kernel")][0])
    for p in (("embed",), ("lm_head",), ("final_norm", "scale")):
        np.testing.assert_array_equal(s_leaves[p], t_leaves[p])


def test_wider_dense_layer_is_rejected(identity_teacher_dir):
    teacher = m2d_jax.from_pretrained(identity_teacher_dir)  # dense layer of width 96
    moe_layers = [0, 2]
    plans = plan_conversion(teacher, np.tile(np.arange(4), (2, 1)), np.ones((2, 4)), 2, "round_robin", "uniform")
    assert set(plans) == set(moe_layers)
    with pytest.raises(ValueError, match="teacher layer 1 \\(dense\\): dense FFN of width 96 is wider than the "
                                         "student's FFN width 64"):
        build_dense_student(teacher, plans, 2)


def test_plan_conversion_bad_input(identity_teacher_dir):
    teacher = m2d_jax.from_pretrained(identity_teacher_dir)
    sel = np.tile(np.arange(4), (2, 1))
    with pytest.raises(ValueError, match="k=5 groups: must be between 1 and K=4"):
        plan_conversion(teacher, sel, np.ones((2, 4)), 5, "round_robin", "uniform")
    with pytest.raises(ValueError, match="unknown grouping 'nope'"):
        plan_conversion(teacher, sel, np.ones((2, 4)), 2, "nope", "uniform")
    with pytest.raises(ValueError, match="unknown DP scaling 'nope'"):
        plan_conversion(teacher, sel, np.ones((2, 4)), 2, "round_robin", "nope")
    with pytest.raises(ValueError, match="distinct"):
        plan_conversion(teacher, np.array([[0, 0, 1, 2]] * 2), np.ones((2, 4)), 2, "round_robin", "uniform")
    with pytest.raises(ValueError, match="router_logit_moment"):
        plan_conversion(teacher, sel, np.ones((2, 4)), 2, "router_cluster", "uniform", stats={})


# config.json values of the real teachers (huggingface.co/Qwen/Qwen3-30B-A3B, deepseek-ai/DeepSeek-V2-Lite,
# openai/gpt-oss-20b)
QWEN3_30B_A3B = dict(model_type="qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                     num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                     moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
                     decoder_sparse_step=1, mlp_only_layers=[], tie_word_embeddings=False, rms_norm_eps=1e-6,
                     max_position_embeddings=40960, rope_theta=1000000.0, hidden_act="silu",
                     use_sliding_window=False, sliding_window=None, max_window_layers=48, attention_bias=False)
DEEPSEEK_V2_LITE = dict(model_type="deepseek_v2", vocab_size=102400, hidden_size=2048, intermediate_size=10944,
                        moe_intermediate_size=1408, num_hidden_layers=27, num_attention_heads=16,
                        num_key_value_heads=16, n_shared_experts=2, n_routed_experts=64, routed_scaling_factor=1.0,
                        kv_lora_rank=512, q_lora_rank=None, qk_nope_head_dim=128, qk_rope_head_dim=64,
                        v_head_dim=128, first_k_dense_replace=1, num_experts_per_tok=6, norm_topk_prob=False,
                        topk_method="greedy", n_group=1, topk_group=1, tie_word_embeddings=False,
                        max_position_embeddings=163840, rope_theta=10000, rms_norm_eps=1e-6, hidden_act="silu",
                        attention_bias=False, moe_layer_freq=1, scoring_func="softmax",
                        rope_scaling={"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707,
                                      "mscale_all_dim": 0.707, "original_max_position_embeddings": 4096,
                                      "type": "yarn"})
GPT_OSS_20B = dict(model_type="gpt_oss", vocab_size=201088, hidden_size=2880, intermediate_size=2880,
                   num_hidden_layers=24, num_attention_heads=64, num_key_value_heads=8, head_dim=64,
                   num_local_experts=32, num_experts_per_tok=4, sliding_window=128,
                   layer_types=["sliding_attention", "full_attention"] * 12, tie_word_embeddings=False,
                   attention_bias=True, swiglu_limit=7.0, max_position_embeddings=131072, rms_norm_eps=1e-5,
                   hidden_act="silu", rope_theta=150000,
                   rope_scaling={"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0,
                                 "original_max_position_embeddings": 4096, "rope_type": "yarn", "truncate": False},
                   quantization_config={"quant_method": "mxfp4"})


def _count(model) -> int:
    from flax import nnx
    return sum(int(np.prod(v.get_value().shape)) for _, v in nnx.state(model, nnx.Param).flat_state())


@pytest.mark.parametrize("hf_config,k,width,expected", [
    (QWEN3_30B_A3B, 8, 6144, 3_340_449_792),
    (DEEPSEEK_V2_LITE, 6, 6 * 1408 + 2 * 1408, 2_659_708_416),  # layer 0 (10944) zero-padded to 11264
    (GPT_OSS_20B, 4, 4 * 2880, 4_185_089_880),  # one expert of width 11520, 1-expert router kept
], ids=["qwen3_30b_a3b", "deepseek_v2_lite", "gpt_oss_20b"])
def test_student_parameter_counts(hf_config, k, width, expected):
    """Shapes only (no weights): the students of the real teacher configs have the exact counts of docs/METHOD.md §9."""
    from m2d_jax.convert.student import student_rule
    from m2d_jax.hf.adapters import adapter_for

    teacher_config = adapter_for(hf_config["model_type"], "config.json").config_from_hf(hf_config, "config.json")
    rule = student_rule(teacher_config.family)
    assert rule.student_width(teacher_config, k) == width
    student_config = rule.student_config(teacher_config, width)
    assert _count(abstract_model(student_config)) == expected


def test_merged_student_layers_equal_numpy_merge_and_restore_sharded(identity_teacher_dir, tmp_path):
    """K = 4 -> k = 3 (weight_cluster, proportional): each student layer's FFN is the NumPy merge of the teacher's
    experts of the same global layer; the saved student restores onto a mesh with the same logits."""
    from flax import nnx

    from m2d_jax import checkpoint

    teacher = m2d_jax.from_pretrained(identity_teacher_dir)
    rng = np.random.default_rng(4)
    scores = rng.uniform(0.1, 1.0, size=(2, 4))
    plans = plan_conversion(teacher, np.tile([3, 1, 0, 2], (2, 1)), scores, 3, "weight_cluster", "proportional")
    student = build_dense_student(teacher, plans, 3)
    t = {tuple(k): np.asarray(v.get_value(), np.float64) for k, v in nnx.state(teacher, nnx.Param).flat_state()}
    s = {tuple(k): np.asarray(v.get_value(), np.float64) for k, v in nnx.state(student, nnx.Param).flat_state()}
    for layer, (stack, local) in ((0, (0, 0)), (2, (2, 0))):
        plan = plans[layer]
        assert sorted(e for g in plan.groups for e in g) == [0, 1, 2, 3] and len(plan.groups) == 3
        theta = np.concatenate([t[("stacks", stack, "moe", f"{p}_proj")][local].reshape(4, -1)
                                for p in ("gate", "up", "down")], axis=1)  # [E, f] flattened weights
        unit = theta / np.linalg.norm(theta, axis=1, keepdims=True)
        reference = _reference_labels(np.clip(1 - unit @ unit.T, 0, None), 3)
        assert {frozenset(g) for g in plan.groups} == _partition(reference)
        gate = np.concatenate([np.einsum("e,edm->dm", a, t[("stacks", stack, "moe", "gate_proj")][local])
                               for a in plan.alpha], axis=1)
        down = np.concatenate([c * np.einsum("e,emd->md", a, t[("stacks", stack, "moe", "down_proj")][local])
                               for a, c in zip(plan.alpha, plan.scales)], axis=0)
        np.testing.assert_allclose(s[("stacks", 0, "mlp", "gate_proj", "kernel")][layer], gate, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(s[("stacks", 0, "mlp", "down_proj", "kernel")][layer], down, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(plan.scales.sum(), 1.0)
    dense = s[("stacks", 0, "mlp", "up_proj", "kernel")][1]
    np.testing.assert_array_equal(dense[:, :96], t[("stacks", 1, "mlp", "up_proj", "kernel")][0])
    np.testing.assert_array_equal(dense[:, 96:], 0)

    out = checkpoint.save_model(student, tmp_path / "student", {"kind": "dense_student"})
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))

    def sharding(path, leaf):  # FFN width over "model", everything else replicated
        spec = {"gate_proj": (None, None, "model"), "up_proj": (None, None, "model"),
                "down_proj": (None, "model", None)}.get(path[-2], ()) if "mlp" in path else ()
        return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))

    restored = checkpoint.load_model(out, sharding=sharding)
    assert restored.stacks[0].mlp.down_proj.kernel.get_value().sharding.spec == jax.sharding.PartitionSpec(
        None, "model", None)
    ids, mask = padded_batch(student.config.vocab_size, 2, 10, 0)
    np.testing.assert_allclose(np.asarray(restored(ids, mask)), np.asarray(student(ids, mask)), atol=1e-5)


def test_forced_routing_subset_equals_pruned_student(tmp_path):
    """docs/METHOD.md §15 check 2 with E > k: a GPT-OSS teacher whose router (zero weights, bias log c on S) sends every
    token to the same k = 2 of E = 8 experts with weights c equals the student pruned to S with proportional DP scores
    c."""
    hf_config = dict(IDENTITY_TEACHERS["gpt_oss"][0], num_local_experts=8, num_experts_per_tok=2)
    teacher = m2d_jax.from_pretrained(make_hf_checkpoint(hf_config, tmp_path / "t", seed=2, init_std=0.1),
                                      moe_dispatch="dense")
    chosen, weights = np.array([5, 2]), np.array([0.7, 0.3])
    bias = np.full(8, -30.0)
    bias[chosen] = np.log(weights)
    for stack in teacher.stacks:
        stack.moe.router.set_value(jnp.zeros_like(stack.moe.router.get_value()))
        stack.moe.router_bias.set_value(jnp.broadcast_to(jnp.asarray(bias, jnp.float32),
                                                         stack.moe.router_bias.get_value().shape))
    num_layers = teacher.config.num_layers
    scores = np.random.default_rng(0).uniform(size=(num_layers, 8))
    scores[:, chosen] = weights
    plans = plan_conversion(teacher, np.tile(chosen, (num_layers, 1)), scores, 2, "output_cluster", "proportional")
    np.testing.assert_allclose(plans[0].scales, weights)
    student = build_dense_student(teacher, plans, 2)
    ids, mask = padded_batch(teacher.config.vocab_size, 2, 12, 1)
    np.testing.assert_allclose(np.asarray(student(ids, mask)), np.asarray(teacher(ids, mask)), atol=1e-5, rtol=0)


# ---- the conversion stage and its runner: selections, recipes, outputs --------------------------------------
@pytest.fixture(scope="module")
def identity_stats(identity_teacher_dir, tmp_path_factory):
    """Statistics of the identity teacher on random token windows, saved to a file."""
    from m2d_jax.calibration import calibrate, save_stats

    teacher = m2d_jax.from_pretrained(identity_teacher_dir)
    windows = np.random.default_rng(0).integers(0, teacher.config.vocab_size, size=(4, 16))
    stats = calibrate(teacher, windows, gram_tokens=32, batch_size=4, gram_chunk=16)
    return save_stats(stats, tmp_path_factory.mktemp("stats") / "stats.npz")


def _param_arrays(model):
    from flax import nnx

    return {tuple(k): np.asarray(v.get_value()) for k, v in nnx.state(model, nnx.Param).flat_state()}


def test_selection_file_drives_conversion(identity_teacher_dir, identity_stats, tmp_path, capsys):
    """m2d score --out writes the Selection; m2d convert --selection consumes it: the same student as selecting in
    the convert command, and as the in-memory stage convert(teacher, stats, selection, recipe)."""
    from m2d_jax import checkpoint
    from m2d_jax.calibration import load_stats
    from m2d_jax.cli import main
    from m2d_jax.convert import ConversionRecipe, convert
    from m2d_jax.scoring import load_selection

    selection_file = tmp_path / "selection.json"
    assert main(["score", "--stats", str(identity_stats), "--scoring", "gld_reap", "--experts", "4",
                 "--out", str(selection_file)]) == 0
    assert f"wrote {selection_file}" in capsys.readouterr().out
    base = ["convert", "--model", str(identity_teacher_dir), "--stats", str(identity_stats), "--groups", "3",
            "--grouping", "weight_cluster"]
    assert main(base + ["--selection", str(selection_file), "--out", str(tmp_path / "a")]) == 0
    assert main(base + ["--scoring", "gld_reap", "--experts", "4", "--out", str(tmp_path / "b")]) == 0
    a, b = checkpoint.load_model(tmp_path / "a"), checkpoint.load_model(tmp_path / "b")
    stats, selection = load_stats(identity_stats), load_selection(selection_file)
    teacher = m2d_jax.from_pretrained(identity_teacher_dir)
    in_memory = convert(teacher, stats, selection, ConversionRecipe(3, "weight_cluster"))
    want = _param_arrays(in_memory)
    for model in (a, b):
        got = _param_arrays(model)
        assert got.keys() == want.keys()
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=str(key))
    meta = checkpoint.load_metadata(tmp_path / "a")
    assert meta["selection"] == selection.to_dict() and meta["stats_sha256"] == stats.digest()
    # the library validates what the CLI passes through
    capsys.readouterr()
    truncated = tmp_path / "truncated.json"
    truncated.write_bytes(selection_file.read_bytes()[:100])
    for extra, message in ((["--selection", str(selection_file), "--scoring", "reap"], "not both"),
                           ([], "--experts"), (["--selection", str(tmp_path / "none.json")], "not found"),
                           (["--selection", str(truncated)], f"{truncated}: not a selection file")):
        assert main(base + extra + ["--out", str(tmp_path / "c")]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert main(["convert", "--model", str(identity_teacher_dir), "--experts", "4", "--groups", "3", "--out",
                 str(tmp_path / "c")]) == 2
    assert "--stats" in capsys.readouterr().err and not (tmp_path / "c").exists()


def test_selection_from_other_statistics_is_rejected(identity_teacher_dir, identity_stats):
    from m2d_jax.calibration import CalibrationStats, load_stats
    from m2d_jax.convert import ConversionRecipe, convert
    from m2d_jax.errors import SelectionError
    from m2d_jax.scoring import select_experts

    stats = load_stats(identity_stats)
    other = CalibrationStats(stats.sums._replace(tokens=stats.sums.tokens * 2), stats.metadata)
    teacher = m2d_jax.from_pretrained(identity_teacher_dir)
    with pytest.raises(SelectionError, match="made from other statistics"):
        convert(teacher, stats, select_experts(other, "reap", 4), ConversionRecipe(4))
    with pytest.raises(ValueError, match="unknown grouping 'nope'"):
        ConversionRecipe(2, "nope")
    with pytest.raises(ValueError, match="groups=0"):
        ConversionRecipe(0)


@pytest.mark.parametrize("random_ffn", [False, True], ids=["convert", "random_ffn"])
def test_outputs_are_checked_first_and_written_all_or_nothing(identity_teacher_dir, identity_stats, tmp_path,
                                                              capsys, monkeypatch, random_ffn):
    """--out A --hf-out B where B cannot be written: a one-line error before any work, A is not left behind, and
    the rerun with a good B succeeds. A writer failing after A was written also leaves nothing."""
    from m2d_jax import checkpoint
    from m2d_jax.cli import main
    from m2d_jax.errors import OutputError
    from m2d_jax.hf import export
    from m2d_jax.pipeline import random_ffn_checkpoint

    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    out = tmp_path / "student"
    base = ["convert", "--model", str(identity_teacher_dir), "--groups", "4", "--out", str(out)]
    base += ["--random-ffn"] if random_ffn else ["--stats", str(identity_stats), "--experts", "4"]
    assert main(base + ["--hf-out", str(blocker / "hf")]) == 2
    assert f"{blocker} is not a directory" in capsys.readouterr().err
    assert not out.exists()
    assert main(base + ["--hf-out", str(out)]) == 2
    assert "overlap" in capsys.readouterr().err

    def broken_export(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(export, "export_model", broken_export)
    with pytest.raises(RuntimeError, match="disk full"):
        main(base + ["--hf-out", str(tmp_path / "hf")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]  # nothing staged, nothing renamed
    monkeypatch.undo()
    assert main(base + ["--hf-out", str(tmp_path / "hf")]) == 0
    assert checkpoint.is_m2d_checkpoint(out) and (tmp_path / "hf" / "config.json").exists()
    with pytest.raises(OutputError, match="overlap"):
        random_ffn_checkpoint(identity_teacher_dir, 4, tmp_path / "x", tmp_path / "x" / "hf")


@pytest.mark.parametrize("num_selected,k", [(7, 3), (5, 2), (9, 4), (4, 3)])
def test_k_need_not_divide_num_selected(num_selected, k):
    """K not a multiple of k is allowed: round-robin groups differ in size by at most one (rank r -> group r mod
    k), the clustering groupings give any sizes >= 1."""
    rng = np.random.default_rng(num_selected * 10 + k)
    selected = rng.permutation(12)[:num_selected]
    labels = grouping.group_labels("round_robin", selected, k)
    sizes = np.bincount(labels, minlength=k)
    assert sizes.max() - sizes.min() <= 1 and sizes.sum() == num_selected
    np.testing.assert_array_equal(labels, np.arange(num_selected) % k)
    features = rng.normal(size=(12, 10))
    for method, kwargs in (("weight_cluster", {"weight_gram": features @ features.T}),
                           ("output_cluster", {"mean_output": features})):
        sizes = np.bincount(grouping.group_labels(method, selected, k, **kwargs), minlength=k)
        assert sizes.min() >= 1 and sizes.sum() == num_selected


def test_round_robin_with_uneven_groups_builds_the_merged_student(identity_teacher_dir):
    """K = 4 -> k = 3 round robin: groups {o0, o3}, {o1}, {o2}; the student's FFN of every MoE layer is
    sum_g c_g f~_g (uniform c_g = 1/3) with f~_g the score-weighted merge of its group."""
    teacher = m2d_jax.from_pretrained(identity_teacher_dir)
    order = [2, 0, 3, 1]
    scores = np.array([[0.4, 0.3, 0.2, 0.1]] * 2)
    plans = plan_conversion(teacher, np.tile(order, (2, 1)), scores, 3, "round_robin", "uniform")
    for plan in plans.values():
        assert sorted(map(sorted, plan.groups)) == sorted([sorted([2, 1]), [0], [3]])
        np.testing.assert_allclose(plan.scales, np.full(3, 1 / 3))
        merged = [g for g in plan.groups if len(g) == 2][0]
        row = plan.alpha[list(plan.groups).index(merged)]
        np.testing.assert_allclose(row[[2, 1]], scores[0, [2, 1]] / scores[0, [2, 1]].sum())
    student = build_dense_student(teacher, plans, 3)
    t, s = _param_arrays(teacher), _param_arrays(student)
    for layer, stack in ((0, 0), (2, 2)):
        plan = plans[layer]
        down = np.concatenate([c * np.einsum("e,emd->md", a, t[("stacks", stack, "moe", "down_proj")][0])
                               for a, c in zip(plan.alpha, plan.scales)], axis=0)
        np.testing.assert_allclose(s[("stacks", 0, "mlp", "down_proj", "kernel")][layer], down, rtol=1e-6, atol=1e-7)
