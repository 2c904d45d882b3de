"""The 7 scorings and ``select_experts`` against plain NumPy float64 references (docs/METHOD.md); the Selection
artifact on disk."""

import json

import numpy as np
import pytest

from m2d_jax.calibration import CalibrationStats, StatSums, StatsError, config_hash
from m2d_jax.errors import SelectionError
from m2d_jax.models import AttentionSpec, ExpertsSpec, FFNSpec, ModelConfig, MoESpec, RouterSpec
from m2d_jax.scoring import SCORINGS, Selection, load_selection, save_selection, score, select_experts

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
        sum_output=rng.normal(size=(l, e, d)), sum_output_norm=gram_tokens[:, None] * rng.uniform(1, 3, (l, e)),
        gram_tokens=gram_tokens)
    meta = dict(config_hash=config_hash(tiny_config()), num_experts=e, top_k=TOP_K, moe_layers=list(range(l)),
                hidden_size=d, model_path="/nowhere")
    return CalibrationStats(sums, meta)


# ---- NumPy references (docs/METHOD.md §3) ----------------------------------------------------------------------------
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
        selection = select_experts(stats, name, k)
        selected, weights = selection.selected, selection.weight_scores
        np.testing.assert_array_equal(selected, np.argsort(-got, axis=1, kind="stable")[:, :k])
        np.testing.assert_allclose(weights, importance, rtol=1e-13)  # weights = base importance (docs/METHOD.md §3)


@pytest.mark.parametrize("name", SCORINGS)
def test_select_experts_nested_and_weights(name):
    stats = random_stats(3)
    result = select_experts(stats, name, 8)
    big, weights = result.selected, result.weight_scores
    np.testing.assert_array_equal(select_experts(stats, name, 4).selected, big[:, :4])
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
    assert select_experts(stats, "conditional_prob", 4).selected[0].tolist() == [1, 2, 3, 0]


def test_bad_inputs_raise_clear_errors():
    stats = random_stats()
    with pytest.raises(StatsError, match="K=11 .*E=10"):
        select_experts(stats, "reap", EXPERTS + 1)
    with pytest.raises(StatsError, match="top-k=2 <= K"):
        select_experts(stats, "gld_reap", 1)
    with pytest.raises(StatsError, match="different model"):
        stats.check_model(tiny_config(top_k=3))
    stats.check_model(tiny_config())  # the architecture the statistics were collected on
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
    result = select_experts(stats, "gld_reap", 6)
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


@pytest.mark.parametrize("name", ["gram_logdet", "gld_reap"])
def test_do_exact_ties_follow_importance_then_frequency_then_index(name):
    """beta = 0 (pure diversity): every kernel diagonal is exactly 1 + lam, so the first pick is the most important
    expert; a layer whose importances are all equal starts with its most frequently selected expert."""
    stats = random_stats(6)
    s = stats.sums
    importance = ref_scores(s, "conditional_prob" if name == "gram_logdet" else "reap")
    first = select_experts(stats, name, 4, beta=0.0).selected[:, 0]
    np.testing.assert_array_equal(first, np.argmax(importance, axis=1))
    # layer 1: all importances equal (CP = 0.5 for every expert), distinct selection counts
    count = s.selected_count.copy()
    count[1] = np.arange(EXPERTS) * 7.0 + 3.0
    count[1, [2, 8]] = 400.0  # the two most frequent tie on SF too: the lower index wins
    sel_prob, sel_prob_norm = s.sum_selected_prob.copy(), s.sum_selected_prob_norm.copy()
    sel_prob[1], sel_prob_norm[1] = 0.5 * count[1], 0.25 * count[1]
    stats = CalibrationStats(s._replace(selected_count=count, sum_selected_prob=sel_prob,
                                        sum_selected_prob_norm=sel_prob_norm), stats.metadata)
    assert select_experts(stats, name, 4).selected[1, 0] == 2


def _assert_same_selection(a: Selection, b: Selection):
    assert (a.scoring, a.options, a.moe_layers, a.stats_sha256, a.structure_hash) == \
        (b.scoring, b.options, b.moe_layers, b.stats_sha256, b.structure_hash)
    np.testing.assert_array_equal(a.selected, b.selected)
    np.testing.assert_array_equal(a.weight_scores, b.weight_scores)  # float64 through JSON (repr round trip)
    for x, y in ((a.gains, b.gains), (a.filled, b.filled)):
        assert (x is None) == (y is None)
        if x is not None:
            np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("name,options", [("gld_reap", {"ridge": 0.0}), ("reap", {"acp_form": "factored_all"})])
def test_selection_file_round_trip(tmp_path, name, options):
    stats = random_stats(7)
    selection = select_experts(stats, name, 9, **options)
    assert selection.num_selected == 9 and selection.num_experts == EXPERTS
    assert selection.structure_hash == config_hash(tiny_config()) and selection.stats_sha256 == stats.digest()
    assert selection.options == ({"acp_form": "reap", "beta": 0.5, "ridge": 0.0, "kernel": "cosine"}
                                 if name == "gld_reap" else {"acp_form": "factored_all"})
    if name == "gld_reap":  # a full-rank Gram: no early stop even with ridge 0
        assert not selection.filled.any() and np.isfinite(selection.gains).all()
    path = save_selection(selection, tmp_path / "selection.json")
    _assert_same_selection(load_selection(path), selection)
    record = json.loads(path.read_text())
    assert record["selected"] == {str(l): row for l, row in zip(range(LAYERS), selection.selected.tolist())}
    with pytest.raises(FileExistsError):
        save_selection(selection, path)
    selection.check_stats(stats)
    other = random_stats(8)
    with pytest.raises(SelectionError, match="made from other statistics"):
        selection.check_stats(other)
    with pytest.raises(SelectionError, match="different model"):
        selection.check_model(tiny_config(top_k=3))


def test_early_stopped_selection_keeps_filled_slots_through_json(tmp_path):
    stats = random_stats(9)
    feats = np.random.default_rng(0).normal(size=(LAYERS, EXPERTS, 2))  # rank-2 Gram: ridge 0 stops after 2
    stats = CalibrationStats(stats.sums._replace(gram=feats @ feats.transpose(0, 2, 1)), stats.metadata)
    selection = select_experts(stats, "gram_logdet", 5, ridge=0.0)
    assert selection.filled[:, 2:].all() and np.isneginf(selection.gains[:, 2:]).all()
    _assert_same_selection(load_selection(save_selection(selection, tmp_path / "s.json")), selection)


def test_bad_selection_files_are_one_line_errors(tmp_path):
    good = select_experts(random_stats(), "gld_reap", 4).to_dict()
    cases = {
        "empty": (b"", "not a selection file"),
        "truncated": (json.dumps(good).encode()[:200], "not a selection file"),
        "list": (b"[1, 2]", "not a selection record"),
        "format": (dict(good, format="m2d_jax.selection/0"), "field 'format'"),
        "scoring": (dict(good, scoring="magic"), "field 'scoring'"),
        "options": (dict(good, options={"beta": -1}), "field 'options': beta=-1"),
        "k": (dict(good, num_selected=3), "field 'selected': layer 0: expected 3 values"),
        "layers": (dict(good, moe_layers=[0, 1]), "field 'selected': expected one row per MoE layer"),
        "ids": (dict(good, selected={**good["selected"], "1": [0, 0, 1, 2]}), "layer 1: expert ids"),
        "range": (dict(good, selected={**good["selected"], "2": [0, 1, 2, 10]}), "field 'selected': layer 2"),
        "weights": (dict(good, weight_scores={**good["weight_scores"], "0": [1.0] * 3}), "field 'weight_scores'"),
        "gains": (dict(good, gains=None), "'gains' and 'filled' come together"),
        "hash": (dict(good, stats_sha256=None), "field 'stats_sha256'"),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / f"{name}.json"
        path.write_bytes(content if isinstance(content, bytes) else json.dumps(content).encode())
        with pytest.raises(SelectionError, match=message) as info:
            load_selection(path)
        assert str(path) in str(info.value) and "\n" not in str(info.value), name
    with pytest.raises(SelectionError, match="not found"):
        load_selection(tmp_path / "missing.json")
