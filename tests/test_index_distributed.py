"""Builds and queries shared by several processes (issue 10): torchrun (gloo, CPU) against
the one-process build as oracle, shard=(i, n) + merge, and every refusal.

Two torchrun launches for the whole file (each start costs seconds): ``kill`` (rank 1 dies
mid-build) then ``main`` (resume, DDP, sharded queries, refusals, audit); see
tests/dist_worker.py. The rest runs in this process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset, Subset

import nnsim_hooks
from nnsim_hooks.errors import ExtractionError, IndexMismatchError, InputError, StoreError
from nnsim_hooks.index.sharded.shards import merge_shards, shard_range
from nnsim_hooks.index.sharded.queries import ShardedQueries

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dist_common import BATCH, DIM, N, cli_audit, dataset, make_cnn, npy_folder, other_dataset  # noqa: E402

WORKER = Path(__file__).resolve().parent / "dist_worker.py"
REPO = Path(__file__).resolve().parent.parent


def build(path=None, data=None, seed=0, **options):
    with nnsim_hooks.attach(make_cnn(), sketch_dim=DIM, seed=seed) as h:
        return h.build_index(dataset() if data is None else data, path, batch_size=BATCH, progress=False, **options)


@pytest.fixture(scope="module")
def reference():
    """The one-process build: the oracle for everything shared."""
    return build()


def assert_same_index(idx, ref):
    np.testing.assert_array_equal(np.asarray(idx.ids), np.arange(N))
    np.testing.assert_array_equal(np.asarray(idx.labels), np.asarray(ref.labels))
    np.testing.assert_allclose(np.asarray(idx.features), np.asarray(ref.features), atol=1e-5)
    np.testing.assert_allclose(idx.density(), ref.density(), atol=1e-3)
    np.testing.assert_allclose(idx.effective_neighbors(), ref.effective_neighbors(), rtol=1e-3)


# -- torchrun ---------------------------------------------------------------------------


def torchrun(scenario: str, root: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               NNSIM_DIST_TIMEOUT="60", NNSIM_DIST_WAIT="120", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER),
           scenario, str(root)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """Both launches, and the state of the folder the killed rank left."""
    root = tmp_path_factory.mktemp("torchrun")
    build(root / "world3", shard=(0, 3))  # a folder of another world size, for the refusal
    build(root / "otherdata", data=other_dataset())  # a finished index of other data of the same length
    npy_folder(root / "npy")  # data for nnsim audit --data
    killed = torchrun("kill", root)
    assert killed.returncode != 0, killed.stdout + killed.stderr
    left = {}
    for name in ("rank-00000-of-00002", "rank-00001-of-00002"):
        manifest = json.loads((root / "killed" / "shards" / name / "manifest.json").read_text())
        left[name] = (manifest["count"], manifest["extraction_complete"])
    left["merged"] = (root / "killed" / "manifest.json").exists()
    main = torchrun("main", root)
    assert main.returncode == 0, main.stdout[-3000:] + main.stderr[-6000:]
    seen = [json.loads((root / f"main-rank{r}.json").read_text()) for r in (0, 1)]
    return root, left, seen


@pytest.mark.slow
def test_torchrun_build_equals_one_process_and_resumes_a_killed_rank(launched, reference):
    root, left, seen = launched
    # the kill left rank 1's share partial (some batches committed), nothing merged
    count, complete = left["rank-00001-of-00002"]
    assert 0 < count < 75 and not complete and not left["merged"]
    for rank in (0, 1):
        got = dict(np.load(root / f"resumed-rank{rank}.npz"))
        np.testing.assert_array_equal(got["ids"], np.arange(N))  # nothing lost, nothing duplicated
        np.testing.assert_allclose(got["features"], reference.features, atol=1e-5)
        np.testing.assert_allclose(got["density"], reference.density(), atol=1e-3)
        np.testing.assert_allclose(got["n_eff"], reference.effective_neighbors(), rtol=1e-3)
        np.testing.assert_array_equal(got["labels"], reference.labels)
        assert seen[rank]["resumed_shards_left"] is False  # merged, the shards deleted
    assert_same_index(nnsim_hooks.load_index(root / "killed"), reference)


@pytest.mark.slow
def test_torchrun_a_rank_that_never_comes_is_named_not_waited_for(launched):
    _, _, seen = launched
    name, message = seen[0]["absent"]
    assert name == "DistributedError"
    assert "did not all reach 'checking the data' within 3 s" in message and "Ranks 1 failed" in message


@pytest.mark.slow
def test_torchrun_build_of_one_sample_leaves_a_rank_empty(launched, reference):
    _, _, seen = launched
    for rank in (0, 1):
        assert seen[rank]["one_sample_ids"] == [0]
        assert seen[rank]["one_sample_labels"] == [int(reference.labels[0])]
        assert seen[rank]["merged_again"]  # a finished folder is returned as it is


@pytest.mark.slow
def test_torchrun_build_of_a_ddp_wrapped_model(launched, reference):
    root, _, _ = launched
    for rank in (0, 1):
        got = dict(np.load(root / f"ddp-rank{rank}.npz"))
        np.testing.assert_array_equal(got["ids"], np.arange(N))
        np.testing.assert_allclose(got["features"], reference.features, atol=1e-5)
    idx = nnsim_hooks.load_index(root / "ddp")
    assert_same_index(idx, reference)
    with nnsim_hooks.attach(make_cnn(), sketch_dim=DIM) as h:
        h.extract(dataset().tensors[0][:2])
        idx.check_handle(h)  # a DDP wrapper's fingerprint is the bare model's
    assert idx.manifest["shards"]["ranges"] == [[0, 76], [76, 151]]


@pytest.mark.slow
def test_torchrun_sharded_queries_equal_one_process(launched):
    root, _, _ = launched
    idx = nnsim_hooks.load_index(root / "ddp")
    expect = dict(density=idx.density(), n_eff_raw=idx.effective_neighbors("raw"),
                  n_eff_other=idx.effective_neighbors(include_self=False), consistency=idx.consistency(),
                  counts=idx.neighbor_counts(0.3, include_self=False, method="exact", progress=False),
                  soft=idx.soft_counts(2, progress=False))
    _, average = idx.consistency(return_average=True)
    nb_s, nb_i = idx.neighbors(5, progress=False)
    for rank in (0, 1):
        got = dict(np.load(root / f"queries-rank{rank}.npz"))
        for name, value in expect.items():
            np.testing.assert_allclose(got[name], value, rtol=1e-9, atol=1e-12, err_msg=name)
        np.testing.assert_allclose(got["average"], average, rtol=1e-9)
        np.testing.assert_array_equal(got["nb_ids"], nb_i)
        np.testing.assert_allclose(got["nb_scores"], nb_s, atol=1e-5)
        assert len(got["search_queries"]) == 2 + rank  # each rank asked its own queries
        s, i = idx.search(got["search_queries"], 4)
        np.testing.assert_array_equal(got["search_ids"], i)
        np.testing.assert_allclose(got["search_scores"], s, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("case, cls, words", [
    ("length", "DataError", ["samples: rank 0 has 151, rank 1 has 150"]),
    ("seed", "IndexMismatchError", ["fingerprint.sketch.seed: rank 0 has 0, rank 1 has 1"]),
    ("locked", "StoreError", ["rank 1", "test: another writer", "two writers"]),
    ("world", "IndexMismatchError", ["3 processes", "this build has 2"]),
    ("otherdata", "IndexMismatchError", ["a finished index of other data than this", "first sample (id 0)"]),
    ("iterable", "DataError", ["known length"]),
])
def test_torchrun_refusals_reach_every_rank(launched, case, cls, words):
    _, _, seen = launched
    for rank in (0, 1):
        assert seen[rank][case] is not None, f"rank {rank} did not raise for {case}"
        name, message = seen[rank][case]
        assert name == cls, message
        for word in words:
            assert word in message


@pytest.mark.slow
def test_torchrun_cli_audit_equals_one_process(launched, tmp_path):
    import pandas as pd

    root, _, seen = launched
    assert seen[0]["audit_rc"] == seen[1]["audit_rc"] == 0
    single = tmp_path / "audit"
    assert cli_audit(root / "npy", single) == 0
    shared = root / "audit"
    assert sorted(p.name for p in shared.iterdir()) == sorted(p.name for p in single.iterdir())
    assert not (shared / "index" / "shards").exists()
    a, b = pd.read_csv(single / "table.csv"), pd.read_csv(shared / "table.csv")
    assert list(a.columns) == list(b.columns)
    for col in a.columns:
        if a[col].dtype.kind == "f":
            np.testing.assert_allclose(b[col], a[col], rtol=1e-3, atol=1e-4, err_msg=col)
        else:
            assert (a[col].astype(str) == b[col].astype(str)).all(), col
    sa, sb = (json.loads((p / "summary.json").read_text()) for p in (single, shared))
    for s in (sa, sb):
        s.pop("seconds", None)
    assert sa.keys() == sb.keys()
    assert {k: v for k, v in sa.items() if not isinstance(v, (float, dict))} == \
        {k: v for k, v in sb.items() if not isinstance(v, (float, dict))}


# -- shard=(i, n) and merge, in one process ------------------------------------------------


def test_shards_built_in_any_order_merge_into_the_one_process_index(tmp_path, reference):
    for i in (2, 0, 1):
        assert build(tmp_path, shard=(i, 3)) is None
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == [f"rank-0000{i}-of-00003" for i in range(3)]
    with pytest.raises(StoreError, match="not merged yet.*nnsim index merge"):
        nnsim_hooks.load_index(tmp_path)  # not merged yet
    from nnsim_hooks.cli.commands import main

    assert main(["index", "merge", str(tmp_path), "--no-progress"]) == 0
    assert not (tmp_path / "shards").exists()
    assert_same_index(nnsim_hooks.load_index(tmp_path), reference)
    assert build(tmp_path, shard=(1, 3)) is None  # merged already: nothing to do
    assert_same_index(build(tmp_path), reference)  # and a one-process build returns it


def test_an_empty_share_merges(tmp_path):
    data = Subset(dataset(), range(2))
    for i in range(3):
        build(tmp_path, data=data, shard=(i, 3))
    idx = merge_shards(tmp_path, progress=False, keep_shards=True)
    np.testing.assert_array_equal(idx.ids, [0, 1])
    assert (tmp_path / "shards" / "rank-00002-of-00003").is_dir()


class FailsAt(Dataset):
    def __init__(self, data, at):
        self.data, self.at = data, at

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        if i == self.at:
            raise RuntimeError("unreadable sample")
        return self.data[i]


def test_merge_refuses_mismatched_shards_listing_them(tmp_path):
    build(tmp_path, shard=(0, 3))
    build(tmp_path, shard=(1, 3), seed=1)
    with pytest.raises(ExtractionError):
        build(tmp_path, data=FailsAt(dataset(), 140), shard=(2, 3))
    with pytest.raises(IndexMismatchError) as err:
        merge_shards(tmp_path, progress=False)
    message = str(err.value)
    assert "rank-00001-of-00003 differs from rank-00000-of-00003: fingerprint.sketch.seed" in message
    assert "rank-00002-of-00003: incomplete (" in message
    assert not (tmp_path / "manifest.json").exists()


def test_merge_refuses_missing_and_mixed_shards(tmp_path):
    build(tmp_path, shard=(0, 2))
    with pytest.raises(IndexMismatchError, match=r"missing shards: rank-00001-of-00002[\s\S]*samples 76\.\.150 are in no shard"):
        merge_shards(tmp_path, progress=False)
    with pytest.raises(IndexMismatchError, match="by 2 processes .* this build has 3"):
        build(tmp_path, shard=(1, 3))  # another split into the same folder is refused at build time
    other = tmp_path / "shards" / "rank-00001-of-00003"
    other.mkdir()
    with pytest.raises(IndexMismatchError, match="shards of splits into 2 and 3 shares are mixed"):
        merge_shards(tmp_path, progress=False)


def test_one_process_build_on_unmerged_shards_is_refused_or_overwritten(tmp_path, reference):
    build(tmp_path, shard=(0, 2))
    with pytest.raises(IndexMismatchError, match="shards of a build shared by several processes"):
        build(tmp_path)
    assert_same_index(build(tmp_path, overwrite=True), reference)
    assert not (tmp_path / "shards").exists()


@pytest.mark.parametrize("shard", [(2, 2), (-1, 2), (0, 0), (1.0, 2), "0/2", (0, 1, 2)])
def test_bad_shard_arguments(tmp_path, shard):
    with pytest.raises(InputError, match="shard"):
        build(tmp_path, shard=shard)


def test_shard_needs_a_path_and_no_process_group():
    with pytest.raises(InputError, match="needs a path"):
        build(None, shard=(0, 2))
    with pytest.raises(InputError, match="no torch.distributed process group"):
        build(None, distributed=True)


def test_shard_ranges_are_contiguous_and_balanced():
    for total in (0, 1, 2, 151, 1000):
        for n in (1, 2, 3, 7):
            ranges = [shard_range(total, i, n) for i in range(n)]
            assert ranges[0][0] == 0 and ranges[-1][1] == total
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
            sizes = [b - a for a, b in ranges]
            assert max(sizes) - min(sizes) <= 1


# -- sharded queries without a process group -----------------------------------------------


@pytest.fixture(scope="module")
def synthetic():
    rng = np.random.default_rng(0)
    f = rng.standard_normal((151, 16)).astype(np.float32)
    f[5] = 0  # a sample without a gradient direction
    return nnsim_hooks.GradientIndex.from_features(
        f, normalize=True, labels=rng.integers(0, 3, 151), probabilities=rng.dirichlet(np.ones(3), 151),
        norms=rng.uniform(0.5, 2, 151))


@pytest.mark.parametrize("shards", [1, 2, 3, 7])
def test_sharded_queries_sum_the_shares_statistics(synthetic, shards):
    idx = synthetic
    q = ShardedQueries(idx, shards=shards)
    pairs = [
        (q.density(), idx.density()),
        (q.density(include_self=False), idx.density(include_self=False)),
        (q.effective_neighbors("raw", include_self=False), idx.effective_neighbors("raw", include_self=False)),
        (q.denoising_factor(), idx.denoising_factor()),
        (q.consistency(), idx.consistency()),
        (q.consistency("cosine", values=np.asarray(idx.probabilities)[:, :2]),
         idx.consistency("cosine", values=np.asarray(idx.probabilities)[:, :2])),
        (q.neighbor_counts(0.2, include_self=False),
         idx.neighbor_counts(0.2, include_self=False, method="exact", progress=False)),
        (q.soft_counts(3), idx.soft_counts(3, progress=False)),
    ]
    for got, want in pairs:
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    s, i = q.neighbors(5, batch_size=17)
    s_ref, i_ref = idx.neighbors(5, progress=False)
    np.testing.assert_array_equal(i, i_ref)
    np.testing.assert_allclose(s, s_ref, rtol=1e-5, atol=1e-6)
    queries = np.asarray(idx.features[:4])
    s, i = q.search(queries, 3, exclude=[[0], [1, 2], [], [3]])
    s_ref, i_ref = idx.search(queries, 3, exclude=[[0], [1, 2], [], [3]])
    np.testing.assert_array_equal(i, i_ref)


def test_attach_unwraps_a_parallel_wrapper():
    model = make_cnn()
    x = dataset().tensors[0][:3]
    with nnsim_hooks.attach(model, sketch_dim=DIM) as bare:
        want, fp = bare.features(x), bare.fingerprint()
    wrapped = torch.nn.DataParallel(model)
    with nnsim_hooks.attach(wrapped, sketch_dim=DIM) as h:
        assert h.model is model
        torch.testing.assert_close(h.features(x), want)
        assert h.fingerprint() == fp
    assert nnsim_hooks.attach(wrapped).detach() is None and not nnsim_hooks.detach(wrapped)


def test_coverage_names_overlaps_and_gaps():
    from nnsim_hooks.index.sharded.shards import _coverage_problems

    assert _coverage_problems(10, [(0, 6, "a"), (5, 10, "b")]) == ["samples 5..5 are in both a and b"]
    assert _coverage_problems(10, [(0, 3, "a"), (5, 8, "b")]) == ["samples 3..4 are in no shard",
                                                                 "samples 8..9 are in no shard"]
    assert _coverage_problems(4, [(0, 2, "a"), (2, 2, "empty"), (2, 4, "b")]) == []


def test_a_shard_being_written_is_refused_to_a_second_writer(tmp_path):
    from nnsim_hooks.index.folder.lock import FolderLock

    with FolderLock(tmp_path / "shards" / "rank-00001-of-00002", "test: the first writer"):
        with pytest.raises(StoreError, match="test: the first writer"):
            build(tmp_path, shard=(1, 2))
        with pytest.raises(StoreError, match="being written by .*test: the first writer"):
            build(tmp_path, overwrite=True)  # nor deleted under its writer by a one-process overwrite
    assert (tmp_path / "shards" / "rank-00001-of-00002").is_dir()
