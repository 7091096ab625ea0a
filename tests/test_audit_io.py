"""The saved folder, the output-folder rules, and resuming an interrupted audit."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.sparse import load_npz
from torch.utils.data import Dataset

import nnsim_hooks
from nnsim_hooks.audit import AuditResult, demo
from nnsim_hooks.errors import StoreError
from nnsim_hooks.index import load_index

pytestmark = pytest.mark.slow  # every test audits the trained digits CNN (seconds each)


class Counting(Dataset):
    """Digits that count reads and can stop the run (Ctrl-C) at a given sample."""

    def __init__(self, images, labels, stop_at=None):
        self.images, self.labels, self.stop_at = images, labels, stop_at
        self.reads = []

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        if self.stop_at is not None and i == self.stop_at:
            raise KeyboardInterrupt
        self.reads.append(i)
        return self.images[i], int(self.labels[i])


@pytest.fixture(scope="module")
def small():
    data = demo.noisy_digits(0.1, seed=0, limit=120)
    model = demo.small_cnn(width=4).eval()
    return model, data


def run(model, ds, out, **kw):
    return nnsim_hooks.audit(model, ds, out_dir=out, progress=False, sketch_dim=64, k=5, batch_size=16, **kw)


def test_saved_folder_holds_everything(small, tmp_path):
    model, data = small
    result = run(model, Counting(data.images, data.noisy_labels), tmp_path / "a")
    out = tmp_path / "a"
    for name in ("report.html", "table.csv", "table.parquet", "per_class.csv", "summary.json", "knn_graph.npz",
                 "nnsim-audit.json"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())  # strict JSON: NaN would not parse back equal
    assert summary["samples"] == 120
    csv = pd.read_csv(out / "table.csv", index_col="sample")
    parquet = pd.read_parquet(out / "table.parquet")
    np.testing.assert_allclose(csv["label_issue_score"], result.table["label_issue_score"], equal_nan=True)
    assert parquet["label"].tolist() == result.table["label"].tolist()
    graph = load_npz(out / "knn_graph.npz")
    assert graph.shape == (120, 120) and graph.nnz == 5 * 120
    index = load_index(out / "index")
    assert len(index) == 120
    loaded = AuditResult.load(out)
    pd.testing.assert_frame_equal(loaded.table, result.table, check_dtype=False)
    assert json.loads((out / "nnsim-audit.json").read_text())["state"] == "done"


def test_existing_folders(small, tmp_path):
    model, data = small
    ds = Counting(data.images, data.noisy_labels)
    out = tmp_path / "b"
    run(model, ds, out)
    with pytest.raises(StoreError, match="already holds a finished audit"):
        run(model, ds, out)
    run(model, ds, out, overwrite=True)  # replaced
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    for overwrite in (False, True):
        with pytest.raises(StoreError, match="not empty and holds no nnsim audit"):
            run(model, ds, foreign, overwrite=overwrite)
    assert (foreign / "thesis.tex").read_text() == "precious"
    assert sorted(p.name for p in foreign.iterdir()) == ["thesis.tex"]


def test_unfinished_audit_of_another_configuration_is_refused(small, tmp_path):
    model, data = small
    out = tmp_path / "c"
    with pytest.raises(KeyboardInterrupt):
        run(model, Counting(data.images, data.noisy_labels, stop_at=50), out)
    with pytest.raises(StoreError, match="unfinished audit of another configuration"):
        nnsim_hooks.audit(model, Counting(data.images, data.noisy_labels), out_dir=out, progress=False,
                          sketch_dim=32, k=5, batch_size=16)


def test_interrupted_audit_resumes(small, tmp_path):
    model, data = small
    out = tmp_path / "d"
    first = Counting(data.images, data.noisy_labels, stop_at=70)
    with pytest.raises(KeyboardInterrupt):
        run(model, first, out)
    stored = load_index_count(out / "index")
    assert 0 < stored <= 70
    again = Counting(data.images, data.noisy_labels)
    resumed = run(model, again, out, save=False)  # no report yet: its pictures would read samples too
    # the probe reads sample 0, the memory probes the first 8, then the neighbour index checks the data's first and last
    # samples (the data fingerprint) and resumes at the first sample it lacks; then the
    # density index (output "contrast", not started yet) reads them all, recording the
    # fingerprint (sample 0 twice: the determinism check) at its first commit
    fingerprint_check, fingerprint_record = [0, 119], [0, 0, 119]
    memory_probes = [0, 0] + list(range(8))  # warm-up, 1 sample, 8 samples (nnsim_hooks.audit.batch_memory)
    assert again.reads == ([0] + memory_probes + fingerprint_check + list(range(stored, 120)) + list(range(16)) + fingerprint_record
                           + list(range(16, 120)))
    fresh = nnsim_hooks.audit(model, Counting(data.images, data.noisy_labels), progress=False, sketch_dim=64, k=5,
                              batch_size=16)
    cols = ["label_issue_score", "density", "similarity_1", "knn_similarity", "effective_neighbors"]
    pd.testing.assert_frame_equal(resumed.table[cols], fresh.table[cols], atol=1e-5, check_dtype=False)
    assert (resumed.table["neighbor_1"] == fresh.table["neighbor_1"]).mean() > 0.98
    resumed.save(out)  # the same run's folder: saving finishes it
    assert json.loads((out / "nnsim-audit.json").read_text())["state"] == "done"


def load_index_count(path):
    manifest = json.loads((path / "manifest.json").read_text())
    return int(manifest["count"])


def test_save_of_an_in_memory_result(small, tmp_path):
    model, data = small
    result = nnsim_hooks.audit(model, Counting(data.images, data.noisy_labels), progress=False, sketch_dim=32, k=3)
    out = result.save(tmp_path / "e")
    assert (out / "report.html").is_file() and (out / "index" / "manifest.json").is_file()
    with pytest.raises(StoreError, match="finished audit"):
        result.save(tmp_path / "e")
    result.save(tmp_path / "e", overwrite=True)
    torch.manual_seed(0)


def test_a_run_that_failed_before_storing_anything_does_not_block_the_next(small, tmp_path):
    model, data = small
    out = tmp_path / "f"

    class Bad(Counting):
        def __getitem__(self, i):
            return "not a tensor", 0

    with pytest.raises(Exception, match="needs tensors"):
        run(model, Bad(data.images, data.noisy_labels), out)
    result = run(model, Counting(data.images, data.noisy_labels), out)  # another configuration, accepted
    assert result.summary["samples"] == 120


def test_every_saved_file_is_durable_and_has_the_usual_permissions(small, tmp_path, monkeypatch):
    """One writer for the audit and the index: each file is renamed into place, the rename
    made durable by syncing its folder, and it gets the umask's permissions (not the 0600
    of a temporary file)."""
    import os

    import nnsim_hooks.safe_files as atomic  # every file is written there

    synced = []
    real_sync = atomic.fsync_dir
    monkeypatch.setattr(atomic, "fsync_dir", lambda folder: (synced.append(os.path.abspath(folder)), real_sync(folder)))
    model, data = small
    out = tmp_path / "g"
    run(model, Counting(data.images, data.noisy_labels), out)
    mask = os.umask(0o022)
    os.umask(mask)
    assert atomic.current_umask() == mask
    for path in (out / "table.csv", out / "summary.json", out / "report.html", out / "nnsim-audit.json",
                 out / "index" / "manifest.json"):
        assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~mask), path
    assert str(out) in synced and str(out / "index") in synced
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
