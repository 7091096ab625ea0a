"""Cheap loads: block checksums recorded at commit, checked where a reader touches the
rows; non-finite rows recorded when written; load_index never reads features.bin whole."""

import json

import numpy as np
import pytest

from index_synthetic import clustered_rows
from nnsim_hooks.errors import StoreError
from nnsim_hooks.index import GradientIndex, load_index
from nnsim_hooks.index.folder import integrity
from nnsim_hooks.index.folder.integrity import BlockSums, CheckedRows
from nnsim_hooks.index.folder.manifest import new_manifest
from nnsim_hooks.index.folder.store import ColumnSpec, Store

D = 64
ROW = D * 4
# small blocks, so that a small index has several (the sizes are read when files are written and read)
CHECKSUM_BLOCK = 64 << 10
PER_BLOCK = CHECKSUM_BLOCK // ROW


@pytest.fixture(scope="module", autouse=True)
def small_blocks():
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(integrity, "CHECKSUM_BLOCK", CHECKSUM_BLOCK)
        mp.setattr(integrity, "CHECK_WHOLE_BYTES", CHECKSUM_BLOCK // 2)  # features are checked by block
        yield


@pytest.fixture(scope="module")
def big(tmp_path_factory, small_blocks):
    """An index of three and a half checksum blocks of features (features checked by block)."""
    n = int(3.5 * PER_BLOCK)
    folder = tmp_path_factory.mktemp("big") / "ix"
    GradientIndex.from_features(clustered_rows(n, D, seed=4), path=folder)
    return folder, n


@pytest.fixture
def never_scan(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("load_index scanned every feature row")

    monkeypatch.setattr(integrity, "nonfinite_rows", refuse)


def _with_flipped_byte(folder, tmp_path, row):
    """A copy of the folder with one byte of feature row ``row`` changed (same size)."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    with open(copy / "features.bin", "r+b") as f:
        f.seek(row * ROW + 5)
        byte = f.read(1)
        f.seek(row * ROW + 5)
        f.write(bytes([byte[0] ^ 0x55]))
    return copy


def test_block_sums_continue_across_appends_like_one_pass():
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, size=CHECKSUM_BLOCK * 2 + 1234, dtype=np.uint8)
    one = BlockSums()
    one.feed(data)
    parts = BlockSums()
    for piece in np.array_split(data, 7):
        parts = BlockSums(parts.crcs, parts.size)  # as a reopened store continues from the manifest
        parts.feed(piece)
    import zlib

    want = [zlib.crc32(data[i : i + CHECKSUM_BLOCK].tobytes()) for i in range(0, len(data), CHECKSUM_BLOCK)]
    assert one.crcs == parts.crcs == want and one.size == parts.size == len(data)


def test_the_manifest_records_a_checksum_per_block_of_every_file(big):
    folder, n = big
    m = json.loads((folder / "manifest.json").read_text())
    files = m["checksums"]["files"]
    assert {"features.bin", "ids.bin", "valid.bin", "norms.bin"} <= set(files)
    assert files["features.bin"]["bytes"] == n * ROW and len(files["features.bin"]["crc32"]) == 4
    assert m["nonfinite_rows"] == [] and m["nonfinite_count"] == 0


def test_load_index_reads_no_feature_block(big, never_scan):
    folder, n = big
    idx = load_index(folder)
    assert isinstance(idx.features, CheckedRows)
    checker = idx.features._checker
    assert not checker.checked.any(), "loading read feature blocks"
    rows = np.asarray(idx.features[PER_BLOCK + 3 : PER_BLOCK + 10])  # rows inside block 1 only
    assert rows.shape == (7, D)
    assert checker.checked.tolist() == [False, True, False, False]


def test_a_changed_block_is_refused_when_touched_only(big, tmp_path, never_scan):
    folder, n = big
    copy = _with_flipped_byte(folder, tmp_path, row=2 * PER_BLOCK + 17)  # in block 2
    idx = load_index(copy)  # cheap: nothing read yet
    np.asarray(idx.features[:100])  # block 0 is fine
    np.asarray(idx.features[-5:])  # block 3 too
    with pytest.raises(StoreError, match=r"features.bin' was changed after it was written: block 2 .*rows"):
        idx.features[[5, 2 * PER_BLOCK + 20]]
    with pytest.raises(StoreError, match="block 2"):
        idx.density()  # a whole pass touches it too
    with pytest.raises(StoreError, match="block 2"):
        load_index(copy, mmap=False)  # read whole: checked whole


@pytest.mark.parametrize("name, row_bytes", [("ids.bin", 8), ("valid.bin", 1)])
def test_changed_ids_or_valid_are_refused_at_load(big, tmp_path, name, row_bytes):
    import shutil

    folder, n = big
    copy = tmp_path / "c"
    shutil.copytree(folder, copy)
    with open(copy / name, "r+b") as f:
        f.seek(row_bytes * 123)
        old = f.read(1)
        f.seek(row_bytes * 123)
        f.write(bytes([old[0] ^ 1]))
    with pytest.raises(StoreError, match=rf"{name}' was changed after it was written"):
        load_index(copy)


def test_nonfinite_rows_are_recorded_when_written_and_not_scanned_at_load(tmp_path, never_scan):
    rows = clustered_rows(40, D, seed=1)
    rows[[3, 30]] = np.nan  # e.g. another program's features, appended as they are
    store = Store.create(tmp_path / "ix", dict(new_manifest(None, {"data": "test"}), feature_dim=D))
    store.define_columns([ColumnSpec("features", "float32", (D,)), ColumnSpec("valid", "bool"),
                          ColumnSpec("ids", "int64"), ColumnSpec("norms", "float32")])
    for a in (0, 25):
        b = min(40, a + 25)
        store.append({"features": rows[a:b], "valid": np.ones(b - a, bool), "ids": np.arange(a, b),
                      "norms": np.ones(b - a, np.float32)})
        store.commit(extraction_complete=True)
    store.commit(complete=True, index={"kind": "flat", "options": {}, "factory": "Flat"})
    store.close()
    m = json.loads((tmp_path / "ix" / "manifest.json").read_text())
    assert m["nonfinite_rows"] == [3, 30] and m["nonfinite_count"] == 2
    with pytest.warns(RuntimeWarning, match=r"2 feature rows .* not finite .*ids \[3, 30\]"):
        idx = load_index(tmp_path / "ix")
    assert not idx.valid[3] and not idx.valid[30] and idx.n_valid == 38
    assert np.isfinite(np.asarray(idx.features[:40])).all()


def test_a_saved_copy_and_a_reopened_store_keep_valid_checksums(big, tmp_path, never_scan):
    folder, n = big
    idx = load_index(folder)
    idx.save(tmp_path / "saved")
    again = load_index(tmp_path / "saved")
    np.testing.assert_array_equal(np.asarray(again.features[: n]), np.asarray(idx.features[: n]))
