"""The audit's neighbour step against brute force: exact search equal to it, the partition
search's recall measured against it (not assumed), resuming, bad input."""

import numpy as np
import pytest

from nnsim_hooks.errors import InputError
from nnsim_hooks.index.all_neighbors import all_neighbors, block_rows, check_recall


def clustered(n, dim, clusters, noise, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    x = centres[rng.integers(0, clusters, n)] + noise * rng.standard_normal((n, dim)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def brute_force(f, valid, k):
    """Top-k similarities of every valid row among the other valid rows, float64."""
    s = f.astype(np.float64) @ f.astype(np.float64).T
    s[:, ~valid] = -np.inf
    np.fill_diagonal(s, -np.inf)
    top = np.sort(s, axis=1)[:, ::-1][:, :k]
    return top


def test_exact_matches_brute_force_and_skips_invalid_rows():
    f = clustered(700, 32, 10, 0.5)
    valid = np.ones(700, bool)
    valid[[3, 99]] = False
    f[[3, 99]] = 0
    sims, ids, plan = all_neighbors(f, valid, 5, exact=True, progress=False, max_memory=2 << 20)
    assert plan.method == "exact"
    truth = brute_force(f, valid, 5)
    np.testing.assert_allclose(sims[valid], truth[valid], atol=1e-5)
    assert (ids[[3, 99]] == -1).all() and np.isnan(sims[[3, 99]]).all()
    assert not np.isin(ids[valid], [3, 99]).any()
    assert (ids[valid] != np.flatnonzero(valid)[:, None]).all()  # never itself
    # the ids hold the similarities reported
    rows = np.flatnonzero(valid)
    got = np.einsum("nd,nkd->nk", f[rows].astype(np.float64), f[ids[rows]].astype(np.float64))
    np.testing.assert_allclose(got, sims[rows], atol=1e-5)


@pytest.mark.slow
def test_partition_recall_is_measured_against_brute_force():
    f = clustered(4000, 48, 40, 0.6, seed=1)
    valid = np.ones(len(f), bool)
    sims, ids, plan = all_neighbors(f, valid, 10, exact=False, recall=0.9, progress=False)
    assert plan.method == "partition" and 1 <= plan.nprobe < plan.nlist
    truth = brute_force(f, valid, 10)
    found = (sims >= truth[:, -1:] - 1e-5).mean()
    assert found >= 0.85  # the target, less sampling noise
    assert plan.recall_sample > 0 and abs(plan.recall_measured - found) < 0.06
    # the sample's tuning table is monotone in nprobe and reaches the target at the chosen one
    assert plan.tuning[str(plan.nprobe)] >= 0.9


@pytest.mark.slow
def test_low_recall_target_gives_lower_recall_and_is_reported():
    f = clustered(4000, 48, 20, 1.2, seed=2)
    valid = np.ones(len(f), bool)
    sims, _, plan = all_neighbors(f, valid, 10, exact=False, recall=0.3, progress=False)
    truth = brute_force(f, valid, 10)
    found = float((sims >= truth[:, -1:] - 1e-5).mean())
    if plan.method == "partition":
        assert found < 1.0 and abs(plan.recall_measured - found) < 0.08
    else:  # the partition would not have paid: exact
        assert found == 1.0


@pytest.mark.slow
@pytest.mark.parametrize("exact", [True, False])
def test_interrupted_and_resumed_gives_the_same_neighbours(tmp_path, exact):
    f = clustered(3000, 32, 30, 0.6, seed=3)
    valid = np.ones(len(f), bool)
    opts = dict(exact=exact, recall=0.9, progress=False, max_memory=2 << 20)
    whole = all_neighbors(f, valid, 7, **opts)
    state = tmp_path / "state"
    with pytest.raises(KeyboardInterrupt):
        all_neighbors(f, valid, 7, state_dir=state, checkpoint_seconds=0, _stop_after=3, **opts)
    assert (state / "progress.npz").is_file()
    resumed = all_neighbors(f, valid, 7, state_dir=state, checkpoint_seconds=0, **opts)
    np.testing.assert_array_equal(resumed[1], whole[1])
    np.testing.assert_array_equal(resumed[0], whole[0])
    assert resumed[2].method == whole[2].method


@pytest.mark.parametrize("bad", [0, -0.1, 1.01, float("nan"), "0.9", True])
def test_recall_outside_zero_one_is_refused(bad):
    with pytest.raises(InputError, match="recall"):
        check_recall(bad)


def test_memory_budget_below_one_block_names_the_value():
    with pytest.raises(InputError, match="1,000 bytes"):
        block_rows(1024, 1000)
    f = clustered(50, 8, 2, 0.5)
    with pytest.raises(InputError, match="below what one block"):
        all_neighbors(f, np.ones(50, bool), 3, max_memory=10, progress=False)
