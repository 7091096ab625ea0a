"""Folders that were edited, crafted or mixed up: refused with a StoreError naming the file,
or (non-finite rows, k too large) handled with a warning; never a silently wrong number and
never a file deleted outside what the store wrote."""

import json
import shutil
import warnings

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset, TensorDataset

import nnsim_hooks
from index_synthetic import clustered_rows, faiss_file, softmax
from nnsim_hooks.errors import IndexMismatchError, InputError, StoreError
from nnsim_hooks.index import GradientIndex, load_index

N, D = 60, 8


@pytest.fixture()
def folder(tmp_path):
    rng = np.random.default_rng(0)
    GradientIndex.from_features(clustered_rows(N, D, seed=2), labels=rng.integers(0, 3, N),
                                probabilities=softmax(rng.standard_normal((N, 3))), path=tmp_path / "ix")
    return tmp_path / "ix"


def edit(folder, change):
    path = folder / "manifest.json"
    m = json.loads(path.read_text())
    change(m)
    path.write_text(json.dumps(m))


def _set(*path):
    """A change that sets manifest[path[0]][path[1]]... = path[-1]."""
    *keys, value = path

    def change(m):
        target = m
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value
    return change


@pytest.mark.parametrize("change, message", [
    (_set("count", -1), r'"count" must be a non-negative integer, got -1'),
    (_set("count", 1.5), r'"count" must be a non-negative integer'),
    (_set("columns", ["features", "ids"]), r'"columns" must be an object'),
    (_set("columns", "features", "dtype", "float16"), r"column 'features' has dtype 'float16'; the store writes it as float32"),
    (_set("columns", "ids", "dtype", "int32"), r"column 'ids' has dtype 'int32'; the store writes it as int64"),
    (_set("columns", "labels", "dtype", "complex256"), r"column 'labels' has dtype 'complex256'"),
    (_set("columns", "features", "shape", [4, 2]), r"column 'features' has row shape \[4, 2\]"),
    (_set("columns", "features", "shape", [4]), r"rows of shape \[4\] but \"feature_dim\" is 8"),
    (_set("columns", "features", "file", "../victim.txt"), r"names the file '../victim.txt'"),
    (_set("columns", "../../evil", {"dtype": "int64", "shape": []}), r"unknown column '../../evil'"),
    (lambda m: m["columns"].pop("valid"), r"needs the columns .*\['valid'\] are missing"),
    (_set("complete", "yes"), r'"complete" must be true or false'),
    (_set("index", [1]), r'"index" must be an object or null'),
])
def test_edited_manifests_are_refused(folder, change, message):
    edit(folder, change)
    with pytest.raises(StoreError, match=message) as info:
        load_index(folder)
    assert str(folder / "manifest.json") in str(info.value) and "Rebuild" in str(info.value)


def test_truncated_manifest_is_refused(folder):
    text = (folder / "manifest.json").read_text()
    (folder / "manifest.json").write_text(text[: len(text) // 2])
    with pytest.raises(StoreError, match="not valid JSON"):
        load_index(folder)


def test_overwrite_never_deletes_what_a_manifest_names(folder, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (folder / "notes.txt").write_text("mine")
    edit(folder, _set("columns", "features", "file", "../victim.txt"))
    GradientIndex.from_features(clustered_rows(10, D), path=folder, overwrite=True)
    assert victim.read_text() == "precious"
    assert (folder / "notes.txt").read_text() == "mine", "a file the store did not write is kept"
    assert len(load_index(folder)) == 10
    with nnsim_hooks.attach(torch.nn.Linear(3, 1), sketch_dim=4) as h:  # build_index's overwrite too
        edit(folder, _set("columns", "ids", "file", "../victim.txt"))
        h.build_index(torch.randn(5, 3), folder, overwrite=True, progress=False)
    assert victim.read_text() == "precious" and len(load_index(folder)) == 5


def test_a_folder_of_foreign_bin_files_is_never_cleaned(tmp_path):
    (tmp_path / "ix").mkdir()
    (tmp_path / "ix" / "features.bin").write_bytes(b"my own data")
    for overwrite in (False, True):
        with pytest.raises(StoreError, match=r"not empty \(features.bin\) and is not an nnsim_hooks index"):
            GradientIndex.from_features(clustered_rows(10, D), path=tmp_path / "ix", overwrite=overwrite)
    assert (tmp_path / "ix" / "features.bin").read_bytes() == b"my own data"


def test_leftover_temporary_manifest_does_not_block_a_new_build(tmp_path):
    (tmp_path / "ix").mkdir()
    (tmp_path / "ix" / ".manifest.json.k2j4_x9a.tmp").write_text('{"format": "nnsim')  # a killed first write
    (tmp_path / "ix" / ".lock").write_text('{"pid": 1}')
    idx = GradientIndex.from_features(clustered_rows(10, D), path=tmp_path / "ix")
    assert len(idx) == 10
    assert sorted(p.name for p in (tmp_path / "ix").iterdir()) == sorted(
        ["manifest.json", "features.bin", "ids.bin", "valid.bin", "norms.bin"])
    from nnsim_hooks.index.folder.schema import is_store_temporary

    assert is_store_temporary(".index.faiss.tmp") and not is_store_temporary(".thesis.tex.tmp")


@pytest.mark.parametrize("name", ["ids.bin", "features.bin", "probabilities.bin", "valid.bin"])
def test_column_files_of_the_wrong_size_are_refused(folder, name):
    with open(folder / name, "ab") as f:
        f.write(b"\0" * 3)
    with pytest.raises(StoreError, match=rf"{name}' holds 6\d rows( and 3 bytes)? but the manifest commits 60"):
        load_index(folder)


def test_non_finite_feature_rows_are_marked_invalid_with_a_warning(folder):
    clean = load_index(folder, mmap=False)
    features = np.array(clean.features)
    with open(folder / "features.bin", "r+b") as f:  # a NaN written over row 5, an Inf over row 40
        f.seek(5 * D * 4)
        f.write(np.full(D, np.nan, np.float32).tobytes())
        f.seek(40 * D * 4 + 8)
        f.write(np.float32(np.inf).tobytes())
    for mmap in (True, False):
        with pytest.warns(RuntimeWarning, match=r"2 feature rows .* not finite .*ids \[5, 40\]"):
            idx = load_index(folder, mmap=mmap)
        assert not idx.valid[5] and not idx.valid[40] and idx.valid.sum() == N - 2
        assert not idx.features.flags.writeable and np.isfinite(idx.features).all()
        density = idx.density()
        # oracle: brute-force sum of cosines over the other valid rows
        keep = np.ones(N, bool)
        keep[[5, 40]] = False
        gram = features[keep].astype(np.float64) @ features[keep].astype(np.float64).T
        np.testing.assert_allclose(density[keep], gram.sum(1), rtol=1e-5)
        assert np.isnan(density[[5, 40]]).all()
        _, ids = idx.search(features[:3], 4)
        assert not np.isin(ids, [5, 40]).any()
    stored = np.fromfile(folder / "features.bin", dtype=np.float32).reshape(N, D)
    assert np.isnan(stored[5]).all(), "the file itself is not modified"


def test_faiss_file_of_another_build_is_refused(tmp_path):
    rows = clustered_rows(N, D, seed=2)
    a = tmp_path / "a"
    GradientIndex.from_features(rows, path=a, index="hnsw")
    GradientIndex.from_features(rows[::-1].copy(), path=tmp_path / "b", index="hnsw")  # same size, other content
    GradientIndex.from_features(rows[:30], path=tmp_path / "c", index="hnsw")
    record = json.loads((a / "manifest.json").read_text())["index_file"]
    assert record["count"] == N and record["dim"] == D and len(record["sha256"]) == 64
    mine = faiss_file(a)
    shutil.copy(faiss_file(tmp_path / "b"), mine)
    idx = load_index(a)  # the size matches: the SHA-256 is checked when the file is read
    with pytest.raises(StoreError, match=r"\.faiss' does not belong to this index: its SHA-256"):
        idx.search(rows[:2], 3)
    shutil.copy(faiss_file(tmp_path / "c"), mine)
    with pytest.raises(StoreError, match=r"\.faiss' does not belong to this index: it has \d+ bytes"):
        load_index(a)
    mine.unlink()  # what the message advises: rebuilt from the stored features
    _, ids = load_index(a).search(rows[:2], 1)
    assert ids[:, 0].tolist() == [0, 1]


def test_rebuild_index_records_the_new_file(folder):
    idx = load_index(folder).rebuild_index("hnsw", progress=False)
    assert json.loads((folder / "manifest.json").read_text())["index_file"]["count"] == N
    assert load_index(folder).search(np.asarray(idx.features[:1]), 1)[1][0, 0] == 0
    load_index(folder).rebuild_index("flat", progress=False)
    assert json.loads((folder / "manifest.json").read_text())["index_file"] is None


# -- resuming with other data ---------------------------------------------------------------------


class Failing(Dataset):
    def __init__(self, x, y, fail_at=()):
        self.x, self.y, self.fail_at = x, y, fail_at

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        if i in self.fail_at:
            raise RuntimeError("interrupted")
        return self.x[i], self.y[i]


@pytest.fixture()
def interrupted(tmp_path):
    """A build of 120 samples stopped after 64 (batches of 16)."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(120, 5, generator=g), torch.randint(0, 3, (120,), generator=g)
    torch.manual_seed(0)
    h = nnsim_hooks.attach(torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)),
                           sketch_dim=16)
    with pytest.raises(nnsim_hooks.errors.ExtractionError):
        h.build_index(Failing(x, y, fail_at={64}), tmp_path / "ix", batch_size=16, progress=False)
    assert json.loads((tmp_path / "ix" / "manifest.json").read_text())["count"] == 64
    yield h, x, y, tmp_path / "ix"
    h.detach()


@pytest.mark.parametrize("n", [40, 100])
def test_resume_with_a_shorter_dataset_is_refused(interrupted, n):
    h, x, y, folder = interrupted
    with pytest.raises(IndexMismatchError, match=rf"unfinished build \(64 samples stored\) of other data[\s\S]*length: "
                                                 rf"120 samples when the build started, {n} now"):
        h.build_index(TensorDataset(x[:n], y[:n]), folder, batch_size=16, progress=False)


def test_resume_with_changed_samples_is_refused(interrupted):
    h, x, y, folder = interrupted
    for changed, which in ((0, "first sample \\(id 0\\)"), (119, "last sample \\(id 119\\)")):
        x2 = x.clone()
        x2[changed] += 1
        with pytest.raises(IndexMismatchError, match=which):
            h.build_index(TensorDataset(x2, y), folder, batch_size=16, progress=False)
    idx = h.build_index(TensorDataset(x, y), folder, batch_size=16, progress=False)  # the same data resumes
    assert len(idx) == 120 and np.array_equal(idx.ids, np.arange(120))
    with pytest.raises(IndexMismatchError, match="holds 120 samples but the data has 119"):
        h.build_index(TensorDataset(x[:119], y[:119]), folder, batch_size=16, progress=False)
    x2 = x.clone()
    x2[0] += 1
    with pytest.raises(IndexMismatchError, match="finished index of other data"):
        h.build_index(TensorDataset(x2, y), folder, batch_size=16, progress=False)


def test_random_augmentation_is_recorded_without_digests(tmp_path):
    class Noisy(Dataset):
        def __len__(self):
            return 20

        def __getitem__(self, i):
            return torch.randn(3)

    with nnsim_hooks.attach(torch.nn.Linear(3, 1), sketch_dim=4) as h:
        h.build_index(Noisy(), tmp_path / "ix", batch_size=8, progress=False)
    record = json.loads((tmp_path / "ix" / "manifest.json").read_text())["dataset"]
    assert record == {"length": 20, "first": None, "last": None, "files": None}


# -- k and empty batches -----------------------------------------------------------------------


def test_k_larger_than_the_index_is_clamped_with_a_warning():
    rows = clustered_rows(20, D, seed=1)
    idx = GradientIndex.from_features(rows)
    with pytest.warns(RuntimeWarning, match="k=50 is more than the 20 samples in the index; using k=20"):
        scores, ids = idx.search(rows[:2], 50)
    assert ids.shape == (2, 20) and sorted(ids[0].tolist()) == list(range(20))
    with pytest.warns(RuntimeWarning, match="k=50 is more than the 19 other samples"):
        _, ids = idx.neighbors(50, progress=False)
    assert ids.shape == (20, 19) and (ids >= 0).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        idx.neighbors(19, progress=False)  # no warning at the limit


def test_audit_k_is_clamped_and_gives_the_same_result_as_the_largest_k():
    pytest.importorskip("pandas")
    pytest.importorskip("sklearn")
    from nnsim_hooks.audit.run import usable_k

    assert usable_k(5, 100) == 5 and usable_k(1, 1) == 1
    with pytest.warns(RuntimeWarning, match="k=300 is more than the 24 neighbours"):
        assert usable_k(300, 25) == 24
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(25, 4, generator=g), torch.randint(0, 3, (25,), generator=g)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    options = dict(progress=False, sketch_dim=16, output="contrast", batch_size=32)
    exact = nnsim_hooks.audit(model, TensorDataset(x, y), k=24, **options)
    with pytest.warns(RuntimeWarning, match="using k=24"):
        large = nnsim_hooks.audit(model, TensorDataset(x, y), k=300, **options)
    cols = ["label_issue_score", "similarity_1", "knn_similarity"]
    np.testing.assert_allclose(large.table[cols].to_numpy(float), exact.table[cols].to_numpy(float), equal_nan=True)
    assert large.table["is_label_issue"].sum() == exact.table["is_label_issue"].sum()


def test_empty_batch_is_an_input_error():
    with nnsim_hooks.attach(torch.nn.Linear(3, 2), sketch_dim=4) as h:
        with pytest.raises(InputError, match=r"inputs hold no samples \(torch.float32 tensor of shape \[0, 3\]"):
            h.features(torch.empty(0, 3))
        with pytest.raises(InputError, match="no samples"):
            h.extract((torch.empty(0, 3),))


def test_audit_overwrite_removes_only_what_the_audit_wrote(tmp_path):
    from nnsim_hooks.audit.output_folder import MARKER, prepare_out_dir

    out = tmp_path / "out"
    GradientIndex.from_features(clustered_rows(10, D), path=out / "index", index="hnsw")
    GradientIndex.from_features(clustered_rows(10, D), path=out / "index-denoising")
    (out / "demo").mkdir()
    (out / "demo" / "model.pt").write_bytes(b"weights")
    for name in ("report.html", "table.csv", "summary.json"):
        (out / name).write_text("audit output")
    (out / MARKER).write_text(json.dumps({"state": "done", "config": {"a": 1}}))
    mine = [out / "notes.md", out / "index" / "my_labels.csv", out / "demo" / "mine.txt"]
    for path in mine:
        path.write_text("mine")
    with pytest.raises(StoreError, match="already holds a finished audit"):
        prepare_out_dir(out, {"a": 1})
    prepare_out_dir(out, {"a": 1}, overwrite=True)
    left = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    assert left == ["demo", "demo/mine.txt", "index", "index/my_labels.csv", MARKER, "notes.md"]
    assert all(path.read_text() == "mine" for path in mine)


def test_save_over_a_folder_with_your_files_is_refused(folder, tmp_path):
    (folder / "notes.txt").write_text("mine")
    idx = GradientIndex.from_features(clustered_rows(10, D))
    with pytest.raises(StoreError, match=r"holds an index and files the index did not write \(notes.txt\)"):
        idx.save(folder, overwrite=True)
    assert (folder / "notes.txt").read_text() == "mine" and len(load_index(folder)) == N
