"""``effective_neighbors`` / ``denoising_factor``: the N x N Gram path (D > N), the D x D
moment and its column-chunked form (D <= N) against brute force over all pairs, and the
memory check that fails before any large allocation."""

from __future__ import annotations

import numpy as np
import pytest

from nnsim_hooks.errors import InputError
from nnsim_hooks.index import GradientIndex
from nnsim_hooks.index import moments


def _features(n, dim, seed=0):
    rng = np.random.default_rng(seed)
    f = rng.normal(size=(n, dim)) + 0.3  # a common direction: many positive similarities
    f[3] = 0.0  # one sample without a gradient direction
    norms = rng.uniform(0.5, 2.0, size=n)
    return f.astype(np.float32), norms


def _brute(f, norms, valid, kernel, include_self):
    f = f.astype(np.float64)
    unit = np.zeros_like(f)
    unit[valid] = f[valid] / np.linalg.norm(f[valid], axis=1, keepdims=True)
    k = unit @ unit.T
    if kernel == "raw":
        w = np.where(valid, norms, 0.0)
        k = k * w[:, None] * w[None, :]
    if not include_self:
        np.fill_diagonal(k, 0.0)
    with np.errstate(invalid="ignore"):
        out = k.sum(1) ** 2 / (k**2).sum(1)
    out[~valid] = np.nan
    return out


@pytest.mark.parametrize("shape", [(40, 300), (300, 24)], ids=["gram-D>N", "moment-D<=N"])
@pytest.mark.parametrize("kernel", ["cosine", "raw"])
@pytest.mark.parametrize("include_self", [True, False])
def test_both_paths_against_brute_force(shape, kernel, include_self, monkeypatch):
    f, norms = _features(*shape)
    idx = GradientIndex.from_features(f, norms=norms, normalize=True)
    valid = np.asarray(idx.valid)
    assert not valid[3]
    used = []
    for name in ("gram_squares", "quadratic_forms", "chunked_quadratic_forms"):
        original = getattr(moments, name)
        monkeypatch.setattr(moments, name, lambda *a, _o=original, _n=name: used.append(_n) or _o(*a))
    ref = _brute(np.asarray(idx.features), norms, valid, kernel, include_self)
    got = idx.effective_neighbors(kernel, include_self=include_self)
    np.testing.assert_allclose(got, ref, rtol=1e-5, equal_nan=True)
    np.testing.assert_allclose(idx.denoising_factor(kernel, include_self=include_self), 1 / ref, rtol=1e-5,
                               equal_nan=True)
    assert used[0] == ("gram_squares" if shape[1] > shape[0] else "quadratic_forms")


@pytest.mark.parametrize("shape", [(40, 300), (300, 24)], ids=["gram-D>N", "moment-D<=N"])
def test_small_budgets_chunk_and_give_the_same_numbers(shape):
    f, norms = _features(*shape, seed=1)
    idx = GradientIndex.from_features(f, norms=norms, normalize=True)
    ref = _brute(np.asarray(idx.features), norms, np.asarray(idx.valid), "raw", True)
    n, dim = shape
    # Enough for a few rows and columns at a time only, far below the full matrices.
    budget = 8 * (2 * dim + 2 * 8 * dim + 8) + 8 * 2 * n + 4096
    assert not moments.second_moment_fits(dim, budget)
    got = idx.effective_neighbors("raw", max_memory=budget)
    np.testing.assert_allclose(got, ref, rtol=1e-5, equal_nan=True)
    chunked = moments.chunked_quadratic_forms(np.asarray(idx.features), np.asarray(idx.norms, np.float64), budget)
    full = moments.quadratic_forms(np.asarray(idx.features), moments.second_moment(idx.features, np.asarray(idx.norms)))
    np.testing.assert_allclose(chunked, full, rtol=1e-10, atol=1e-12)


def test_a_budget_below_the_minimum_fails_early_naming_the_need():
    f, norms = _features(40, 300)
    idx = GradientIndex.from_features(f, norms=norms, normalize=True)
    with pytest.raises(InputError, match=r"Gram path for N = 40 .* needs at least 640 bytes"):
        idx.effective_neighbors(max_memory=100)
    f, norms = _features(300, 24)
    idx = GradientIndex.from_features(f, norms=norms, normalize=True)
    with pytest.raises(InputError, match=r"second moment for D = 24 .* needs at least [\d,]+ bytes"):
        idx.effective_neighbors(max_memory=100)
    for bad in (0, -5, 2.5, "8GB"):
        with pytest.raises(InputError, match="max_memory must be"):
            idx.effective_neighbors(max_memory=bad)
