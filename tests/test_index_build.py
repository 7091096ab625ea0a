"""build_index end to end with a tiny real model: data forms, stored columns, resuming after
a failure or a kill, mismatches, disk full, empty data."""

import errno
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset, WeightedRandomSampler

import nnsim_hooks
from nnsim_hooks.errors import DataError, ExtractionError, IndexMismatchError, StoreError
from index_synthetic import faiss_file, faiss_files

N, IN, CLASSES, BS, DIM = 90, 6, 3, 16, 32


def make_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(IN, 12), torch.nn.Tanh(), torch.nn.Linear(12, CLASSES)).eval()


@pytest.fixture(scope="module")
def xy():
    g = torch.Generator().manual_seed(1)
    return torch.randn(N, IN, generator=g), torch.randint(0, CLASSES, (N,), generator=g)


@pytest.fixture()
def handle():
    h = nnsim_hooks.attach(make_model(), sketch_dim=DIM)
    yield h
    h.detach()


@pytest.fixture(scope="module")
def reference(xy):
    """Features of all samples in one call, and the model's outputs: the oracle for stored rows."""
    x, y = xy
    model = make_model()
    with nnsim_hooks.attach(model, sketch_dim=DIM) as h:
        fb = h.extract(x, y)
        # without targets, output="auto" (contrast) differentiates the predicted class instead of the label
        unlabelled = h.extract(x)
        return dict(features=fb.features.detach().numpy(), norms=fb.norms.detach().numpy(),
                    unlabelled=unlabelled.features.detach().numpy(), unlabelled_norms=unlabelled.norms.detach().numpy(),
                    logits=model(x).detach(), fingerprint=h.fingerprint())


def assert_matches_reference(idx, reference, xy, labels=True):
    x, y = xy
    assert len(idx) == N
    np.testing.assert_array_equal(idx.ids, np.arange(N))
    # the built-in outputs stay label-free by default (use_targets=None): predicted class
    np.testing.assert_allclose(idx.features, reference["unlabelled"], atol=2e-6)
    np.testing.assert_allclose(idx.norms, reference["unlabelled_norms"], rtol=1e-5)
    assert idx.valid.all()
    np.testing.assert_array_equal(idx.predictions, reference["logits"].argmax(1).numpy())
    np.testing.assert_allclose(idx.probabilities, torch.softmax(reference["logits"], 1).numpy(), atol=1e-6)
    if labels:
        np.testing.assert_array_equal(idx.labels, y.numpy())
    else:
        assert idx.labels is None


class Items(Dataset):
    """(x, y) samples; raises on the samples of ``fail_at`` while it is set; optional delay."""

    def __init__(self, x, y, fail_at=None, delay=0.0):
        self.x, self.y, self.fail_at, self.delay = x, y, fail_at, delay

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        if self.fail_at is not None and i in self.fail_at:
            raise RuntimeError(f"cannot read sample {i}")
        time.sleep(self.delay)
        return self.x[i], self.y[i]


class Stream(IterableDataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __iter__(self):
        return iter(zip(self.x, self.y))


# -- what gets stored ----------------------------------------------------------------------


def test_build_stores_features_and_columns(handle, xy, reference, tmp_path):
    x, y = xy
    idx = handle.build_index(TensorDataset(x, y), tmp_path / "ix", batch_size=BS, progress=False)
    assert_matches_reference(idx, reference, xy)
    m = json.loads((tmp_path / "ix" / "manifest.json").read_text())
    assert m["complete"] and m["count"] == N and m["feature_dim"] == DIM and m["task"] == "classification"
    assert m["fingerprint"] == reference["fingerprint"] and m["sketch"]["dim"] == DIM
    assert {"torch", "faiss", "numpy", "nnsim_hooks"} <= set(m["versions"])
    assert m["index"]["kind"] == "flat" and m["created"]
    # the raw files are what the manifest says they are
    spec = m["columns"]["features"]
    raw = np.memmap(tmp_path / "ix" / spec["file"], dtype=spec["dtype"], mode="r", shape=(N, *spec["shape"]))
    np.testing.assert_array_equal(raw, idx.features)
    assert isinstance(nnsim_hooks.load_index(tmp_path / "ix").features, np.memmap)


@pytest.mark.parametrize("form", ["dataloader", "list", "generator", "iterable_dataset", "bare_dataset", "items"])
def test_every_data_form_gives_the_same_index(handle, xy, reference, form):
    x, y = xy
    data = {
        "dataloader": lambda: DataLoader(TensorDataset(x, y), batch_size=7, shuffle=False),
        "list": lambda: [(x[i : i + 20], y[i : i + 20]) for i in range(0, N, 20)],
        "generator": lambda: (x[i : i + 11] for i in range(0, N, 11)),
        "iterable_dataset": lambda: Stream(x, y),
        "bare_dataset": lambda: TensorDataset(x),
        "items": lambda: Items(x, y),
    }[form]()
    idx = handle.build_index(data, batch_size=BS, progress=False)
    with_labels = form not in ("generator", "bare_dataset")
    assert_matches_reference(idx, reference, xy, labels=with_labels)


def test_label_free_features_still_store_labels(handle, xy, reference, tmp_path):
    x, y = xy
    idx = handle.build_index(TensorDataset(x, y), tmp_path / "ix", batch_size=BS, progress=False, use_targets=False)
    np.testing.assert_allclose(idx.features, reference["unlabelled"], atol=2e-6)
    np.testing.assert_array_equal(idx.labels, y.numpy())
    with pytest.raises(IndexMismatchError, match="use_targets=False"):
        handle.build_index(TensorDataset(x, y), tmp_path / "ix", progress=False, use_targets=True)


def test_targets_are_used_only_when_asked(handle, xy, reference, tmp_path):
    x, y = xy
    idx = handle.build_index(TensorDataset(x, y), batch_size=BS, progress=False, use_targets=True)
    np.testing.assert_allclose(idx.features, reference["features"], atol=2e-6)
    np.testing.assert_allclose(idx.norms, reference["norms"], rtol=1e-5)


def test_regression_outputs_are_stored(xy, tmp_path):
    x, _ = xy
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(IN, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)).eval()
    with nnsim_hooks.attach(model, output="sum", sketch_dim=DIM) as h:
        idx = h.build_index(x, tmp_path / "ix", progress=False)  # a bare tensor: its rows are the samples
        assert idx.manifest["task"] == "regression" and idx.predictions is None
        np.testing.assert_allclose(idx.outputs, model(x).detach().numpy(), atol=1e-6)
        assert np.isfinite(idx.consistency()).all()


def test_search_inputs_and_handle_checks(handle, xy, reference):
    x, y = xy
    idx = handle.build_index(TensorDataset(x, y), batch_size=BS, progress=False)
    s1, i1 = idx.search_inputs(handle, x[:5], 4, targets=y[:5], exclude=np.arange(5))
    s2, i2 = idx.search(reference["features"][:5], 4, exclude=np.arange(5))
    np.testing.assert_array_equal(i1, i2)
    with nnsim_hooks.attach(make_model(seed=7), sketch_dim=DIM) as other:
        with pytest.raises(IndexMismatchError, match="model.weights"):
            idx.search_inputs(other, x[:5], 4)


# -- bad data --------------------------------------------------------------------------------


@pytest.mark.parametrize("sampler", ["shuffle", "weighted"])
def test_shuffling_loader_is_refused(handle, xy, sampler):
    ds = TensorDataset(*xy)
    loader = (DataLoader(ds, batch_size=8, shuffle=True) if sampler == "shuffle"
              else DataLoader(ds, batch_size=8, sampler=WeightedRandomSampler(torch.ones(N), N)))
    with pytest.raises(DataError, match="shuffle=False"):
        handle.build_index(loader, progress=False)


@pytest.mark.parametrize("empty", ["dataset", "list", "generator", "zero_rows"])
def test_empty_data_is_a_clear_error(handle, tmp_path, empty):
    data = {
        "dataset": TensorDataset(torch.zeros(0, IN)),
        "list": [],
        "generator": (b for b in []),
        "zero_rows": [torch.zeros(0, IN)],
    }[empty]
    with pytest.raises(DataError, match="empty|no samples"):
        handle.build_index(data, tmp_path / "ix", progress=False)
    assert not (tmp_path / "ix").exists()  # no empty index left behind


def test_batches_must_all_have_targets_or_none(handle, xy):
    x, y = xy
    with pytest.raises(DataError, match="targets, or none"):
        handle.build_index([(x[:10], y[:10]), x[10:20]], progress=False)


def test_model_failure_names_the_batch(handle, xy, tmp_path):
    x, y = xy
    batches = [(x[:10], y[:10]), (x[10:20], y[10:20]), (x[20:30, :4], y[20:30])]
    with pytest.raises(ExtractionError, match=r"batch 2 \(samples 20 to 29\) failed: InputError") as info:
        handle.build_index(batches, tmp_path / "ix", progress=False)
    assert "resume" in str(info.value)
    assert json.loads((tmp_path / "ix" / "manifest.json").read_text())["count"] == 20


# -- resuming --------------------------------------------------------------------------------


def _manifest(path):
    return json.loads((Path(path) / "manifest.json").read_text())


def test_failed_batch_then_resume_equals_uninterrupted(handle, xy, reference, tmp_path):
    x, y = xy
    data = Items(x, y, fail_at={50})  # batch 3 = samples 48..63
    with pytest.raises(ExtractionError, match=r"loading batch 3 \(samples from 48 on\) failed: RuntimeError: cannot read sample 50"):
        handle.build_index(data, tmp_path / "ix", batch_size=BS, progress=False)
    m = _manifest(tmp_path / "ix")
    assert m["count"] == 48 and not m["complete"]
    with pytest.raises(StoreError, match=r"incomplete \(48 samples"):
        nnsim_hooks.load_index(tmp_path / "ix")
    data.fail_at = None
    idx = handle.build_index(data, tmp_path / "ix", batch_size=BS, progress=False)
    assert_matches_reference(idx, reference, xy)
    assert _manifest(tmp_path / "ix")["complete"]


def test_resume_cuts_uncommitted_rows_and_handles_other_batch_sizes(handle, xy, reference, tmp_path):
    x, y = xy
    first = [(x[a:b], y[a:b]) for a, b in ((0, 16), (16, 32), (32, 40))]  # 40 samples, then a bad batch
    with pytest.raises(ExtractionError):
        handle.build_index(first + [(x[40:56, :2], y[40:56])], tmp_path / "ix", progress=False)
    assert _manifest(tmp_path / "ix")["count"] == 40
    # a crash between writing a batch and committing it leaves extra bytes
    for name, extra in (("features.bin", 7 * DIM * 4 + 3), ("labels.bin", 5), ("norms.bin", 8)):
        with open(tmp_path / "ix" / name, "ab") as f:
            f.write(os.urandom(extra))
    # resume with batches of another size: the batch straddling sample 40 is cut
    again = [(x[i : i + 13], y[i : i + 13]) for i in range(0, N, 13)]
    idx = handle.build_index(again, tmp_path / "ix", progress=False)
    assert_matches_reference(idx, reference, xy)


@pytest.mark.slow
def test_killed_process_resumes_without_loss_or_duplicates(xy, reference, tmp_path):
    """A real SIGKILL halfway through extraction, then a resume in this process."""
    x, y = xy
    torch.save({"x": x, "y": y, "state": make_model().state_dict()}, tmp_path / "inputs.pt")
    script = textwrap.dedent(f"""
        import time, torch, nnsim_hooks
        from torch.utils.data import Dataset
        d = torch.load({str(tmp_path / "inputs.pt")!r})
        model = torch.nn.Sequential(torch.nn.Linear({IN}, 12), torch.nn.Tanh(), torch.nn.Linear(12, {CLASSES})).eval()
        model.load_state_dict(d["state"])
        class Slow(Dataset):
            def __len__(self): return len(d["x"])
            def __getitem__(self, i):
                time.sleep(0.03)
                return d["x"][i], d["y"][i]
        h = nnsim_hooks.attach(model, sketch_dim={DIM})
        h.build_index(Slow(), {str(tmp_path / "ix")!r}, batch_size={BS}, progress=False)
    """)
    env = dict(os.environ, PYTHONPATH=str(Path(nnsim_hooks.__file__).parent.parent), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", script], env=env)
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if _manifest(tmp_path / "ix")["count"] >= 2 * BS:
                    break
            except (FileNotFoundError, json.JSONDecodeError, KeyError):
                pass
            assert proc.poll() is None, "the build finished or crashed before it could be killed"
            time.sleep(0.02)
        proc.kill()
    finally:
        proc.wait()
    count = _manifest(tmp_path / "ix")["count"]
    assert 2 * BS <= count < N and count % BS == 0
    with nnsim_hooks.attach(make_model(), sketch_dim=DIM) as h:
        idx = h.build_index(Items(*xy), tmp_path / "ix", batch_size=BS, progress=False)
    assert_matches_reference(idx, reference, xy)


def test_finished_index_is_returned_without_extracting(handle, xy, tmp_path):
    x, y = xy
    handle.build_index(TensorDataset(x, y), tmp_path / "ix", progress=False)
    idx = handle.build_index(Items(x, y, fail_at=set(range(N))), tmp_path / "ix", index="hnsw", progress=False)
    assert idx.kind == "hnsw" and faiss_file(tmp_path / "ix").exists()
    with pytest.raises(IndexMismatchError, match="holds 90 samples but the data has 50"):
        handle.build_index(TensorDataset(x[:50], y[:50]), tmp_path / "ix", progress=False)


# -- mismatches --------------------------------------------------------------------------------


@pytest.mark.parametrize("change, where", [
    (dict(seed=1), "sketch.seed"),
    (dict(sketch_dim=16), "sketch.dim"),
    (dict(output="logit"), "output"),
    (dict(model_seed=5), "model.weights"),
])
def test_other_model_or_recipe_is_a_mismatch(xy, tmp_path, change, where):
    x, y = xy
    with nnsim_hooks.attach(make_model(), sketch_dim=DIM) as h:
        h.build_index(TensorDataset(x, y), tmp_path / "done", progress=False)
        with pytest.raises(ExtractionError):
            h.build_index(Items(x, y, fail_at={40}), tmp_path / "partial", batch_size=BS, progress=False)
    change = dict(change)
    model = make_model(change.pop("model_seed", 0))
    with nnsim_hooks.attach(model, **{"sketch_dim": DIM, **change}) as other:
        for folder in ("done", "partial"):
            with pytest.raises(IndexMismatchError, match=where):
                other.build_index(TensorDataset(x, y), tmp_path / folder, batch_size=BS, progress=False)
        with pytest.raises(IndexMismatchError, match=where):
            nnsim_hooks.load_index(tmp_path / "done", handle=other)
    assert _manifest(tmp_path / "partial")["count"] == 32  # untouched


def test_overwrite_and_foreign_folders(handle, xy, tmp_path):
    x, y = xy
    handle.build_index(TensorDataset(x[:20], y[:20]), tmp_path / "ix", progress=False)
    idx = handle.build_index(TensorDataset(x, y), tmp_path / "ix", overwrite=True, progress=False)
    assert len(idx) == N
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="not empty"):
        handle.build_index(TensorDataset(x, y), tmp_path / "foreign", progress=False)
    assert (tmp_path / "foreign" / "notes.txt").read_text() == "mine"


# -- disk full ---------------------------------------------------------------------------------


def _fail_writes_after(monkeypatch, n_calls):
    real = os.write
    calls = {"n": 0}

    def write(fd, data):
        calls["n"] += 1
        if calls["n"] > n_calls:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data)

    monkeypatch.setattr(os, "write", write)


@pytest.mark.parametrize("after", [0, 8, 9, 16, 30])  # creating, committing batch 0, appending batch 1, ...
def test_disk_full_during_extraction(handle, xy, reference, tmp_path, monkeypatch, after):
    x, y = xy
    ds = TensorDataset(x, y)
    with monkeypatch.context() as m:
        _fail_writes_after(m, after)
        with pytest.raises(StoreError, match="disk is full"):
            handle.build_index(ds, tmp_path / "ix", batch_size=BS, progress=False)
    folder = tmp_path / "ix"
    if (folder / "manifest.json").exists():
        m = _manifest(folder)
        count = m["count"]
        assert count % BS == 0 and not m["complete"]
        for spec in m["columns"].values():  # no partial rows left behind
            row = int(np.dtype(spec["dtype"]).itemsize * np.prod(spec["shape"], dtype=int))
            assert (folder / spec["file"]).stat().st_size == count * row
        assert not list(folder.glob(".*.tmp"))
    idx = handle.build_index(ds, folder, batch_size=BS, progress=False)
    assert_matches_reference(idx, reference, xy)


def test_disk_full_while_writing_the_faiss_index(handle, xy, tmp_path, monkeypatch):
    import faiss

    x, y = xy

    def no_space(index, writer):  # the temporary file exists already (ours, created with O_EXCL)
        raise RuntimeError("Error in faiss::FileIOWriter: write error: No space left on device")

    with monkeypatch.context() as m:
        m.setattr(faiss, "write_index", no_space)
        with pytest.raises(StoreError, match="FAISS index"):
            handle.build_index(TensorDataset(x, y), tmp_path / "ix", index="hnsw", progress=False)
    assert not faiss_files(tmp_path / "ix") and not list((tmp_path / "ix").glob(".*"))
    assert not _manifest(tmp_path / "ix")["complete"]
    idx = handle.build_index(Items(x, y, fail_at=set(range(N))), tmp_path / "ix", index="hnsw", progress=False)
    assert idx.kind == "hnsw" and len(idx) == N  # features were kept: no re-extraction


def test_multi_output_features_agree_with_the_handle(xy):
    """output="full" (d = 3 whitened outputs): the index's density is the row sum of the
    handle's own sketched similarity matrix."""
    x, _ = xy
    with nnsim_hooks.attach(make_model(), output="full", sketch_dim=DIM) as h:
        idx = h.build_index(x[:40], progress=False, task="classification")
        assert idx.dim == CLASSES * DIM and idx.probabilities.shape == (40, CLASSES)
        sims = h.similarity(x[:40], exact=False).detach().double().numpy()
    np.testing.assert_allclose(idx.density(), sims.sum(1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(idx.soft_counts(2, progress=False), (np.clip(sims, 0, None) ** 2).sum(1), rtol=1e-4)
