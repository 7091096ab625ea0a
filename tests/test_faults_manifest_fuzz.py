"""The manifest readers are total (issue 17): any edit of a valid index or shard manifest
loads, or is refused with one of the project's errors; never a KeyError, TypeError,
RecursionError or OverflowError from deep inside. Property-based (hypothesis) mutations,
plus the cases the issue's probe found, each named in the message."""

from __future__ import annotations

import copy
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nnsim_hooks
from index_synthetic import clustered_rows, softmax
from nnsim_hooks.errors import NnsimError, StoreError
from nnsim_hooks.index import GradientIndex, load_index
from nnsim_hooks.index.sharded.shards import check_shards, merge_shards

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dist_common import BATCH, DIM, dataset, make_cnn  # noqa: E402

N, D = 40, 8


@pytest.fixture(scope="module")
def ivf_folder(tmp_path_factory):
    """A finished index with every optional part: labels, probabilities, an index.faiss."""
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("fuzz") / "ix"
    GradientIndex.from_features(clustered_rows(N, D, seed=2), labels=rng.integers(0, 3, N),
                                probabilities=softmax(rng.standard_normal((N, 3))), path=path, index="ivf",
                                index_options={"nlist": 2})
    return path


@pytest.fixture(scope="module")
def sharded_folder(tmp_path_factory):
    """The two finished shards of a build by two processes, not merged."""
    path = tmp_path_factory.mktemp("fuzz") / "sharded"
    with nnsim_hooks.attach(make_cnn(), sketch_dim=DIM, seed=0) as h:
        for i in range(2):
            h.build_index(dataset(), path, batch_size=BATCH, progress=False, shard=(i, 2))
    return path


# -- mutations of a JSON document ---------------------------------------------------------

_FIELD_NAMES = ["kind", "factory", "options", "shape", "dtype", "file", "sha256", "bytes", "count", "dim", "start",
                "stop", "total", "index", "shard", "fingerprint", "sketch", "columns", "complete", "feature_dim",
                "checksums", "ids", "valid", "nlist", "nprobe", "use_targets", "length", "first", "ranges", "version"]
_SCALARS = (st.none() | st.booleans() | st.integers(-3, 70) | st.sampled_from([2**31, 2**63, 2**70, -2**70])
            | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12)
            | st.sampled_from(_FIELD_NAMES + ["float32", "int64", "bool", "Flat", "IVF2,Flat", "ivf", "flat", "0" * 64,
                                              "../manifest.json", "features.bin"]))
_VALUES = st.recursive(_SCALARS, lambda inner: st.lists(inner, max_size=3)
                       | st.dictionaries(st.sampled_from(_FIELD_NAMES) | st.text(max_size=6), inner, max_size=3),
                       max_leaves=8)


def _slots(value, out):
    """Every (container, key) of a parsed JSON document."""
    if isinstance(value, dict):
        for key in value:
            out.append((value, key))
            _slots(value[key], out)
    elif isinstance(value, list):
        for i in range(len(value)):
            out.append((value, i))
            _slots(value[i], out)
    return out


@st.composite
def mutated(draw, document):
    doc = copy.deepcopy(document)
    for _ in range(draw(st.integers(1, 3))):
        slots = _slots(doc, [])
        container, key = draw(st.sampled_from(slots))
        action = draw(st.sampled_from(["replace", "replace", "delete", "add", "nest"]))
        if action == "replace":
            container[key] = draw(_VALUES)
        elif action == "delete":
            del container[key]
        elif action == "nest":
            container[key] = [container[key]] if draw(st.booleans()) else {"x": container[key]}
        elif isinstance(container, dict):
            container[draw(st.sampled_from(_FIELD_NAMES))] = draw(_VALUES)
        else:
            container.append(draw(_VALUES))
    return doc


def _use(idx):
    """What a user does first with a loaded index: each step must work or raise our error."""
    repr(idx)
    len(idx)
    queries = np.asarray(idx.features[:2])
    idx.search(queries, 3)
    idx.table()


# -- the index manifest -----------------------------------------------------------------------


_QUICK = settings(max_examples=10, deadline=None,
                  suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
_MANY = settings(max_examples=500, deadline=None,
                 suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def load_edited_index(ivf_folder, data):
    file = ivf_folder / "manifest.json"
    original = file.read_text()
    manifest = data.draw(mutated(json.loads(original)))
    try:
        file.write_text(json.dumps(manifest))
        try:
            _use(load_index(ivf_folder))
        except NnsimError:
            pass
    finally:
        file.write_text(original)


@_QUICK
@given(data=st.data())
def test_any_edit_of_an_index_manifest_loads_or_is_refused(ivf_folder, data):
    load_edited_index(ivf_folder, data)


@pytest.mark.slow
@_MANY
@given(data=st.data())
def test_many_edits_of_an_index_manifest_load_or_are_refused(ivf_folder, data):
    load_edited_index(ivf_folder, data)


def edit(folder, change):
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize("change, field", [
    (lambda m: m["columns"]["features"].update(shape=[2**70]), r"column 'features' has row shape \[1180591620717411303424\]"),
    (lambda m: m["columns"]["probabilities"].update(shape=[2**31 - 1]), r"column 'probabilities' has rows of"),
    (lambda m: m.update(fingerprint="abc"), r'"fingerprint" must be an object or null'),
    (lambda m: m["index"].pop("kind"), r'"index.kind" must be one of'),
    (lambda m: m["index"].update(options=None), r'"index.options" must be an object'),
    (lambda m: m["index"]["options"].update(ef_search=4), r'"index.options" has \'ef_search\', which a ivf index'),
    (lambda m: m["index"]["options"].update(nprobe=0), r'"index.options.nprobe" must be a positive integer'),
    (lambda m: m["index"].pop("options"), r'"index.options" lacks \[\'niter\', \'nlist\''),  # found by the fuzz
    (lambda m: m.update(nonfinite_rows=[40]), r'"nonfinite_rows" must be a list of row numbers below "count" = 40'),
    (lambda m: m["index"]["options"].pop("niter"), r'"index.options" lacks \[\'niter\'\], which a stored ivf'),
    (lambda m: m["index_file"].update(sha256=5), r'"index_file.sha256" must be a SHA-256'),
    (lambda m: m["index_file"].pop("count"), r'"index_file" lacks \[\'count\'\]'),
    (lambda m: m.update(count=2**70), r'"count" must be a non-negative integer, got 1180591620717411303424'),
    (lambda m: m.update(format_version=True), r"uses index format version true"),
    (lambda m: m.update(source="x"), r'"source" must be an object'),
    (lambda m: m["source"].update(use_targets="no"), r'"source.use_targets" must be true or false'),
    (lambda m: m.update(dataset={"length": "x"}), r'"dataset.length" must be a sample count'),
    (lambda m: m.update(sketch=[1]), r'"sketch" must be an object or null'),
    (lambda m: m["checksums"]["files"]["ids.bin"].update(crc32="x"), r'"checksums.files.\'ids.bin\'.crc32" must be a list of 32-bit integers'),
    (lambda m: m.update(shards={"count": 2, "ranges": [[0, 5]]}), r'"shards.ranges" must be 2 pairs'),
    (lambda m: m.update(task=["classification"]), r'"task" must be a string'),
])
def test_each_field_is_typed_and_bounded(ivf_folder, tmp_path, change, field):
    folder = tmp_path / "ix"
    shutil.copytree(ivf_folder, folder)
    edit(folder, change)
    with pytest.raises(StoreError, match=field) as info:
        load_index(folder)
    assert str(folder / "manifest.json") in str(info.value)


@pytest.mark.parametrize("depth", [40, 100_000])
def test_a_deeply_nested_manifest_is_refused(ivf_folder, tmp_path, depth):
    folder = tmp_path / "ix"
    shutil.copytree(ivf_folder, folder)
    text = (folder / "manifest.json").read_text().rstrip()
    (folder / "manifest.json").write_text(text[:-1] + ', "extra": ' + "[" * depth + "]" * depth + "}")
    with pytest.raises(StoreError, match=r"nests deeper than 32 levels") as info:
        load_index(folder)
    assert str(folder / "manifest.json") in str(info.value)


def test_an_oversized_or_binary_manifest_is_refused(ivf_folder, tmp_path):
    folder = tmp_path / "ix"
    shutil.copytree(ivf_folder, folder)
    (folder / "manifest.json").write_bytes(b"\xff\xfe" * 10)
    with pytest.raises(StoreError, match="is not UTF-8 text"):
        load_index(folder)
    (folder / "manifest.json").write_text('{"x": "' + "a" * (17 << 20) + '"}')
    with pytest.raises(StoreError, match="characters long"):
        load_index(folder)


# -- ids.bin and valid.bin --------------------------------------------------------------------


@pytest.mark.parametrize("name, offset, byte", [("ids", 8 * 5, b"\x07"), ("valid", 3, b"\x00"),
                                                ("valid", 4, b"\x01")])
def test_an_edited_ids_or_valid_file_is_refused(ivf_folder, tmp_path, name, offset, byte):
    folder = tmp_path / "ix"
    shutil.copytree(ivf_folder, folder)
    assert load_index(folder).valid.all()
    with open(folder / f"{name}.bin", "r+b") as f:
        f.seek(offset)
        if f.read(1) == byte:  # make sure the byte changes
            byte = bytes([byte[0] ^ 2])
        f.seek(offset)
        f.write(byte)
    with pytest.raises(StoreError, match=rf"'{folder / name}.bin' was changed after it was written"):
        load_index(folder)


def test_checksums_are_recorded_by_every_writer(ivf_folder, tmp_path):
    import hashlib

    import zlib

    def recorded(folder):  # the block CRC-32s of nnsim_hooks.index.folder.integrity, one block per small file
        m = json.loads((folder / "manifest.json").read_text())
        files = m["checksums"]["files"]
        return all(files[f"{n}.bin"]["crc32"] == [zlib.crc32((folder / f"{n}.bin").read_bytes())]
                   for n in ("ids", "valid"))

    assert recorded(ivf_folder)  # from_features (finish)
    load_index(ivf_folder).save(tmp_path / "copy")
    assert recorded(tmp_path / "copy")  # save
    idx = load_index(tmp_path / "copy")
    idx.rebuild_index("flat")
    assert recorded(tmp_path / "copy") and len(load_index(tmp_path / "copy")) == N


# -- the shard manifests --------------------------------------------------------------------


def merge_edited_shards(sharded_folder, data):
    which = data.draw(st.sampled_from(["rank-00000-of-00002", "rank-00001-of-00002"]))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "sharded"
        shutil.copytree(sharded_folder, folder)
        file = folder / "shards" / which / "manifest.json"
        file.write_text(json.dumps(data.draw(mutated(json.loads(file.read_text())))))
        try:
            check_shards(folder)
            _use(merge_shards(folder, progress=False))
        except NnsimError:
            pass


@settings(_QUICK, max_examples=5)
@given(data=st.data())
def test_any_edit_of_a_shard_manifest_merges_or_is_refused(sharded_folder, data):
    merge_edited_shards(sharded_folder, data)


@pytest.mark.slow
@settings(_MANY, max_examples=300)
@given(data=st.data())
def test_many_edits_of_a_shard_manifest_merge_or_are_refused(sharded_folder, data):
    merge_edited_shards(sharded_folder, data)


@pytest.mark.parametrize("change, field", [
    (lambda m: m["shard"].update(start="zero"), r'"shard.start" must be a sample number'),
    (lambda m: m["shard"].update(stop=10**9), r'"shard.stop" must be a sample number'),
    (lambda m: m["shard"].pop("total"), r'"shard" lacks \[\'total\'\]'),
    (lambda m: m["shard"].update(index=2), r'"shard.index" must be a shard number below shard.count = 2'),
    (lambda m: m.update(shard=[0, 2]), r'"shard" must be an object or null'),
])
def test_each_shard_field_is_typed_and_bounded(sharded_folder, tmp_path, change, field):
    folder = tmp_path / "sharded"
    shutil.copytree(sharded_folder, folder)
    manifest = folder / "shards" / "rank-00001-of-00002" / "manifest.json"
    edit(manifest.parent, change)
    with pytest.raises(NnsimError, match=field) as info:
        merge_shards(folder, progress=False)
    assert str(manifest) in str(info.value)
    assert (folder / "shards" / "rank-00000-of-00002" / "ids.bin").is_file()  # nothing deleted
