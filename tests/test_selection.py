"""Greedy log-det selection (docs/METHOD.md §4, §15 check 6) against brute force: naive slogdet greedy, exhaustive
optimum."""

import itertools

import numpy as np
import pytest

from m2d_jax.scoring import greedy_logdet, importance_order, logdet_kernel


def random_gram(rng, layers, experts, dim, rank=None):
    """Gram matrices of random expert-output features [L, E, E] (rank <= ``rank`` if given)."""
    rank = rank or dim
    feats = rng.normal(size=(layers, experts, rank)) @ rng.normal(size=(layers, rank, dim))
    feats *= rng.uniform(0.2, 3.0, size=(layers, experts, 1))
    return feats @ np.swapaxes(feats, 1, 2)


def naive_greedy(kernel, k):
    """Greedy that recomputes slogdet of L_{S+j} for every candidate j (no incremental anything)."""
    picks, gains, current = [], [], 0.0
    for _ in range(k):
        best, best_val = None, -np.inf
        for j in range(kernel.shape[0]):
            if j in picks:
                continue
            sub = picks + [j]
            sign, val = np.linalg.slogdet(kernel[np.ix_(sub, sub)])
            assert sign > 0
            if val > best_val:
                best, best_val = j, val
        picks.append(best)
        gains.append(best_val - current)
        current = best_val
    return np.array(picks), np.array(gains)


def logdet(kernel, subset):
    return np.linalg.slogdet(kernel[np.ix_(subset, subset)])[1]


@pytest.mark.parametrize("experts,k,kernel_kind", [(12, 5, "cosine"), (40, 15, "cosine"), (24, 10, "raw")])
def test_incremental_greedy_equals_naive_slogdet_greedy(experts, k, kernel_kind):
    rng = np.random.default_rng(experts)
    gram = random_gram(rng, 3, experts, 2 * experts)
    importance = rng.uniform(0.01, 1.0, size=(3, experts))
    kernel = logdet_kernel(gram, importance, kernel=kernel_kind)
    result = greedy_logdet(kernel, k)
    for layer in range(3):
        picks, gains = naive_greedy(kernel[layer], k)
        np.testing.assert_array_equal(result.selected[layer], picks)
        np.testing.assert_allclose(result.gains[layer], gains, rtol=0, atol=1e-9)
        assert np.all(np.diff(result.gains[layer]) <= 1e-12)  # gains are non-increasing
        assert not result.filled[layer].any()


def test_greedy_vs_exhaustive_optimum(record_property):
    """E = 12, K = 5: greedy never beats the optimum, and on the monotone submodular form
    log det(I + (L - lam I)_S / lam) it is within the (1 - 1/e) guarantee. The gap is reported."""
    rng = np.random.default_rng(7)
    gram = random_gram(rng, 4, 12, 6)  # rank 6 < 12: diversity matters
    importance = rng.uniform(0.05, 1.0, size=(4, 12))
    ridge = 1e-2
    kernel = logdet_kernel(gram, importance, ridge=ridge)
    result = greedy_logdet(kernel, 5)
    gaps = []
    for layer in range(4):
        kern = kernel[layer]
        lam = ridge * np.mean(np.diag(kern) / (1 + ridge))  # lam = ridge * mean diag(diag(q) C diag(q))
        shifted = np.eye(12) + (kern - lam * np.eye(12)) / lam
        values = {s: logdet(kern, list(s)) for s in itertools.combinations(range(12), 5)}
        best = max(values.values())
        got = logdet(kern, list(result.selected[layer]))
        assert got <= best + 1e-9
        best_shifted = max(logdet(shifted, list(s)) for s in values)
        assert logdet(shifted, list(result.selected[layer])) >= (1 - 1 / np.e) * best_shifted
        gaps.append(float(best - got))
    record_property("logdet_gap_to_exhaustive_optimum", gaps)
    print("greedy log-det gap to the exhaustive optimum per layer (E=12, K=5):", np.round(gaps, 6))


def test_huge_ridge_gives_importance_top_k():
    rng = np.random.default_rng(1)
    gram = random_gram(rng, 2, 16, 8)
    importance = rng.uniform(0.1, 1.0, size=(2, 16))
    kernel = logdet_kernel(gram, importance, ridge=1e8)
    result = greedy_logdet(kernel, 10)
    np.testing.assert_array_equal(result.selected, importance_order(importance)[:, :10])


def test_duplicated_experts_at_most_one_selected():
    rng = np.random.default_rng(2)
    experts, dim = 10, 30
    feats = rng.normal(size=(experts, dim))
    feats[7] = feats[2]  # expert 7 duplicates expert 2; the other 9 outputs are linearly independent
    gram = (feats @ feats.T)[None]
    importance = np.ones((1, experts))
    importance[0, 2] = importance[0, 7] = 2.0  # the duplicates are the most important experts
    kernel = logdet_kernel(gram, importance)
    order = greedy_logdet(kernel, experts - 1).selected[0].tolist()  # selections are nested: prefixes are the Ks
    for k in range(1, experts):  # K <= rank of the other experts' outputs (9)
        assert len(set(order[:k]) & {2, 7}) == 1, (k, order)


def test_selections_are_nested_prefixes():
    rng = np.random.default_rng(3)
    kernel = logdet_kernel(random_gram(rng, 3, 32, 12), rng.uniform(0.1, 1, size=(3, 32)))
    full = greedy_logdet(kernel, 32).selected
    for k in (1, 8, 31):
        np.testing.assert_array_equal(greedy_logdet(kernel, k).selected, full[:, :k])
    assert all(sorted(row) == list(range(32)) for row in full.tolist())


def test_exact_ties_go_to_the_more_important_expert():
    kernel = np.eye(4)[None] * 2.0  # every candidate has the same residual at every step
    order = np.array([[2, 0, 3, 1]])
    np.testing.assert_array_equal(greedy_logdet(kernel, 4, fill_order=order).selected, order)
    np.testing.assert_array_equal(greedy_logdet(kernel, 4).selected, [[0, 1, 2, 3]])


def test_early_stop_fills_by_importance():
    """ridge 0 on a rank-3 Gram: three greedy picks, then the residual vanishes and importance order fills."""
    rng = np.random.default_rng(4)
    gram = random_gram(rng, 1, 8, 3)
    importance = rng.uniform(0.1, 1.0, size=(1, 8))
    order = importance_order(importance)
    result = greedy_logdet(logdet_kernel(gram, importance, ridge=0.0), 6, fill_order=order)
    assert result.filled[0].tolist() == [False] * 3 + [True] * 3
    assert np.isfinite(result.gains[0, :3]).all() and np.isneginf(result.gains[0, 3:]).all()
    rest = [e for e in order[0] if e not in result.selected[0, :3]]
    np.testing.assert_array_equal(result.selected[0, 3:], rest[:3])


def test_kernel_matches_spec_formula():
    rng = np.random.default_rng(5)
    gram = random_gram(rng, 2, 6, 4)
    gram[1, 3, :] = gram[1, :, 3] = 0.0  # a dead expert
    importance = rng.uniform(0, 1, size=(2, 6))
    importance[0, 1] = 0.0
    got = logdet_kernel(gram, importance, beta=0.5, ridge=1e-4)
    for layer in range(2):
        g, s = gram[layer], importance[layer]
        diag = np.diag(g)
        dead = diag <= 1e-12 * diag.max()
        c = g / np.sqrt(np.outer(np.where(dead, 1, diag), np.where(dead, 1, diag)))
        c[dead, :] = 0
        c[:, dead] = 0
        c[dead, dead] = 1
        q = (np.maximum(s, 1e-8 * s.max()) / s[s > 0].mean()) ** 0.5
        want = np.outer(q, q) * c
        want += 1e-4 * np.mean(np.diag(want)) * np.eye(6)
        np.testing.assert_allclose(got[layer], want, rtol=1e-12, atol=1e-15)


def test_bad_inputs():
    kernel = logdet_kernel(random_gram(np.random.default_rng(0), 1, 4, 4), np.ones((1, 4)))
    with pytest.raises(ValueError, match="K=5 experts out of E=4"):
        greedy_logdet(kernel, 5)
    with pytest.raises(ValueError, match="NaN or inf"):
        greedy_logdet(np.full((1, 4, 4), np.nan), 2)
    with pytest.raises(ValueError, match="kernel="):
        logdet_kernel(np.eye(4)[None], np.ones((1, 4)), kernel="rbf")


def test_cosine_diagonal_is_exactly_one_so_equal_importances_tie_exactly():
    """G_ii / sqrt(G_ii)^2 is 1 ulp off 1 for many G_ii: the kernel diagonal must not carry that rounding, or an
    exact tie (beta = 0, or equal importances) goes to whichever expert rounded up instead of the fill order."""
    rng = np.random.default_rng(11)
    gram = random_gram(rng, 4, 40, 80)
    for importance, beta in ((rng.uniform(0.1, 1.0, size=(4, 40)), 0.0), (np.full((4, 40), 0.3), 0.5)):
        kernel = logdet_kernel(gram, importance, beta=beta)
        diag = np.diagonal(kernel, axis1=1, axis2=2)
        np.testing.assert_array_equal(diag, np.broadcast_to(diag[:, :1], diag.shape))
        order = np.stack([rng.permutation(40) for _ in range(4)])
        np.testing.assert_array_equal(greedy_logdet(kernel, 1, fill_order=order).selected[:, 0], order[:, 0])
