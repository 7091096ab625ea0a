"""Index types (exact and approximate), saving and loading them, GPU fallbacks, bad input."""

import numpy as np
import pytest
import torch

from index_synthetic import clustered_rows, faiss_file, faiss_files, kernel
from nnsim_hooks import load_index
from nnsim_hooks.errors import DataError, InputError, NnsimError, StoreError
from nnsim_hooks.index import INDEX_KINDS, GradientIndex
from nnsim_hooks.index.backend import FaissIndex, gpu_available

N, D, K = 2000, 32, 10


@pytest.fixture(scope="module")
def rows():
    return clustered_rows(N, D, clusters=20, noise=1.0, seed=3)


@pytest.fixture(scope="module")
def truth(rows):
    k = kernel(rows, np.ones(N, bool))
    return np.argsort(-k, axis=1, kind="stable")[:, :K], np.sort(k, axis=1)[:, ::-1][:, :K]


def recall(ids, true_ids):
    return np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(ids.tolist(), true_ids.tolist())])


# approximate indexes need only a good recall; flat must be exact
RECALL = {"flat": 1.0, "ivf": 0.9, "hnsw": 0.95, "sq8": 0.9, "ivf_sq8": 0.85}


@pytest.mark.parametrize("kind", INDEX_KINDS)
def test_every_index_type_finds_the_neighbours(rows, truth, kind, tmp_path):
    idx = GradientIndex.from_features(rows, index=kind, path=tmp_path / kind)
    queries = rows[:200]
    scores, ids = idx.search(queries, K)
    true_ids, true_scores = truth
    r = recall(ids, true_ids[:200])
    assert r >= RECALL[kind], f"{kind}: recall@{K} {r:.3f}"
    if kind == "flat":
        np.testing.assert_allclose(scores, true_scores[:200], atol=2e-6)
    # saved and loaded, the same answers
    again = load_index(tmp_path / kind)
    assert again.kind == kind and len(again) == N
    s2, i2 = again.search(queries, K)
    np.testing.assert_array_equal(i2, ids)
    assert len(faiss_files(tmp_path / kind)) == (kind != "flat")


def test_factory_string_and_options(rows):
    idx = GradientIndex.from_features(rows, index="IVF8,Flat", index_options={"nprobe": 8})
    assert idx.kind == "factory" and idx.spec.factory == "IVF8,Flat"
    _, ids = idx.search(rows[:20], 5)
    assert (ids[:, 0] == np.arange(20)).all()  # nprobe = nlist: exhaustive
    with pytest.raises(InputError, match="FAISS cannot make an index"):
        GradientIndex.from_features(rows, index="NoSuchIndex42")
    with pytest.raises(InputError, match="does not take option"):
        GradientIndex.from_features(rows, index="hnsw", index_options={"nlist": 4})
    with pytest.raises(InputError, match="positive integer"):
        GradientIndex.from_features(rows, index="ivf", index_options={"nlist": 0})
    with pytest.raises(InputError, match="needs at least"):
        GradientIndex.from_features(rows[:5], index="ivf", index_options={"nlist": 50})


def test_tune_changes_search_options(rows, truth):
    idx = GradientIndex.from_features(rows, index="ivf", index_options={"nlist": 40, "nprobe": 1})
    low = recall(idx.search(rows[:200], K)[1], truth[0][:200])
    idx.tune(nprobe=40)
    high = recall(idx.search(rows[:200], K)[1], truth[0][:200])
    assert high == 1.0 and low < high
    with pytest.raises(InputError):
        GradientIndex.from_features(rows[:50]).tune(nprobe=4)


def test_rebuild_index_in_a_folder(rows, tmp_path):
    idx = GradientIndex.from_features(rows, path=tmp_path / "ix")
    idx.rebuild_index("hnsw", progress=False)
    assert faiss_files(tmp_path / "ix") == [faiss_file(tmp_path / "ix").name]
    assert load_index(tmp_path / "ix").kind == "hnsw"
    idx.rebuild_index("flat", progress=False)
    assert not faiss_files(tmp_path / "ix")
    assert load_index(tmp_path / "ix").kind == "flat"


def test_missing_index_file_is_rebuilt(rows, tmp_path):
    GradientIndex.from_features(rows, path=tmp_path / "ix", index="sq8")
    faiss_file(tmp_path / "ix").unlink()
    idx = load_index(tmp_path / "ix")
    _, ids = idx.search(rows[:10], 1)
    assert (ids[:, 0] == np.arange(10)).all()


def test_corrupt_index_file_is_a_store_error(rows, tmp_path):
    GradientIndex.from_features(rows, path=tmp_path / "ix", index="hnsw")
    faiss_file(tmp_path / "ix").write_bytes(b"garbage")
    with pytest.raises(StoreError, match=r"index-[0-9a-f]{16}\.faiss"):  # at load (its size), else at the first search
        load_index(tmp_path / "ix").search(rows[:2], 3)


# -- exact torch fallbacks (what FAISS-GPU lacks), exercised on CPU ----------------------


def test_large_k_falls_back_to_exact_torch(rows, truth, monkeypatch):
    idx = GradientIndex.from_features(rows)
    expected_s, expected_i = idx.search(rows[:30], K, exclude=np.arange(30))
    monkeypatch.setattr(FaissIndex, "max_k", property(lambda self: 3))
    s, i = idx.search(rows[:30], K, exclude=np.arange(30))
    np.testing.assert_array_equal(i, expected_i)
    np.testing.assert_allclose(s, expected_s, atol=1e-6)


def test_counts_fall_back_to_exact_without_range_search(rows, monkeypatch):
    idx = GradientIndex.from_features(rows)
    expected = idx.neighbor_counts(0.6, method="range_search", progress=False)
    monkeypatch.setattr(FaissIndex, "supports_range_search", property(lambda self: False))
    np.testing.assert_array_equal(idx.neighbor_counts(0.6, progress=False), expected)


def test_gpu_request_without_faiss_gpu_is_clear(rows):
    if gpu_available():
        pytest.skip("this FAISS has GPUs")
    with pytest.raises(InputError, match="faiss-gpu"):
        GradientIndex.from_features(rows[:50], gpu=True)
    GradientIndex.from_features(rows[:50], gpu=None).search(rows[:2], 2)  # auto: CPU


# -- bad input: our exceptions, never FAISS's bare assert ----------------------------------


@pytest.fixture(scope="module")
def small(rows):
    return GradientIndex.from_features(rows[:100])


@pytest.mark.parametrize(
    "queries, match",
    [
        (np.zeros((2, D), np.float64), "float32"),
        (torch.zeros(2, D, dtype=torch.float64), "float32"),
        (np.zeros((2, D + 1), np.float32), f"{D + 1} columns .* {D}-dimensional"),
        (np.zeros((2, 2, D), np.float32), "2-D"),
        ([[0.0] * D], "numpy array or torch tensor"),
        (np.zeros((2, D), np.int32), "float32"),
    ],
)
def test_bad_queries(small, queries, match):
    with pytest.raises(InputError, match=match):
        small.search(queries, 3)


def test_non_contiguous_queries_are_fine(small, rows):
    q = np.asfortranarray(rows[:5])
    _, ids = small.search(q, 1)
    assert (ids[:, 0] == np.arange(5)).all()
    _, ids = small.search(rows[:10:2], 1)  # strided view
    assert (ids[:, 0] == np.arange(0, 10, 2)).all()


@pytest.mark.parametrize("k", [0, -1, 2.5, True, "3", None])
def test_bad_k(small, rows, k):
    with pytest.raises(InputError, match="k must be a positive integer"):
        small.search(rows[:2], k)


def test_bad_query_options(small, rows):
    with pytest.raises(InputError, match="one per query"):
        small.search(rows[:3], 2, exclude=[1, 2])
    with pytest.raises(InputError, match="integer ids"):
        small.search(rows[:2], 2, exclude=np.array([0.5, 1.5]))
    with pytest.raises(InputError, match="threshold"):
        small.neighbor_counts(float("nan"))
    with pytest.raises(InputError, match="method"):
        small.neighbor_counts(0.5, method="fast")
    with pytest.raises(InputError, match="power"):
        small.soft_counts(0)
    with pytest.raises(InputError, match="kernel"):
        small.effective_neighbors("ntk")
    with pytest.raises(InputError, match="values"):
        small.consistency(values=np.zeros((3, 2)))


def test_bad_features_for_from_features(rows):
    with pytest.raises(InputError, match="float32"):
        GradientIndex.from_features(rows.astype(np.float64))
    with pytest.raises(InputError, match="unit norm .* normalize=True"):
        GradientIndex.from_features(rows * 2)
    idx = GradientIndex.from_features(rows * 2, normalize=True)
    np.testing.assert_allclose(np.linalg.norm(idx.features, axis=1), 1, atol=1e-6)
    with pytest.raises(DataError, match="no rows"):
        GradientIndex.from_features(np.zeros((0, D), np.float32))
    with pytest.raises(InputError, match=r"labels must have shape \[2000\]"):
        GradientIndex.from_features(rows, labels=np.zeros(3, int))
    with pytest.raises(InputError, match="integers"):
        GradientIndex.from_features(rows, labels=np.zeros(N))


def test_no_assertion_error_escapes(small, rows):
    """Throw a mixed bag at every query; only NnsimError subclasses may come out."""
    bad_calls = [
        lambda: small.search(np.zeros((1, 3), np.float32), 1),
        lambda: small.search(np.zeros((1, D), np.float16), 1),
        lambda: small.search(rows[:1], 10**9 + 0.5),
        lambda: small.neighbors(0),
        lambda: small.neighbor_counts("0.5"),
        lambda: small.tune(nprobe=-3),
        lambda: small.rebuild_index(3),
    ]
    for call in bad_calls:
        with pytest.raises(NnsimError):
            call()
