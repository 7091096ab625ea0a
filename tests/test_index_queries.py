"""Every GradientIndex query against brute force over all pairs (float64 numpy)."""

import numpy as np
import pytest
import torch

from index_synthetic import clustered_rows, kernel, softmax, with_duplicates_and_holes
from nnsim_hooks.index import GradientIndex

N, D, C = 240, 24, 5


@pytest.fixture(scope="module")
def data():
    rows, valid, dups = with_duplicates_and_holes(clustered_rows(N, D, seed=0))
    rng = np.random.default_rng(2)
    probs = softmax(rng.standard_normal((N, C)) * 2)
    norms = rng.uniform(0.5, 3.0, N).astype(np.float32)
    labels = rng.integers(0, C, N)
    idx = GradientIndex.from_features(rows, labels=labels, probabilities=probs, norms=norms)
    return dict(rows=rows, valid=valid, dups=dups, probs=probs, norms=norms, labels=labels, idx=idx, K=kernel(rows, valid))


def brute_topk(K, q_rows, k, exclude=None):
    out_s, out_i = [], []
    for qi, row in enumerate(q_rows):
        s = K[row].copy()
        s[np.isnan(s)] = -np.inf
        if exclude is not None:
            s[exclude[qi]] = -np.inf
        order = np.argsort(-s, kind="stable")[:k]
        out_s.append(s[order])
        out_i.append(order)
    return np.array(out_s), np.array(out_i)


def assert_same_neighbours(K, q_rows, scores, ids, true_scores):
    """Scores match the brute-force top-k, and every returned id really has its score
    (robust to the order of exact ties)."""
    finite = np.isfinite(true_scores)
    np.testing.assert_allclose(scores[finite], true_scores[finite], atol=2e-6)
    assert np.all(ids[~finite] == -1) and np.all(np.isnan(scores[~finite]))
    for qi, row in enumerate(q_rows):
        got = ids[qi][ids[qi] >= 0]
        np.testing.assert_allclose(K[row, got], scores[qi][: len(got)], atol=2e-6)
        assert len(set(got.tolist())) == len(got)


def test_search_matches_brute_force(data):
    idx, K, rows = data["idx"], data["K"], data["rows"]
    q_rows = np.flatnonzero(data["valid"])[:50]
    scores, ids = idx.search(rows[q_rows], 7)
    assert scores.dtype == np.float32 and ids.dtype == np.int64 and scores.shape == (50, 7)
    true_s, _ = brute_topk(K, q_rows, 7)
    assert_same_neighbours(K, q_rows, scores, ids, true_s)
    assert not np.isin(ids, np.flatnonzero(~data["valid"])).any()


def test_search_accepts_torch_and_single_row(data):
    idx, rows = data["idx"], data["rows"]
    s1, i1 = idx.search(torch.from_numpy(rows[:4]), 3)
    s2, i2 = idx.search(rows[:4], 3)
    np.testing.assert_array_equal(i1, i2)
    s3, i3 = idx.search(rows[0], 3)
    np.testing.assert_array_equal(i3, i2[:1])


def test_exclude_by_id_keeps_exact_duplicates(data):
    idx, K, rows = data["idx"], data["K"], data["rows"]
    src, dst = np.array(data["dups"]).T
    scores, ids = idx.search(rows[src], 3, exclude=src)
    # the query itself is gone, its exact duplicate is the best neighbour with score 1
    assert not (ids == src[:, None]).any()
    np.testing.assert_array_equal(ids[:, 0], dst)
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-6)
    true_s, _ = brute_topk(K, src, 3, exclude=src[:, None])
    assert_same_neighbours(K, src, scores, ids, true_s)


def test_exclude_lists_of_several_ids(data):
    idx, K, rows = data["idx"], data["K"], data["rows"]
    q_rows = np.array([0, 1, 2])
    _, plain = idx.search(rows[q_rows], 6)
    exclude = [plain[0, :3].tolist(), [], {int(plain[2, 1])}]
    scores, ids = idx.search(rows[q_rows], 4, exclude=exclude)
    for qi, ex in enumerate(exclude):
        assert not np.isin(ids[qi], list(ex)).any()
    true_s, _ = brute_topk(K, q_rows, 4, exclude=[list(e) for e in exclude])
    assert_same_neighbours(K, q_rows, scores, ids, true_s)


def test_k_larger_than_index_pads(data):
    idx = data["idx"]
    n_valid = int(data["valid"].sum())
    with pytest.warns(RuntimeWarning, match=f"k={N + 5} is more than the {N} samples in the index; using k={N}"):
        scores, ids = idx.search(data["rows"][:2], N + 5)
    assert ids.shape == (2, N)  # clamped to the index size; the invalid rows' slots are padding
    assert (ids >= 0).sum(1).tolist() == [n_valid, n_valid]
    assert np.isnan(scores[:, n_valid:]).all() and (ids[:, n_valid:] == -1).all()


def test_undefined_queries_get_no_results(data):
    idx, rows = data["idx"], data["rows"]
    q = rows[[3, N - 1, 0]]  # NaN row, zero row, a valid row
    scores, ids = idx.search(q, 4)
    assert (ids[:2] == -1).all() and np.isnan(scores[:2]).all()
    assert (ids[2] >= 0).all()


@pytest.mark.parametrize("exclude_self", [True, False])
def test_neighbors_of_every_sample(data, exclude_self):
    idx, K = data["idx"], data["K"]
    scores, ids = idx.neighbors(5, exclude_self=exclude_self, batch_size=64, progress=False)
    valid_rows = np.flatnonzero(data["valid"])
    exclude = valid_rows[:, None] if exclude_self else None
    true_s, _ = brute_topk(K, valid_rows, 5, exclude=exclude)
    assert_same_neighbours(K, valid_rows, scores[valid_rows], ids[valid_rows], true_s)
    if exclude_self:
        assert not (ids == np.arange(N)[:, None]).any()
    assert (ids[~data["valid"]] == -1).all()


@pytest.mark.parametrize("include_self", [True, False])
def test_density(data, include_self):
    K = data["K"]
    expected = np.nansum(K, 1) - (0 if include_self else np.diag(np.nan_to_num(K)))
    expected[~data["valid"]] = np.nan
    got = data["idx"].density(include_self=include_self)
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-9)
    assert np.isnan(got[~data["valid"]]).all()


def _brute_counts(K, valid, t, include_self):
    counts = np.nansum(K > t, 1).astype(float)
    if not include_self:
        counts -= np.diag(K) > t
    counts[~valid] = np.nan
    return counts


def _near_threshold(K, t, tol=1e-5):
    return np.nansum(np.abs(K - t) < tol, 1)


@pytest.mark.parametrize("method", ["range_search", "exact"])
@pytest.mark.parametrize("include_self", [True, False])
@pytest.mark.parametrize("t", [-0.2, 0.0, 0.5, 0.9])
def test_neighbor_counts(data, method, include_self, t):
    K, valid = data["K"], data["valid"]
    got = data["idx"].neighbor_counts(t, include_self=include_self, method=method, progress=False)
    expected = _brute_counts(K, valid, t, include_self)
    # float32 products may flip pairs within rounding of the threshold; there are none here
    assert np.abs(got - expected)[valid].max() <= _near_threshold(K, t)[valid].max()
    assert np.isnan(got[~valid]).all()
    # duplicates (similarity exactly 1) are counted at t=0.9
    if t == 0.9:
        src, dst = np.array(data["dups"]).T
        assert (got[src] >= (2 if include_self else 1)).all()


@pytest.mark.parametrize("power", [1, 2, 3.5])
@pytest.mark.parametrize("include_self", [True, False])
def test_soft_counts(data, power, include_self):
    K = data["K"]
    terms = np.clip(np.nan_to_num(K, nan=0.0), 0, None) ** power
    if not include_self:
        np.fill_diagonal(terms, 0)
    expected = terms.sum(1)
    expected[~data["valid"]] = np.nan
    got = data["idx"].soft_counts(power, include_self=include_self, progress=False)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def _brute_neff(K, weights, include_self):
    kk = np.nan_to_num(K) * weights[:, None] * weights[None, :]
    if not include_self:
        np.fill_diagonal(kk, 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return kk.sum(1) ** 2 / (kk**2).sum(1)


@pytest.mark.parametrize("kernel_name", ["cosine", "raw"])
@pytest.mark.parametrize("include_self", [True, False])
def test_effective_neighbors_and_denoising(data, kernel_name, include_self):
    K, valid = data["K"], data["valid"]
    w = np.ones(N) if kernel_name == "cosine" else data["norms"].astype(np.float64)
    expected = _brute_neff(K, w, include_self)
    expected[~valid] = np.nan
    idx = data["idx"]
    got = idx.effective_neighbors(kernel_name, include_self=include_self)
    np.testing.assert_allclose(got, expected, rtol=1e-8, atol=1e-9)
    np.testing.assert_allclose(idx.denoising_factor(kernel_name, include_self=include_self), 1 / expected, rtol=1e-8)


def test_effective_neighbors_of_equal_rows_is_their_count():
    # N identical rows: each is averaged with all N, N_eff = N (PAPER §3)
    feats = np.repeat(np.full((1, 8), 8**-0.5, np.float32), 6, 0)
    idx = GradientIndex.from_features(feats)
    np.testing.assert_allclose(idx.effective_neighbors(), 6.0, rtol=1e-6)
    np.testing.assert_allclose(idx.effective_neighbors(include_self=False), 5.0, rtol=1e-6)
    # orthogonal extra rows are nobody's neighbours and change nothing for the others
    extra = np.eye(8, dtype=np.float32)[:2] - np.eye(8, dtype=np.float32)[[1, 0]]
    idx = GradientIndex.from_features(np.concatenate([feats, extra]), normalize=True)
    np.testing.assert_allclose(idx.effective_neighbors()[:6], 6.0, rtol=1e-6)


def _brute_consistency(K, weights, p, include_self):
    kk = np.nan_to_num(K) * weights[:, None] * weights[None, :]
    if not include_self:
        np.fill_diagonal(kk, 0)
    with np.errstate(invalid="ignore"):  # invalid rows: 0 / 0
        avg = kk @ p / kk.sum(1, keepdims=True)
    return np.linalg.norm(p - avg, axis=1), avg


@pytest.mark.parametrize("kernel_name", ["cosine", "raw"])
@pytest.mark.parametrize("include_self", [True, False])
def test_consistency_with_probabilities(data, kernel_name, include_self):
    K, valid = data["K"], data["valid"]
    w = np.ones(N) if kernel_name == "cosine" else data["norms"].astype(np.float64)
    expected, expected_avg = _brute_consistency(K, w, data["probs"].astype(np.float64), include_self)
    got, avg = data["idx"].consistency(kernel_name, include_self=include_self, return_average=True)
    np.testing.assert_allclose(got[valid], expected[valid], rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(avg[valid], expected_avg[valid], rtol=1e-7, atol=1e-9)
    assert np.isnan(got[~valid]).all()


def test_consistency_with_one_hot_predictions_and_given_values(data):
    K, valid = data["K"], data["valid"]
    preds = data["probs"].argmax(1)
    idx = GradientIndex.from_features(data["rows"], predictions=preds)
    onehot = np.eye(C)[preds]
    expected, _ = _brute_consistency(K, np.ones(N), onehot, True)
    np.testing.assert_allclose(idx.consistency()[valid], expected[valid], rtol=1e-7, atol=1e-9)
    labels_onehot = np.eye(C)[data["labels"]]
    expected, _ = _brute_consistency(K, data["norms"].astype(float), labels_onehot, True)
    got = data["idx"].consistency(values=labels_onehot)
    np.testing.assert_allclose(got[valid], expected[valid], rtol=1e-7, atol=1e-9)


def test_consistency_without_predictions_says_what_to_do(data):
    from nnsim_hooks.errors import DataError

    idx = GradientIndex.from_features(data["rows"])
    with pytest.raises(DataError, match="values="):
        idx.consistency()


def test_table_has_the_stored_columns(data):
    pd = pytest.importorskip("pandas")
    t = data["idx"].table(probabilities=True)
    assert isinstance(t, pd.DataFrame) and len(t) == N and t.index.name == "id"
    assert {"valid", "norm", "label", "prediction", "confidence", "p_0", f"p_{C - 1}"} <= set(t.columns)
    np.testing.assert_array_equal(t["label"].to_numpy(), data["labels"])
    np.testing.assert_array_equal(t["prediction"].to_numpy(), data["probs"].argmax(1))
    np.testing.assert_array_equal(t["valid"].to_numpy(), data["valid"])
