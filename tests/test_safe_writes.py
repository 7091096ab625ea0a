"""Nothing outside its folder, ever (issue 17, the writers): links planted where the
project keeps its files, shards linked in from elsewhere, reuse checks on every build
path, overwrite in a safe order, FAISS replacements a kill cannot break, leftovers of a
killed audit, and the umask's permissions. See the README's "What nnsim_hooks writes, and
what it never touches"."""

from __future__ import annotations

import json
import os
import shutil
import stat
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

import nnsim_hooks
from nnsim_hooks.audit.output_folder import MARKER, prepare_out_dir
from nnsim_hooks.errors import IndexMismatchError, StoreError
from nnsim_hooks.index import GradientIndex, load_index
from nnsim_hooks.index.sharded.shards import merge_shards

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dist_common import BATCH, DIM, N, dataset, make_cnn  # noqa: E402
from index_synthetic import clustered_rows, faiss_file, faiss_files  # noqa: E402

PRECIOUS = b"somebody else's file: never written, cut or deleted\n" * 4


def build(path=None, data=None, seed=0, **options):
    with nnsim_hooks.attach(make_cnn(), sketch_dim=DIM, seed=seed) as h:
        return h.build_index(dataset() if data is None else data, path, batch_size=BATCH, progress=False, **options)


def other_data():
    """Another dataset of the same length (the same shapes, other values)."""
    x, y = dataset().tensors
    return TensorDataset(x.flip(0).contiguous(), y.flip(0).contiguous())


@pytest.fixture(scope="module")
def reference():
    return build()


def rows():
    return clustered_rows(60, 16, seed=3)


def victim(tmp_path, name="victim.bin", data=PRECIOUS) -> Path:
    """A file outside every folder the project is given."""
    path = tmp_path / "elsewhere" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def interrupted_build(folder):
    """A build of ``dataset()`` stopped after some committed batches."""
    class Stops(torch.utils.data.Dataset):
        def __len__(self):
            return N

        def __getitem__(self, i):
            if i == 70:
                raise RuntimeError("unreadable")
            return dataset()[i]

    with pytest.raises(Exception):
        build(folder, data=Stops())


# -- a link where the project keeps its own file: refused, the target untouched ----------------


def _lock(tmp_path):
    target = victim(tmp_path)
    (tmp_path / "ix").mkdir()
    (tmp_path / "ix" / ".lock").symlink_to(target)
    return target, lambda: build(tmp_path / "ix")


def _column_on_resume(tmp_path):
    interrupted_build(tmp_path / "ix")
    features = tmp_path / "ix" / "features.bin"
    target = victim(tmp_path, data=features.read_bytes() + PRECIOUS)  # longer than committed: would be cut
    features.unlink()
    features.symlink_to(target)
    return target, lambda: build(tmp_path / "ix")


def _column_on_create(tmp_path):
    target = victim(tmp_path)
    (tmp_path / "ix").mkdir()
    (tmp_path / "ix" / "valid.bin").symlink_to(target)  # a leftover of a killed first write, planted as a link
    (tmp_path / "ix" / "manifest.json").write_text("{}")
    return target, lambda: GradientIndex.from_features(rows(), path=tmp_path / "ix", overwrite=True)


def _manifest(tmp_path):
    GradientIndex.from_features(rows(), path=tmp_path / "ix")
    manifest = tmp_path / "ix" / "manifest.json"
    target = victim(tmp_path, data=manifest.read_bytes())
    manifest.unlink()
    manifest.symlink_to(target)
    return target, lambda: load_index(tmp_path / "ix").rebuild_index("hnsw", progress=False)


def _faiss_file(tmp_path):
    GradientIndex.from_features(rows(), path=tmp_path / "ix", index="hnsw")
    target = victim(tmp_path)
    (tmp_path / "ix" / "index.faiss").symlink_to(target)  # deleted by a rebuild: never through the link
    return target, lambda: load_index(tmp_path / "ix").rebuild_index("flat", progress=False)


def _merged_column(tmp_path):
    for i in range(2):
        build(tmp_path / "ix", shard=(i, 2))
    target = victim(tmp_path)
    (tmp_path / "ix" / "features.bin").symlink_to(target)
    return target, lambda: merge_shards(tmp_path / "ix", progress=False)


def _shard_folder(tmp_path):
    target = tmp_path / "elsewhere" / "shard"
    target.mkdir(parents=True)
    (tmp_path / "ix" / "shards").mkdir(parents=True)
    (tmp_path / "ix" / "shards" / "rank-00000-of-00002").symlink_to(target)
    return target, lambda: build(tmp_path / "ix", shard=(0, 2))


def _saved_index(tmp_path):
    GradientIndex.from_features(rows(), path=tmp_path / "ix")
    target = victim(tmp_path)
    (tmp_path / "ix" / "index.faiss").symlink_to(target)
    idx = GradientIndex.from_features(rows())
    return target, lambda: idx.save(tmp_path / "ix", overwrite=True)


def _finished_audit(out: Path):
    out.mkdir(parents=True)
    (out / MARKER).write_text(json.dumps({"state": "done", "config": {}}))


def _audit_demo_folder(tmp_path):
    other = tmp_path / "elsewhere" / "other-audit" / "demo"
    other.mkdir(parents=True)
    target = other / "model.pt"
    target.write_bytes(PRECIOUS)
    _finished_audit(tmp_path / "out")
    (tmp_path / "out" / "demo").symlink_to(other)
    return target, lambda: prepare_out_dir(tmp_path / "out", {}, overwrite=True)


def _audit_index_folder(tmp_path):
    GradientIndex.from_features(rows(), path=tmp_path / "elsewhere" / "index")
    _finished_audit(tmp_path / "out")
    (tmp_path / "out" / "index").symlink_to(tmp_path / "elsewhere" / "index")
    return tmp_path / "elsewhere" / "index" / "features.bin", lambda: prepare_out_dir(tmp_path / "out", {},
                                                                                       overwrite=True)


def _audit_output_file(tmp_path):
    target = victim(tmp_path)
    _finished_audit(tmp_path / "out")
    (tmp_path / "out" / "table.csv").symlink_to(target)
    return target, lambda: prepare_out_dir(tmp_path / "out", {}, overwrite=True)


def _audit_marker(tmp_path):
    target = victim(tmp_path, data=json.dumps({"state": "done", "config": {}}).encode())
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / MARKER).symlink_to(target)
    return target, lambda: prepare_out_dir(tmp_path / "out", {}, overwrite=True)


WRITERS = {
    "lock file": _lock,
    "column file, resumed (cut)": _column_on_resume,
    "column file, new store": _column_on_create,
    "manifest": _manifest,
    "old FAISS file of a rebuild": _faiss_file,
    "merged column": _merged_column,
    "shard folder": _shard_folder,
    "save over an index": _saved_index,
    "audit demo/ (overwrite)": _audit_demo_folder,
    "audit index/ (overwrite)": _audit_index_folder,
    "audit table.csv (overwrite)": _audit_output_file,
    "audit marker": _audit_marker,
}


def _snapshot(path: Path):
    if path.is_dir():
        return sorted(p.name for p in path.iterdir())
    return path.read_bytes()


#: writers that build with a model first (seconds each: the slow suite)
_BUILDS = {"lock file", "column file, resumed (cut)", "merged column", "shard folder"}


@pytest.mark.parametrize("writer", [pytest.param(w, marks=[pytest.mark.slow] if w in _BUILDS else []) for w in WRITERS])
def test_a_link_where_the_project_keeps_its_file_is_refused_and_its_target_untouched(tmp_path, writer):
    target, run = WRITERS[writer](tmp_path)
    before = _snapshot(target)
    with pytest.raises(StoreError, match="symbolic link") as err:
        run()
    assert "Remove the link" in str(err.value)
    assert target.exists() and _snapshot(target) == before


def test_a_faiss_temporary_planted_as_a_link_is_never_written(tmp_path):
    """FAISS writes through a descriptor of a new file (O_EXCL, a random name): the old
    fixed temporary name, planted as a link, is neither written nor deleted through."""
    GradientIndex.from_features(rows(), path=tmp_path / "ix")
    target = victim(tmp_path)
    (tmp_path / "ix" / ".index.faiss.tmp").symlink_to(target)
    idx = load_index(tmp_path / "ix").rebuild_index("hnsw", progress=False)
    assert idx.kind == "hnsw" and load_index(tmp_path / "ix").kind == "hnsw"
    assert target.read_bytes() == PRECIOUS and (tmp_path / "ix" / ".index.faiss.tmp").is_symlink()


@pytest.mark.slow
def test_the_folder_the_user_names_may_be_a_link(tmp_path, reference):
    (tmp_path / "real").mkdir()
    (tmp_path / "named").symlink_to(tmp_path / "real")
    idx = build(tmp_path / "named")
    np.testing.assert_allclose(np.asarray(idx.features), np.asarray(reference.features), atol=1e-5)
    assert (tmp_path / "real" / "manifest.json").is_file() and (tmp_path / "named").is_symlink()


# -- shards linked in from elsewhere: merged read-only, never deleted at the target -------------


@pytest.mark.slow
def test_a_shard_linked_from_another_disk_is_merged_and_kept(tmp_path, reference):
    build(tmp_path / "ix", shard=(0, 2))
    build(tmp_path / "other-disk", shard=(1, 2))
    far = tmp_path / "other-disk" / "shards" / "rank-00001-of-00002"
    before = {p.name: p.read_bytes() for p in far.iterdir()}
    link = tmp_path / "ix" / "shards" / "rank-00001-of-00002"
    link.symlink_to(far)
    idx = merge_shards(tmp_path / "ix", progress=False)
    np.testing.assert_array_equal(np.asarray(idx.ids), np.arange(N))
    np.testing.assert_allclose(np.asarray(idx.features), np.asarray(reference.features), atol=1e-5)
    assert {p.name: p.read_bytes() for p in far.iterdir()} == before, "the shard at the link's target is untouched"
    assert link.is_symlink() and not (tmp_path / "ix" / "shards" / "rank-00000-of-00002").exists()
    assert len(merge_shards(tmp_path / "ix", progress=False)) == N  # merged already: nothing fails on a rerun
    with pytest.raises(StoreError, match="symbolic link"):
        build(tmp_path / "ix", overwrite=True)  # an overwrite would delete it: refused, nothing deleted
    assert {p.name: p.read_bytes() for p in far.iterdir()} == before and len(load_index(tmp_path / "ix")) == N


# -- one reuse check on every build path ---------------------------------------------------------


@pytest.mark.slow
def test_a_shard_build_on_a_finished_index_of_other_data_is_refused(tmp_path):
    build(tmp_path / "ix", data=other_data())  # same length, other samples
    with pytest.raises(IndexMismatchError, match="first sample"):
        build(tmp_path / "ix", shard=(0, 2))
    with pytest.raises(IndexMismatchError, match="fingerprint|model"):
        build(tmp_path / "ix", data=other_data(), seed=1, shard=(1, 2))


@pytest.mark.slow
def test_leftover_shards_of_another_model_are_not_deleted_by_a_merge(tmp_path):
    build(tmp_path / "ix")  # a finished one-process index
    build(tmp_path / "b", seed=1, shard=(0, 2))
    shutil.move(str(tmp_path / "b" / "shards"), str(tmp_path / "ix" / "shards"))
    with pytest.raises(IndexMismatchError, match="shards it was not merged from; nothing is deleted"):
        merge_shards(tmp_path / "ix", progress=False)
    assert (tmp_path / "ix" / "shards" / "rank-00000-of-00002" / "features.bin").is_file()


# -- overwrite: every check before the first delete -----------------------------------------------


def _merge_killed_before_its_commit(folder, monkeypatch):
    import nnsim_hooks.index.sharded.shards as shards

    for i in range(2):
        build(folder, shard=(i, 2))
    with monkeypatch.context() as m:
        m.setattr(shards, "write_json_atomic", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
        with pytest.raises(KeyboardInterrupt):
            merge_shards(folder, progress=False)
    assert (folder / "features.bin").exists() and not (folder / "manifest.json").exists()


@pytest.mark.slow
def test_overwrite_after_a_merge_killed_midway_rebuilds(tmp_path, reference, monkeypatch):
    folder = tmp_path / "ix"
    _merge_killed_before_its_commit(folder, monkeypatch)
    idx = build(folder, overwrite=True)
    np.testing.assert_allclose(np.asarray(idx.features), np.asarray(reference.features), atol=1e-5)
    assert not (folder / "shards").exists()


@pytest.mark.slow
def test_an_overwrite_that_must_refuse_deletes_nothing(tmp_path, monkeypatch):
    folder = tmp_path / "ix"
    _merge_killed_before_its_commit(folder, monkeypatch)
    (folder / "shards" / "rank-00001-of-00002" / "notes.txt").write_text("mine")
    before = sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))
    with pytest.raises(StoreError, match="notes.txt") as err:
        build(folder, overwrite=True)
    assert "nothing in it was deleted" in str(err.value)
    assert sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) == before


# -- FAISS replaced commit-first: a kill leaves the old index or the new -------------------------


def test_a_rebuild_killed_before_its_commit_leaves_the_old_index(tmp_path, monkeypatch):
    import nnsim_hooks.index.search as search

    GradientIndex.from_features(rows(), path=tmp_path / "ix", index="hnsw")
    old = faiss_files(tmp_path / "ix")
    with monkeypatch.context() as m:
        m.setattr(search, "write_json_atomic", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
        with pytest.raises(KeyboardInterrupt):
            load_index(tmp_path / "ix").rebuild_index("sq8", progress=False)
    assert len(faiss_files(tmp_path / "ix")) == 2  # the new file is there, not committed
    idx = load_index(tmp_path / "ix")
    assert idx.kind == "hnsw" and faiss_file(tmp_path / "ix").name == old[0]
    assert idx.search(rows()[:3], 1)[1][:, 0].tolist() == [0, 1, 2]
    idx.rebuild_index("sq8", progress=False)  # the next writer deletes the uncommitted file
    assert faiss_files(tmp_path / "ix") == [faiss_file(tmp_path / "ix").name] != old


def test_a_reader_of_the_old_manifest_survives_a_rebuild(tmp_path):
    GradientIndex.from_features(rows(), path=tmp_path / "ix", index="hnsw")
    reader = load_index(tmp_path / "ix")  # manifest read, FAISS file not yet
    load_index(tmp_path / "ix").rebuild_index("sq8", progress=False)
    assert reader.search(rows()[:3], 1)[1][:, 0].tolist() == [0, 1, 2]


# -- a killed audit's temporary files; permissions ------------------------------------------------


def test_a_killed_audits_temporary_files_are_removed_by_the_next_run(tmp_path):
    out = tmp_path / "out"
    (out / "demo").mkdir(parents=True)
    (out / MARKER).write_text(json.dumps({"state": "running", "config": {"a": 1}}))
    (out / "index").mkdir()
    (out / "index" / "manifest.json").write_text(json.dumps({"count": 3}))
    leftovers = [out / ".table.csv.k2j3h4.tmp", out / ".report.html.x9y8.tmp", out / "demo" / ".model.pt.ab12.tmp"]
    for path in leftovers:
        path.write_bytes(b"partial")
    (out / ".thesis.tex.tmp").write_text("mine")
    assert prepare_out_dir(out, {"a": 1}) is True  # resumed
    assert not any(p.exists() for p in leftovers) and (out / ".thesis.tex.tmp").exists()


@pytest.mark.slow
@pytest.mark.parametrize("mask", [0o002, 0o027])
def test_every_file_and_folder_gets_the_umasks_permissions(tmp_path, mask, monkeypatch):
    old = os.umask(mask)
    try:
        for i in range(2):
            build(tmp_path / "merged", shard=(i, 2))
        merge_shards(tmp_path / "merged", index="hnsw", progress=False)
        idx = GradientIndex.from_features(rows(), path=tmp_path / "ff")
        idx.rebuild_index("sq8", progress=False)
        idx.save(tmp_path / "saved" / "ix")
        interrupted_build(tmp_path / "resumed")
    finally:
        os.umask(old)
    checked = 0
    for root in ("merged", "ff", "saved", "resumed"):
        for path in [tmp_path / root, *(tmp_path / root).rglob("*")]:
            want = (0o777 if path.is_dir() else 0o666) & ~mask
            assert oct(stat.S_IMODE(path.stat().st_mode)) == oct(want), path
            checked += 1
    assert checked > 20
