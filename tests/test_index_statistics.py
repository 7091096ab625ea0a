"""The queries written once (index/queries.py) on their two hosts: one index, and row
shares in one process (ShardedQueries without a process group), against brute force over
all pairs (float64 numpy); and the additive statistics they read."""

import numpy as np
import pytest

from index_synthetic import clustered_rows, kernel, softmax, with_duplicates_and_holes
from nnsim_hooks.errors import InputError
from nnsim_hooks.index import GradientIndex, ShardedQueries, load_index
from nnsim_hooks.index.statistics import Rows, Statistics

N, D, C = 97, 12, 4


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    rows, valid, _ = with_duplicates_and_holes(clustered_rows(N, D, seed=3))
    rng = np.random.default_rng(4)
    probs = softmax(rng.standard_normal((N, C)) * 2)
    norms = rng.uniform(0.5, 3.0, N).astype(np.float32)
    path = tmp_path_factory.mktemp("stats") / "ix"
    GradientIndex.from_features(rows, probabilities=probs, norms=norms, path=path)
    idx = load_index(path)  # memory-mapped, read-only columns
    K = kernel(rows, valid)  # NaN where either row is not valid
    raw = np.nan_to_num(K) * norms[:, None].astype(np.float64) * norms[None, :]
    return dict(idx=idx, valid=valid, K=np.nan_to_num(K), raw=raw, probs=probs.astype(np.float64), norms=norms)


def hosts(idx):
    return {"index": idx, "3 shares": ShardedQueries(idx, shards=3), "7 shares": ShardedQueries(idx, shards=7)}


def brute(data, include_self):
    """density, N_eff (cosine, raw), consistency (raw), hard counts > 0.3, soft counts ^2."""
    K, raw, p, valid = data["K"].copy(), data["raw"].copy(), data["probs"], data["valid"]
    if not include_self:
        np.fill_diagonal(K, 0)
        np.fill_diagonal(raw, 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = dict(
            density=K.sum(1),
            n_eff=K.sum(1) ** 2 / (K**2).sum(1),
            n_eff_raw=raw.sum(1) ** 2 / (raw**2).sum(1),
            consistency=np.linalg.norm(p - raw @ p / raw.sum(1)[:, None], axis=1),
            counts=(K > 0.3).sum(1).astype(np.float64),
            soft=(np.clip(K, 0, None) ** 2).sum(1),
        )
    for v in out.values():
        v[~valid] = np.nan
    return out


@pytest.mark.parametrize("include_self", [True, False])
@pytest.mark.parametrize("host", ["index", "3 shares", "7 shares"])
def test_every_query_on_every_host_equals_brute_force(data, host, include_self):
    q = hosts(data["idx"])[host]
    truth = brute(data, include_self)
    got = dict(
        density=q.density(include_self=include_self),
        n_eff=q.effective_neighbors(include_self=include_self),
        n_eff_raw=q.effective_neighbors("raw", include_self=include_self),
        consistency=q.consistency(include_self=include_self),
        counts=q.neighbor_counts(0.3, include_self=include_self, method="exact", progress=False),
        soft=q.soft_counts(2, include_self=include_self, progress=False),
    )
    for name, value in got.items():
        assert value.shape == (N,), name
        np.testing.assert_allclose(value, truth[name], rtol=1e-4, atol=1e-4, equal_nan=True, err_msg=name)
    with np.errstate(divide="ignore"):
        np.testing.assert_allclose(q.denoising_factor(include_self=include_self), 1 / truth["n_eff"], rtol=1e-4,
                                   equal_nan=True)


def test_shares_agree_with_the_index_to_float64_rounding(data):
    idx = data["idx"]
    for host in (ShardedQueries(idx, shards=3), ShardedQueries(idx, shards=N + 5)):  # empty shares too
        np.testing.assert_allclose(host.effective_neighbors("raw"), idx.effective_neighbors("raw"), rtol=1e-12,
                                   equal_nan=True)
        d, avg = host.consistency("cosine", return_average=True)
        d0, avg0 = idx.consistency("cosine", return_average=True)
        np.testing.assert_allclose(d, d0, rtol=1e-12, equal_nan=True)
        np.testing.assert_allclose(avg, avg0, rtol=1e-12, equal_nan=True)
        np.testing.assert_array_equal(host.neighbor_counts(0.5), idx.neighbor_counts(0.5, method="exact",
                                                                                       progress=False))


def test_statistics_are_the_sums_over_every_row_whatever_the_parts(data):
    idx, norms, valid = data["idx"], data["norms"].astype(np.float64), data["valid"]
    f = np.asarray(idx.features, dtype=np.float64)
    w = np.where(valid, norms, 0.0)
    p = data["probs"]
    for parts in (None, [(0, 40), (40, 41), (41, N)], [(0, N)]):
        stats = Statistics(idx, parts)
        np.testing.assert_allclose(stats.weighted_sum("cosine"), f.sum(0), atol=1e-9)
        np.testing.assert_allclose(stats.weighted_sum("raw"), w @ f, atol=1e-9)
        np.testing.assert_allclose(stats.second_moment("raw"), (f * w[:, None] ** 2).T @ f, atol=1e-9)
        np.testing.assert_allclose(stats.cross_moment(p, "raw"), (f * w[:, None]).T @ p, atol=1e-9)
    halves = [Statistics(idx, [(0, 50)]), Statistics(idx, [(50, N)])]
    total = sum(h.second_moment("cosine") for h in halves)
    np.testing.assert_allclose(Statistics(idx, [(0, 50), (50, N)]).second_moment("cosine"), total, atol=1e-12)
    calls = []
    reduced = Statistics(idx, [(0, 50)], all_reduce=lambda x: calls.append(x.shape) or x + halves[1].weighted_sum(
        "cosine"))
    np.testing.assert_allclose(reduced.weighted_sum("cosine"), f.sum(0), atol=1e-9)
    assert calls == [(D,)]


def test_rows_slice_the_public_columns(data):
    idx = data["idx"]
    rows = Rows(idx, 10, 20)
    assert len(rows) == 10 and not rows.whole and Rows(idx).whole
    np.testing.assert_array_equal(rows.ids, np.arange(10, 20))
    np.testing.assert_array_equal(rows.features, idx.features[10:20])
    assert rows.weights("cosine") is None
    np.testing.assert_allclose(rows.weights("raw"), np.where(data["valid"][10:20], data["norms"][10:20], 0))
    with pytest.raises(InputError, match="kernel must be one of"):
        rows.weights("gaussian")
    with pytest.raises(InputError, match="kernel must be one of"):
        ShardedQueries(idx, shards=2).effective_neighbors("gaussian")


@pytest.mark.parametrize("exclude_self", [True, False])
def test_neighbours_on_shares_equal_the_index_and_brute_force(data, exclude_self):
    idx, K, valid = data["idx"], data["K"].copy(), data["valid"]
    scores, ids = idx.neighbors(4, exclude_self=exclude_self, batch_size=10, progress=False)
    for shards in (3, 7):
        s, i = ShardedQueries(idx, shards=shards).neighbors(4, exclude_self=exclude_self, batch_size=10,
                                                            progress=False)
        np.testing.assert_allclose(s, scores, atol=1e-6, equal_nan=True)
        # the same ids, but for exact ties (duplicated rows), which FAISS may order otherwise
        found = i >= 0
        np.testing.assert_array_equal(found, ids >= 0)
        np.testing.assert_allclose(K[np.nonzero(found)[0], i[found]], s[found], atol=1e-5)
        assert ((i == ids) | np.isclose(s, scores, atol=1e-6)).all()
    K[:, ~valid] = -np.inf
    if exclude_self:
        np.fill_diagonal(K, -np.inf)
    best = -np.sort(-K, axis=1)[:, :4]
    np.testing.assert_allclose(scores[valid], best[valid], atol=1e-5)
    assert (ids[~valid] == -1).all() and np.isnan(scores[~valid]).all()
    if exclude_self:
        assert not (ids == np.arange(N)[:, None]).any()
