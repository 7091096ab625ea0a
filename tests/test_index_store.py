"""The index folder: saving, loading (memory-mapped), corruption, atomic writes, disk full."""

import errno
import json
import os

import numpy as np
import pytest

from index_synthetic import clustered_rows, faiss_file, faiss_files, softmax
from nnsim_hooks import load_index
from nnsim_hooks.errors import IndexMismatchError, InputError, StoreError
from nnsim_hooks.index import GradientIndex
from nnsim_hooks.atomic import write_json_atomic
from nnsim_hooks.index.folder.manifest import check_fingerprint, fingerprint_differences

N, D = 300, 16


@pytest.fixture(scope="module")
def idx():
    rows = clustered_rows(N, D, seed=5)
    rows[7] = np.nan
    rng = np.random.default_rng(0)
    return GradientIndex.from_features(rows, labels=rng.integers(0, 4, N), probabilities=softmax(rng.standard_normal((N, 4))),
                                       norms=rng.uniform(1, 2, N).astype(np.float32))


def assert_same_columns(a, b):
    assert set(a._columns) == set(b._columns)
    for name in a._columns:
        np.testing.assert_array_equal(np.asarray(a._columns[name]), np.asarray(b._columns[name]), err_msg=name)


def test_save_and_load_round_trip(idx, tmp_path):
    idx.save(tmp_path / "ix")
    loaded = load_index(tmp_path / "ix")
    assert_same_columns(idx, loaded)
    assert isinstance(loaded.features, np.memmap) and not loaded.features.flags.writeable
    assert not isinstance(load_index(tmp_path / "ix", mmap=False).features, np.memmap)
    np.testing.assert_allclose(loaded.density(), idx.density(), equal_nan=True)
    assert not loaded.valid[7] and np.isnan(loaded.density()[7])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ix"]  # no temporary folders left


def test_save_refuses_to_clobber(idx, tmp_path):
    idx.save(tmp_path / "ix")
    with pytest.raises(StoreError, match="overwrite=True"):
        idx.save(tmp_path / "ix")
    idx.save(tmp_path / "ix", overwrite=True)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "thesis.tex").write_text("precious")
    with pytest.raises(StoreError, match="not an nnsim_hooks index"):
        idx.save(tmp_path / "other", overwrite=True)
    assert (tmp_path / "other" / "thesis.tex").read_text() == "precious"
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError, match="is a file"):
        idx.save(tmp_path / "file")


def test_save_with_a_full_disk_leaves_nothing(idx, tmp_path, monkeypatch):
    idx.save(tmp_path / "old")
    real = os.write
    calls = {"n": 0}

    def write(fd, data):
        calls["n"] += 1
        if calls["n"] > 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data)

    with monkeypatch.context() as m:
        m.setattr(os, "write", write)
        with pytest.raises(StoreError, match="disk is full"):
            idx.save(tmp_path / "new")
        with pytest.raises(StoreError, match="disk is full"):
            idx.save(tmp_path / "old", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]
    assert_same_columns(idx, load_index(tmp_path / "old"))  # the old index is intact


def test_atomic_json_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    target = tmp_path / "manifest.json"
    write_json_atomic(target, {"a": 1})

    def fail(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(os, "write", fail)
        with pytest.raises(StoreError, match="disk is full"):
            write_json_atomic(target, {"a": 2})
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]


def test_corrupt_folders_are_store_errors(idx, tmp_path):
    with pytest.raises(StoreError, match="no manifest.json"):
        load_index(tmp_path)
    idx.save(tmp_path / "ix")
    manifest = tmp_path / "ix" / "manifest.json"
    good = manifest.read_text()
    # a column file cut short
    with open(tmp_path / "ix" / "features.bin", "r+b") as f:
        f.truncate(10 * D * 4)
    with pytest.raises(StoreError, match="holds 10 rows but the manifest commits 300"):
        load_index(tmp_path / "ix")
    idx.save(tmp_path / "ix", overwrite=True)
    manifest.write_text("{not json")
    with pytest.raises(StoreError, match="not valid JSON"):
        load_index(tmp_path / "ix")
    manifest.write_text(good.replace('"format_version": 1', '"format_version": 99'))
    with pytest.raises(StoreError, match="version 99"):
        load_index(tmp_path / "ix")
    manifest.write_text(json.dumps({"format": "something else"}))
    with pytest.raises(StoreError, match="not an nnsim_hooks index manifest"):
        load_index(tmp_path / "ix")


def test_from_features_into_a_folder(tmp_path):
    rows = clustered_rows(50, D, seed=1)
    idx = GradientIndex.from_features(rows, path=tmp_path / "ix", index="hnsw")
    assert idx.path == tmp_path / "ix" and faiss_files(tmp_path / "ix") == [faiss_file(tmp_path / "ix").name]
    with pytest.raises(StoreError, match="overwrite=True"):
        GradientIndex.from_features(rows, path=tmp_path / "ix")
    again = GradientIndex.from_features(rows[:20], path=tmp_path / "ix", overwrite=True)
    assert len(load_index(tmp_path / "ix")) == 20 and again.kind == "flat"
    assert not faiss_files(tmp_path / "ix")


def test_fingerprint_differences_say_what_differs():
    stored = {"model": {"weights": "aa", "class": "Net"}, "layers": ["a", "b"], "sketch": {"dim": 64, "seed": 0}}
    current = {"model": {"weights": "bb", "class": "Net"}, "layers": ["a", "c"], "sketch": {"dim": 64, "seed": 0}}
    diffs = fingerprint_differences(stored, current)
    assert any(d.startswith("model.weights: stored \"aa\", now \"bb\"") for d in diffs)
    assert any("layers" in d and '"b"' in d and '"c"' in d for d in diffs)
    assert not any("sketch" in d for d in diffs)
    with pytest.raises(IndexMismatchError, match="model.weights"):
        check_fingerprint(stored, current, "here")
    check_fingerprint(dict(stored, output="sum"), dict(stored, output="auto"), "here", unresolved_output=True)


def test_from_features_reads_a_memmap_block_by_block_and_cleans_up_on_bad_rows(tmp_path, monkeypatch):
    import nnsim_hooks.index.folder.persist as gi

    monkeypatch.setattr(gi, "BLOCK_BYTES", 16 * D * 4)  # blocks of 16 rows
    rows = clustered_rows(N, D, seed=2)
    raw = np.memmap(tmp_path / "raw.f32", dtype=np.float32, mode="w+", shape=(N, D))
    raw[:] = rows
    raw.flush()
    idx = GradientIndex.from_features(np.memmap(tmp_path / "raw.f32", dtype=np.float32, mode="r", shape=(N, D)),
                                      path=tmp_path / "ix")
    np.testing.assert_array_equal(idx.features, rows)
    bad = rows.copy()
    bad[N - 1] *= 3  # in the last block: found after the first blocks were written
    with pytest.raises(InputError, match=f"row {N - 1} has norm 3"):
        GradientIndex.from_features(bad, path=tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
