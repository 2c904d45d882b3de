"""Grouping (docs/METHOD.md §5): partition the K selected experts of one layer into exactly k non-empty groups.

Every method returns ``labels`` [K] with values in 0..k-1, one per selected expert in selection order
(``selected[r]`` is the r-th best expert), and every label used at least once. With K = k every method gives
singletons. These are small combinatorial problems (K <= E <= a few hundred) solved on the host in float64.

- ``round_robin``: o_r -> group r mod k.
- ``weight_cluster``: average-linkage clustering on 1 - cosine of the experts' flattened weights (from their Gram).
- ``router_cluster``: average-linkage clustering on 1 - cosine of router-logit profiles (Z_ij / sqrt(Z_ii Z_jj)).
- ``dominant_expert``: anchors o_0..o_{k-1}; every other expert joins its most router-similar anchor.
- ``output_cluster``: average-linkage clustering of the experts' mean outputs, Euclidean distance.
"""

from __future__ import annotations

import numpy as np

GROUPINGS = ("round_robin", "weight_cluster", "router_cluster", "dominant_expert", "output_cluster")


def check_group_count(num_selected: int, k: int) -> None:
    if not 1 <= k <= num_selected:
        raise ValueError(f"cannot split {num_selected} selected experts into k={k} non-empty groups "
                         f"(need 1 <= k <= K)")


def average_linkage(distances: np.ndarray, num_clusters: int) -> np.ndarray:
    """Agglomerative average-linkage (UPGMA) clustering cut at ``num_clusters`` clusters.

    distances: [n, n] symmetric, zero diagonal. Repeatedly merges the two clusters with the smallest mean pairwise
    distance (Lance-Williams update d(i+j, h) = (n_i d(i,h) + n_j d(j,h)) / (n_i + n_j)), as
    ``scipy.cluster.hierarchy.linkage(method="average")`` does, and stops at ``num_clusters``. Returns labels [n]
    numbered by first appearance (the cluster of point 0 is 0).
    """
    n = distances.shape[0]
    check_group_count(n, num_clusters)
    dist = np.array(distances, np.float64)  # [n, n] between current clusters
    np.fill_diagonal(dist, np.inf)
    size = np.ones(n, np.int64)
    alive = np.ones(n, bool)
    owner = np.arange(n)  # point -> current cluster id (the id of a merged cluster is the smaller index)
    for _ in range(n - num_clusters):
        masked = np.where(alive[:, None] & alive[None, :], dist, np.inf)
        i, j = np.unravel_index(np.argmin(masked), masked.shape)
        i, j = min(i, j), max(i, j)
        merged = (size[i] * dist[i] + size[j] * dist[j]) / (size[i] + size[j])  # [n]
        dist[i, :], dist[:, i] = merged, merged
        dist[i, i] = np.inf
        size[i] += size[j]
        alive[j] = False
        owner[owner == j] = i
    _, labels = np.unique(owner, return_inverse=True)
    first = {}
    for label in labels:
        first.setdefault(int(label), len(first))
    return np.array([first[int(label)] for label in labels], np.int64)


def cosine_similarity(moment: np.ndarray) -> np.ndarray:
    """M_ij / sqrt(M_ii M_jj) for a second-moment (Gram) matrix [n, n]: the cosine between the underlying vectors
    (router-logit profiles for Z, flattened weights for a weight Gram). A zero vector has cosine 0 with all."""
    m = np.asarray(moment, np.float64)
    norms = np.sqrt(np.clip(np.diag(m), 0.0, None))
    inv = np.where(norms > 0, 1.0 / np.where(norms > 0, norms, 1.0), 0.0)
    return m * inv[:, None] * inv[None, :]


def cosine_distances(moment: np.ndarray) -> np.ndarray:
    """1 - cosine from a Gram matrix [n, n], clipped to [0, 2], zero diagonal."""
    dist = np.clip(1.0 - cosine_similarity(moment), 0.0, 2.0)
    np.fill_diagonal(dist, 0.0)
    return dist


def euclidean_distances(features: np.ndarray) -> np.ndarray:
    f = np.asarray(features, np.float64)
    sq = np.sum(f * f, axis=1)
    dist = np.sqrt(np.clip(sq[:, None] + sq[None, :] - 2.0 * f @ f.T, 0.0, None))
    np.fill_diagonal(dist, 0.0)
    return dist


def round_robin(num_selected: int, k: int) -> np.ndarray:
    check_group_count(num_selected, k)
    return np.arange(num_selected) % k


def weight_cluster(weight_gram_selected: np.ndarray, k: int) -> np.ndarray:
    """weight_gram_selected: [K, K] inner products <theta_i, theta_j> of the selected experts' flattened weights
    theta_e = (vec gate_e, vec up_e, vec down_e (+ biases))."""
    return average_linkage(cosine_distances(weight_gram_selected), k)


def router_cluster(router_moment_selected: np.ndarray, k: int) -> np.ndarray:
    """router_moment_selected: [K, K] block of the router-logit second moment Z for the selected experts."""
    return average_linkage(cosine_distances(router_moment_selected), k)


def dominant_expert(router_moment_selected: np.ndarray, k: int) -> np.ndarray:
    """Anchors are the first k selected experts; each other expert joins argmax_anchor cos(Z) (first on ties)."""
    num_selected = router_moment_selected.shape[0]
    check_group_count(num_selected, k)
    similarity = cosine_similarity(router_moment_selected)  # [K, K]
    labels = np.arange(num_selected)
    labels[k:] = np.argmax(similarity[k:, :k], axis=1)
    return labels


def output_cluster(mean_output_selected: np.ndarray, k: int) -> np.ndarray:
    """mean_output_selected: [K, d] mean output of each selected expert over the calibration subsample."""
    return average_linkage(euclidean_distances(mean_output_selected), k)


def group_labels(method: str, selected: np.ndarray, k: int, *, weight_gram=None, router_moment=None,
                 mean_output=None) -> np.ndarray:
    """Labels [K] for the selected experts (global ids ``selected`` [K], best first) of one layer.

    ``weight_gram`` [E, E] (inner products of flattened expert weights), ``router_moment`` [E, E] and
    ``mean_output`` [E, d]: only the inputs the method uses are needed, and only their rows / columns of the
    selected experts are read. K = k gives singletons for every method.
    """
    if method not in GROUPINGS:
        raise ValueError(f"unknown grouping {method!r} (expected one of {', '.join(GROUPINGS)})")
    selected = np.asarray(selected)
    check_group_count(len(selected), k)
    if len(selected) == k:
        return np.arange(k)

    def need(name, value):
        if value is None:
            raise ValueError(f"grouping {method!r} needs {name} (missing from the calibration statistics)")
        return np.asarray(value)

    if method == "round_robin":
        return round_robin(len(selected), k)
    if method == "weight_cluster":
        return weight_cluster(need("weight_gram", weight_gram)[np.ix_(selected, selected)], k)
    if method == "router_cluster":
        return router_cluster(need("router_logit_moment", router_moment)[np.ix_(selected, selected)], k)
    if method == "dominant_expert":
        return dominant_expert(need("router_logit_moment", router_moment)[np.ix_(selected, selected)], k)
    return output_cluster(need("mean_output", mean_output)[selected], k)
