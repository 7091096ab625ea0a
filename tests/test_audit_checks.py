"""The audit's checks against independent oracles: per-sample loops, scipy's connected
components, brute-force k-NN, sklearn's k-NN graph, a Monte Carlo simulation."""

import numpy as np
import pytest
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from audit_fixtures import brute_force_knn, clustered_features
from nnsim_hooks.audit import Thresholds, analyse
from nnsim_hooks.audit.checks import denoising, label_issues, near_duplicates, rare_samples
from nnsim_hooks.errors import InputError
from nnsim_hooks.index import GradientIndex


def random_neighbours(n=60, k=6, classes=4, seed=0):
    rng = np.random.default_rng(seed)
    ids = np.stack([rng.choice(np.delete(np.arange(n), i), k, replace=False) for i in range(n)])
    sims = -np.sort(-rng.uniform(-0.5, 1.0, size=(n, k)), axis=1)
    ids[3, 4:] = -1  # missing neighbours
    sims[3, 4:] = np.nan
    labels = rng.integers(0, classes, n)
    labels[[5, 7, 11]] = -1  # missing labels
    return ids, sims, labels


def test_label_vote_matches_a_loop():
    ids, sims, labels = random_neighbours()
    c = 4
    vote = label_issues.neighbor_label_vote(ids, sims, labels, c, threshold=0.5)
    for i in range(len(labels)):
        mass = np.zeros(c)
        for j, s in zip(ids[i], sims[i]):
            if j >= 0 and np.isfinite(s) and labels[j] >= 0 and s > 0:
                mass[labels[j]] += s
        if mass.sum() == 0:
            assert np.isnan(vote.score[i]) and vote.suggested[i] == -1 and not vote.flagged[i]
            continue
        share = mass / mass.sum()
        np.testing.assert_allclose(vote.votes[i], share, atol=1e-12)
        assert vote.suggested[i] == np.argmax(share)
        if labels[i] < 0:
            assert np.isnan(vote.score[i]) and not vote.flagged[i]
        else:
            assert vote.score[i] == pytest.approx(1 - share[labels[i]])
            assert vote.flagged[i] == (1 - share[labels[i]] >= 0.5 and np.argmax(share) != labels[i])


def test_unlabelled_neighbours_and_negative_similarities_do_not_vote():
    ids = np.array([[1, 2, 3]])
    sims = np.array([[0.9, 0.8, -0.7]])
    labels = np.array([0, -1, 1, 0])
    vote = label_issues.neighbor_label_vote(np.vstack([ids, [[0, 2, 3]], [[0, 1, 3]], [[0, 1, 2]]]),
                                      np.vstack([sims, sims, sims, sims]), labels, 2)
    # sample 0: neighbour 1 has no label, neighbour 3 is opposed: only neighbour 2 (label 1) votes
    np.testing.assert_allclose(vote.votes[0], [0.0, 1.0])
    assert vote.flagged[0] and vote.suggested[0] == 1


def test_duplicate_groups_are_connected_components_of_the_thresholded_graph():
    rng = np.random.default_rng(1)
    n, k, t = 80, 4, 0.9
    ids = np.stack([rng.choice(np.delete(np.arange(n), i), k, replace=False) for i in range(n)])
    sims = -np.sort(-rng.uniform(0.5, 1.0, size=(n, k)), axis=1)
    groups = near_duplicates.duplicate_groups(ids, sims, t)
    rows, cols = np.nonzero(sims >= t)
    graph = coo_matrix((np.ones(len(rows)), (rows, ids[rows, cols])), shape=(n, n))
    _, comp = connected_components(graph, directed=False)
    sizes = np.bincount(comp)
    for i in range(n):
        for j in range(n):
            same_oracle = comp[i] == comp[j] and sizes[comp[i]] > 1
            same_ours = groups[i] >= 0 and groups[i] == groups[j]
            assert same_oracle == same_ours, (i, j)
    assert (groups[sizes[comp] == 1] == -1).all()
    # numbered by decreasing size
    counts = [int((groups == g).sum()) for g in range(groups.max() + 1)]
    assert counts == sorted(counts, reverse=True)


def test_representative_is_the_preferred_member():
    groups = np.array([0, 0, 0, -1, 1, 1])
    pref = np.array([0.5, 0.1, 0.1, 0.0, np.nan, 0.2])
    keep = near_duplicates.group_representatives(groups, pref)
    assert keep.tolist() == [False, True, False, False, False, True]


def test_knn_similarity_and_outlier_threshold():
    ids = np.array([[1, 2], [0, -1], [-1, -1]])
    sims = np.array([[0.8, 0.6], [0.8, np.nan], [np.nan, np.nan]])
    np.testing.assert_allclose(rare_samples.knn_similarity(ids, sims), [0.7, 0.8, np.nan])
    v = np.array([1.0, 1.1, 0.9, 1.0, 1.05, 0.95, 0.2, np.nan])
    med = np.median(v[:7])
    mad = np.median(np.abs(v[:7] - med))
    thr = rare_samples.outlier_threshold(v, 3.0, None)
    assert thr == pytest.approx(med - 3.0 * 1.4826 * mad)
    assert rare_samples.flag_below(v, thr).tolist() == [False] * 6 + [True, False]
    assert rare_samples.outlier_threshold(v, 3.0, 0.5) == pytest.approx(np.quantile(v[:7], 0.5))
    # concentrated values: the minimum gap keeps tiny differences from being outliers
    tight = np.array([0.994, 0.9941, 0.9939, 0.994, 0.986, 0.9861])
    assert rare_samples.outlier_threshold(tight, 3.0, None, min_gap=0.02) == pytest.approx(np.median(tight) - 0.02)
    assert not rare_samples.flag_below(tight, rare_samples.outlier_threshold(tight, 3.0, None, min_gap=0.02)).any()


def test_averaging_error_probability_against_simulation():
    """Majority of N noisy labels (ties count half) vs the normal approximation."""
    rng = np.random.default_rng(0)
    for c, p, n in [(3, 0.5, 40), (2, 0.4, 30), (10, 0.7, 50)]:
        trials = 20000
        wrong = rng.random((trials, n)) < p
        labels = np.where(wrong, rng.integers(1, c, (trials, n)), 0)
        counts = np.stack([(labels == k).sum(1) for k in range(c)], 1)
        best_other = counts[:, 1:].max(1)
        simulated = float((best_other > counts[:, 0]).mean() + 0.5 * (best_other == counts[:, 0]).mean())
        predicted = float(denoising.averaging_error_probability(np.array([n]), p, c)[0])
        assert simulated > 0.01
        assert predicted == pytest.approx(simulated, abs=0.015), (c, p, n)
    # limits: no noise, many neighbours, noise that wins
    assert denoising.averaging_error_probability(np.array([5.0]), 0.0, c)[0] == 0.0
    assert denoising.averaging_error_probability(np.array([1e6]), 0.3, c)[0] < 1e-9
    assert denoising.averaging_error_probability(np.array([5.0]), 0.95, c)[0] == 1.0
    assert (np.diff(denoising.averaging_error_probability(np.array([1.0, 2, 5, 20, 100]), 0.3, c)) <= 0).all()


def test_thresholds_are_validated():
    with pytest.raises(InputError, match="label_issue"):
        Thresholds(label_issue=1.5)
    with pytest.raises(InputError, match="unknown threshold"):
        Thresholds.make({"duplicates": 0.9})
    assert Thresholds.make({"duplicate": 0.9}).duplicate == 0.9
    with pytest.raises(InputError, match="outlier_z must be positive"):
        Thresholds(outlier_z=0)
    with pytest.raises(InputError, match=r"outlier_min_gap must lie in \[0, 2\]"):
        Thresholds(outlier_min_gap=3)
    with pytest.raises(InputError, match="label_issue needs a number"):
        Thresholds(label_issue=None)  # only optional thresholds may be None
    with pytest.raises(InputError, match="duplicate must be a number, got '0.9'"):
        Thresholds(duplicate="0.9")
    assert Thresholds(duplicate_quantile=None) == Thresholds()
    with pytest.raises(AttributeError, match="immutable"):
        Thresholds().duplicate = 0.5


def test_analyse_table_matches_brute_force_neighbours():
    feats, labels = clustered_features(n_per_class=20, classes=3)
    idx = GradientIndex.from_features(feats, labels=labels, predictions=labels)
    result = analyse(idx, k=5)
    sims, ids = brute_force_knn(feats, 5)
    got_ids, got_sims = result.neighbor_arrays()
    np.testing.assert_allclose(got_sims, sims, atol=1e-5)
    # ids may differ only where similarities tie
    assert (got_ids == ids).mean() > 0.99
    assert list(result.table.index) == list(range(len(labels)))
    np.testing.assert_allclose(result.table["density"], (feats.astype(np.float64) @ feats.T.astype(np.float64)).sum(1),
                               rtol=1e-4)


def test_knn_graph_is_what_cleanlab_builds_from_the_same_features():
    from sklearn.neighbors import NearestNeighbors

    feats, labels = clustered_features(n_per_class=15, classes=3, seed=3)
    feats[7] = feats[3]  # an exact duplicate: explicit zero distance
    result = analyse(GradientIndex.from_features(feats, labels=labels, predictions=labels), k=4)
    graph = result.knn_graph()
    n = len(labels)
    assert graph.shape == (n, n) and graph.nnz == 4 * n
    assert (graph.diagonal() == 0).all()
    data = graph.data.reshape(n, 4)
    assert (np.diff(data, axis=1) >= 0).all()
    oracle = NearestNeighbors(n_neighbors=4, metric="cosine").fit(feats.astype(np.float64))
    dist, _ = oracle.kneighbors()
    np.testing.assert_allclose(data, dist, atol=1e-5)
    row3 = graph.indices[graph.indptr[3]:graph.indptr[4]]
    assert 7 in row3 and graph.data[graph.indptr[3]:graph.indptr[4]][list(row3).index(7)] == pytest.approx(0, abs=1e-6)


def test_knn_graph_equals_cleanlabs_own_and_feeds_its_checks():
    """cleanlab's own k-NN graph builder (what Datalab makes from features) gives the
    same matrix, and cleanlab's graph-based check returns the same values on both."""
    pytest.importorskip("cleanlab")
    from cleanlab.data_valuation import data_shapley_knn
    from cleanlab.internal.neighbor.knn_graph import create_knn_graph_and_index

    feats, labels = clustered_features(n_per_class=15, classes=3, seed=4)
    result = analyse(GradientIndex.from_features(feats, labels=labels, predictions=labels), k=5)
    ours = result.knn_graph()
    theirs, _ = create_knn_graph_and_index(feats.astype(np.float64), n_neighbors=5, metric="cosine")
    assert ours.shape == theirs.shape and ours.nnz == theirs.nnz
    np.testing.assert_array_equal(ours.indptr, theirs.indptr)
    np.testing.assert_allclose(ours.data, theirs.data, atol=1e-5)
    assert (ours.indices == theirs.indices).mean() > 0.99  # ties may swap
    np.testing.assert_allclose(data_shapley_knn(labels, knn_graph=ours, k=5),
                               data_shapley_knn(labels, knn_graph=theirs, k=5), atol=1e-6)


def test_knn_graph_fills_rows_without_neighbours():
    feats, labels = clustered_features(n_per_class=6, classes=2, seed=5)
    feats[4] = np.nan  # no gradient direction
    result = analyse(GradientIndex.from_features(feats, labels=labels, predictions=labels), k=3)
    graph = result.knn_graph()
    assert graph.nnz == 3 * len(labels)
    row = graph.data[graph.indptr[4]:graph.indptr[5]]
    assert (row == 2.0).all()
    assert 4 not in graph.indices[graph.indptr[4]:graph.indptr[5]]


def test_duplicate_threshold_is_absolute_or_a_quantile_of_the_nearest_similarities():
    top1 = np.array([0.1, 0.5, np.nan, 0.9, 0.7])
    assert near_duplicates.duplicate_threshold(top1, 0.95, None) == 0.95
    assert near_duplicates.duplicate_threshold(top1, 0.95, 0.5) == pytest.approx(np.quantile([0.1, 0.5, 0.9, 0.7], 0.5))
    assert near_duplicates.duplicate_threshold(np.full(3, np.nan), 0.95, 0.5) == 0.95  # nothing to take a quantile of
