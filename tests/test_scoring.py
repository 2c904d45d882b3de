"""The 7 scorings and ``select_experts`` against plain NumPy float64 references written from SPEC §3 / §4."""

import numpy as np
import pytest

from m2d_jax.calibration import CalibrationStats, StatSums, StatsError, config_hash
from m2d_jax.models import AttentionSpec, ExpertsSpec, FFNSpec, ModelConfig, MoESpec, RouterSpec
from m2d_jax.scoring import SCORINGS, run_selection, score, select_experts

LAYERS, EXPERTS, HIDDEN, TOP_K = 3, 10, 6, 2


def tiny_config(top_k=TOP_K, norm_topk_prob=True):
    return ModelConfig(
        family="qwen3_moe", vocab_size=64, hidden_size=HIDDEN, num_layers=LAYERS, ffn_kinds=("moe",) * LAYERS,
        attention=AttentionSpec(num_heads=2, num_kv_heads=1, head_dim=4, layer_types=("full_attention",) * LAYERS),
        ffn=FFNSpec(intermediate_size=8),
        moe=MoESpec(RouterSpec(top_k=top_k, norm_topk_prob=norm_topk_prob),
                    ExpertsSpec(num_experts=EXPERTS, intermediate_size=4)))


def random_stats(seed=0) -> CalibrationStats:
    """Random but self-consistent sums: counts <= T, sums of probabilities <= counts, a PSD Gram."""
    rng = np.random.default_rng(seed)
    l, e, d = LAYERS, EXPERTS, HIDDEN
    tokens = np.full(l, 500.0)
    count = rng.integers(0, 200, size=(l, e)).astype(float)
    count[0, 3] = 0.0  # a never-selected expert
    sel_prob = count * rng.uniform(0.05, 0.9, size=(l, e))
    feats = rng.normal(size=(l, e, 4 * d))
    gram_tokens = np.full(l, 64.0)
    sums = StatSums(
        tokens=tokens, selected_count=count, sum_preselect_prob=sel_prob + rng.uniform(0, 30, size=(l, e)),
        sum_applied_weight=count * rng.uniform(0.1, 1.0, size=(l, e)), sum_selected_prob=sel_prob,
        sum_selected_prob_norm=sel_prob * rng.uniform(0.5, 4, size=(l, e)),
        sum_selected_weight_norm=count * rng.uniform(0.1, 3, size=(l, e)),
        sum_selected_norm=count * rng.uniform(0.5, 4, size=(l, e)),
        router_logit_moment=rng.normal(size=(l, e, e)), gram=feats @ feats.transpose(0, 2, 1),
        mean_output=rng.normal(size=(l, e, d)), sum_output_norm=gram_tokens[:, None] * rng.uniform(1, 3, (l, e)),
        gram_tokens=gram_tokens)
    meta = dict(config_hash=config_hash(tiny_config()), num_experts=e, top_k=TOP_K, moe_layers=list(range(l)),
                hidden_size=d, model_path="/nowhere")
    return CalibrationStats(sums, meta)


# ---- NumPy references (SPEC §3) ----------------------------------------------------------------------------
def ref_scores(s: StatSums, name, acp_form="reap"):
    t = s.tokens[:, None]
    n1 = np.maximum(s.selected_count, 1)
    cp = s.sum_selected_prob / n1
    if name == "selection_freq":
        return s.selected_count / t
    if name == "preselect_prob":
        return s.sum_preselect_prob / t
    if name == "postselect_prob":
        return s.sum_applied_weight / t
    if name == "conditional_prob":
        return cp
    assert name == "reap"
    return {"reap": s.sum_selected_prob_norm / n1, "reap_weight": s.sum_selected_weight_norm / n1,
            "factored_all": cp * s.sum_output_norm / s.gram_tokens[:, None],
            "factored_routed": cp * s.sum_selected_norm / n1}[acp_form]


def ref_kernel(gram, s, beta=0.5, ridge=1e-4):
    c = gram / np.sqrt(np.outer(np.diag(gram), np.diag(gram)))
    q = (np.maximum(s, 1e-8 * s.max()) / s[s > 0].mean()) ** beta
    k = np.outer(q, q) * c
    return k + ridge * np.mean(np.diag(k)) * np.eye(len(s))


def ref_greedy(kernel, k):
    picks = []
    for _ in range(k):
        cand = [j for j in range(len(kernel)) if j not in picks]
        vals = [np.linalg.slogdet(kernel[np.ix_(picks + [j], picks + [j])])[1] for j in cand]
        picks.append(cand[int(np.argmax(vals))])
    return picks


@pytest.mark.parametrize("name", ["selection_freq", "preselect_prob", "postselect_prob", "conditional_prob", "reap"])
def test_router_scorings_equal_numpy_reference(name):
    stats = random_stats()
    np.testing.assert_allclose(score(stats, name), ref_scores(stats.sums, name), rtol=1e-13, atol=0)
    assert score(stats, "conditional_prob")[0, 3] == 0.0  # never selected -> 0


@pytest.mark.parametrize("form", ["reap", "reap_weight", "factored_all", "factored_routed"])
def test_acp_forms_equal_numpy_reference(form):
    stats = random_stats(1)
    np.testing.assert_allclose(score(stats, "reap", acp_form=form), ref_scores(stats.sums, "reap", form), rtol=1e-13)


@pytest.mark.parametrize("name,base", [("gram_logdet", "conditional_prob"), ("gld_reap", "reap")])
def test_do_scorings_equal_numpy_greedy(name, base):
    stats = random_stats(2)
    importance = ref_scores(stats.sums, base)
    got = score(stats, name)
    for layer in range(LAYERS):
        order = ref_greedy(ref_kernel(stats.sums.gram[layer], importance[layer]), EXPERTS)
        np.testing.assert_array_equal(np.argsort(-got[layer], kind="stable"), order)
        np.testing.assert_array_equal(got[layer][order], -np.arange(EXPERTS))
    for k in (TOP_K, 5, EXPERTS):
        selected, weights = select_experts(stats, name, k)
        np.testing.assert_array_equal(selected, np.argsort(-got, axis=1, kind="stable")[:, :k])
        np.testing.assert_allclose(weights, importance, rtol=1e-13)  # SPEC Q5: merge weights = base importance


@pytest.mark.parametrize("name", SCORINGS)
def test_select_experts_nested_and_weights(name):
    stats = random_stats(3)
    big, weights = select_experts(stats, name, 8)
    small, _ = select_experts(stats, name, 4)
    np.testing.assert_array_equal(small, big[:, :4])
    if name not in ("gram_logdet", "gld_reap"):
        np.testing.assert_allclose(weights, ref_scores(stats.sums, name), rtol=1e-13)
        for layer in range(LAYERS):  # top-K by score
            assert weights[layer, big[layer]].min() >= np.delete(weights[layer], big[layer]).max()


def test_ties_broken_by_frequency_then_index():
    stats = random_stats(4)
    s = stats.sums
    count = s.selected_count.copy()
    count[0, :4] = [10, 30, 30, 20]
    sel_prob = s.sum_selected_prob.copy()
    sel_prob[0, :4] = 0.5 * count[0, :4]  # CP = 0.5 for experts 0..3
    sel_prob[0, 4:] = 0.1 * count[0, 4:]
    stats = CalibrationStats(s._replace(selected_count=count, sum_selected_prob=sel_prob), stats.metadata)
    selected, _ = select_experts(stats, "conditional_prob", 4)
    assert selected[0].tolist() == [1, 2, 3, 0]


def test_bad_inputs_raise_clear_errors():
    stats = random_stats()
    with pytest.raises(StatsError, match="K=11 .*E=10"):
        select_experts(stats, "reap", EXPERTS + 1)
    with pytest.raises(StatsError, match="top-k=2 <= K"):
        select_experts(stats, "gld_reap", 1)
    with pytest.raises(StatsError, match="different model"):
        select_experts(stats, "reap", 4, config=tiny_config(top_k=3))
    select_experts(stats, "reap", 4, config=tiny_config())  # the architecture the statistics were collected on
    gram = stats.sums.gram.copy()
    gram[1, 2, 2] = np.nan
    bad = CalibrationStats(stats.sums._replace(gram=gram), stats.metadata)
    with pytest.raises(StatsError, match="'gram' has 1 NaN/inf .*MoE layer 1"):
        select_experts(bad, "gld_reap", 4)
    with pytest.raises(ValueError, match="unknown scoring"):
        select_experts(stats, "random", 4)
    with pytest.raises(ValueError, match="acp_form"):
        select_experts(stats, "reap", 4, acp_form="nope")
    with pytest.raises(ValueError, match="takes no option"):
        select_experts(stats, "selection_freq", 4, beta=1.0)


def test_do_selection_reports_gains():
    stats = random_stats(5)
    result = run_selection(stats, "gld_reap", 6)
    assert result.gains.shape == (LAYERS, 6) and np.isfinite(result.gains).all()
    assert (np.diff(result.gains, axis=1) <= 1e-12).all()
    assert not result.filled.any()


def test_config_hash_covers_the_whole_architecture():
    """Every leaf field of the nested architecture, changed alone, changes the hash; a config rebuilt from its JSON
    has the same hash; no runtime field is part of the architecture."""
    import copy
    import dataclasses

    from m2d_jax.models import RuntimeConfig

    config = tiny_config()
    assert config_hash(config) == config_hash(ModelConfig.from_dict(config.to_dict()))

    def changed(value):
        if isinstance(value, bool):
            return not value
        if isinstance(value, (int, float)):
            return value + 1
        if isinstance(value, str):
            return value + "_x"
        if isinstance(value, tuple):
            return value + value[-1:] if value else (("x", 1),)
        assert value is None
        return 1

    def edited(spec, path, value):  # a copy with one leaf changed, bypassing validation (frozen dataclasses)
        new = copy.copy(spec)
        child = value if len(path) == 1 else edited(getattr(spec, path[0]), path[1:], value)
        object.__setattr__(new, path[0], child)
        return new

    def leaves(spec, prefix=()):
        for f in dataclasses.fields(spec):
            value = getattr(spec, f.name)
            if dataclasses.is_dataclass(value):
                yield from leaves(value, prefix + (f.name,))
            else:
                yield prefix + (f.name,), value

    paths = list(leaves(config))
    assert len(paths) >= 30
    for path, value in paths:
        assert config_hash(edited(config, path, changed(value))) != config_hash(config), ".".join(path)
    runtime_fields = {f.name for f in dataclasses.fields(RuntimeConfig)} - {"top_k"}  # router.top_k: as trained
    assert not runtime_fields & {p[-1] for p, _ in paths}
