"""Fault injection on index folders: nothing lost, nothing silently wrong.

Real SIGKILLs at chosen writes (tests/fault_child.py), Ctrl-C at chosen writes, two
writers, a full disk (a tiny tmpfs) and read-only folders (a tmpfs remounted read-only).
The oracle is always an uninterrupted build of the same data: after any fault, resuming
gives every column identical to it (features to float32 rounding), or the fault is a clear
error and the folder still resumes.
"""

import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

import nnsim_hooks
from nnsim_hooks.errors import StoreError
from nnsim_hooks.index import GradientIndex, load_index
from nnsim_hooks.index.folder.lock import LOCK_FILE

N, IN, CLASSES, BS, DIM = 96, 6, 3, 16, 32
CHILD = Path(__file__).with_name("fault_child.py")
COLUMNS = ("features", "ids", "valid", "norms", "labels", "predictions", "probabilities")


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(IN, 12), torch.nn.Tanh(), torch.nn.Linear(12, CLASSES)).eval()


class Samples(Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


@pytest.fixture(scope="module")
def xy():
    g = torch.Generator().manual_seed(3)
    return torch.randn(N, IN, generator=g), torch.randint(0, CLASSES, (N,), generator=g)


@pytest.fixture(scope="module")
def reference(xy):
    """An uninterrupted build, in memory: the oracle."""
    with nnsim_hooks.attach(make_model(), sketch_dim=DIM) as h:
        idx = h.build_index(Samples(*xy), batch_size=BS, progress=False)
    return {name: np.array(idx.column(name)) for name in COLUMNS}


def build(xy, folder, **options):
    with nnsim_hooks.attach(make_model(), sketch_dim=DIM) as h:
        return h.build_index(Samples(*xy), folder, batch_size=BS, progress=False, **options)


def assert_same_as_reference(idx, reference):
    assert len(idx) == N
    for name in COLUMNS:
        got = np.asarray(idx.column(name))
        if got.dtype.kind == "f":
            np.testing.assert_allclose(got, reference[name], rtol=0, atol=1e-6, err_msg=name)
        else:
            np.testing.assert_array_equal(got, reference[name], err_msg=name)


def manifest(folder):
    return json.loads((Path(folder) / "manifest.json").read_text())


@pytest.fixture(scope="module")
def inputs(xy, tmp_path_factory):
    path = tmp_path_factory.mktemp("inputs") / "inputs.pt"
    torch.save({"x": xy[0], "y": xy[1], "state": make_model().state_dict(), "dim": DIM, "batch_size": BS}, path)
    return path


def child(inputs, folder, *args):
    env = dict(os.environ, PYTHONPATH=str(Path(nnsim_hooks.__file__).parent.parent), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, str(CHILD), str(inputs), str(folder), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# -- SIGKILL at chosen writes -----------------------------------------------------------------
# os.write calls of a build of 96 samples in batches of 16 with 7 columns: 1 the empty
# manifest; then per batch 7 column appends and 1 commit (2-8 and 9 for the first batch);
# 50 the commit "extraction complete"; 51 the commit "complete".


@pytest.mark.slow
@pytest.mark.parametrize("kill_at, committed", [
    (1, None),  # in the very first manifest write: a .manifest.json.*.tmp is left, no manifest
    (4, 0),  # in the first batch's appends, before its first commit
    (9, 0),  # in the first commit's manifest write: the batch is written, not committed
    (50, 96),  # in the commit that ends extraction
])
def test_sigkill_anywhere_then_resume_equals_uninterrupted(inputs, xy, reference, tmp_path, kill_at, committed):
    folder = tmp_path / "ix"
    proc = child(inputs, folder, "--kill-after-writes", str(kill_at))
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == -9, f"the child was not killed (rc {proc.returncode}): {out} {err}"
    if committed is None:
        assert not (folder / "manifest.json").exists()
        assert any(p.name.startswith(".manifest.json.") for p in folder.iterdir()), "a torn temporary manifest"
    else:
        m = manifest(folder)
        assert m["count"] == committed and not m["complete"]
        if committed == 0 and kill_at > 4:
            assert (folder / "features.bin").stat().st_size > 0, "uncommitted rows were written"
    assert (folder / LOCK_FILE).exists(), "the killed writer's lock record is left behind"
    with pytest.raises(StoreError, match="incomplete|no manifest.json"):
        load_index(folder)
    idx = build(xy, folder)
    assert_same_as_reference(idx, reference)
    assert_same_as_reference(load_index(folder), reference)
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) == [], "no temporary or lock file left"


def test_write_numbering_of_a_full_build(xy, tmp_path, monkeypatch):
    """The numbering above is what a full build does (so the kills land where the comments say)."""
    counter = InterruptAt(None)
    monkeypatch.setattr(os, "write", counter)
    build(xy, tmp_path / "ix")
    assert counter.calls == 51


# -- Ctrl-C at chosen writes ------------------------------------------------------------------


class InterruptAt:
    """os.write that raises KeyboardInterrupt at its n-th call (after writing half the bytes)."""

    def __init__(self, n):
        self.n, self.calls, self.real = n, 0, os.write

    def __call__(self, fd, data):
        self.calls += 1
        if self.calls == self.n:
            view = memoryview(data).cast("B")
            self.real(fd, view[: len(view) // 2])
            raise KeyboardInterrupt
        return self.real(fd, data)


@pytest.mark.parametrize("interrupt_at", [1, 3, 9, 17, 51])
def test_ctrl_c_anywhere_leaves_a_folder_that_resumes(xy, reference, tmp_path, monkeypatch, interrupt_at):
    folder = tmp_path / "ix"
    with monkeypatch.context() as m:
        m.setattr(os, "write", InterruptAt(interrupt_at))
        with pytest.raises(KeyboardInterrupt):  # stays a KeyboardInterrupt, not another error
            build(xy, folder)
    assert not (folder / LOCK_FILE).exists(), "the lock is released on Ctrl-C"
    assert_same_as_reference(build(xy, folder), reference)


def test_ctrl_c_while_overwrite_removes_the_old_index(xy, reference, tmp_path, monkeypatch):
    folder = tmp_path / "ix"
    GradientIndex.from_features(np.eye(20, 8, dtype=np.float32)[np.arange(20) % 8], path=folder, index="hnsw")
    real = os.unlink

    def unlink(path, *a, **k):
        if str(path).endswith(".faiss"):
            raise KeyboardInterrupt
        return real(path, *a, **k)

    with monkeypatch.context() as m:
        m.setattr(os, "unlink", unlink)
        with pytest.raises(KeyboardInterrupt):
            build(xy, folder, overwrite=True)
    m = manifest(folder)
    assert m["count"] == 0 and m["columns"] == {}, "the new empty manifest went first"
    assert_same_as_reference(build(xy, folder), reference)  # resumes as an empty store


# -- two writers ------------------------------------------------------------------------------


@pytest.mark.slow
def test_second_writer_and_reader_are_told_who_writes(inputs, xy, reference, tmp_path):
    folder = tmp_path / "ix"
    proc = child(inputs, folder, "--delay", "0.02")
    try:
        assert proc.stdout.readline().strip() == "started"
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if manifest(folder)["count"] >= BS:
                    break
            except (FileNotFoundError, json.JSONDecodeError):
                pass
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.02)
        with pytest.raises(StoreError, match=rf"being written by process {proc.pid} on host .*build_index"):
            build(xy, folder)
        with pytest.raises(StoreError, match=rf"being built by process {proc.pid} .*wait for that build"):
            load_index(folder)
        with pytest.raises(StoreError, match=rf"being written by process {proc.pid}"):
            GradientIndex.from_features(np.eye(4, dtype=np.float32), path=folder, overwrite=True)
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait()
    assert_same_as_reference(build(xy, folder), reference)


# -- full disk and read-only folders (a tmpfs; root only) -------------------------------------


@pytest.fixture()
def tmpfs(tmp_path):
    """A mounted tmpfs at tmp_path/"fs" and a function to remount it with options."""
    mount_point = tmp_path / "fs"
    mount_point.mkdir()
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(mount_point)],
                              capture_output=True, text=True)
    except FileNotFoundError:
        pytest.skip("no mount command: a tmpfs cannot be mounted here")
    if done.returncode != 0:
        pytest.skip(f"mounting a tmpfs needs root (mount said: {done.stderr.strip()})")

    def remount(options):
        subprocess.run(["mount", "-o", f"remount,{options}", str(mount_point)], check=True)

    try:
        yield mount_point, remount
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_full_disk_keeps_what_was_committed_and_resumes(tmpfs, xy, reference):
    fs, remount = tmpfs
    remount("size=40k")  # 4 KiB pages: 10 files, two batches committed, then the disk is full
    with pytest.raises(StoreError, match="disk is full") as info:
        build(xy, fs / "ix")
    assert "run build_index again with the same path to resume" in str(info.value)
    committed = manifest(fs / "ix")["count"]
    assert 0 < committed < N and committed % BS == 0
    remount("size=4m")
    assert_same_as_reference(build(xy, fs / "ix"), reference)


def test_read_only_folders_are_clear_errors(tmpfs, xy, reference, tmp_path):
    fs, remount = tmpfs
    remount("size=4m")
    build(xy, fs / "ix", index="hnsw")
    remount("ro")
    idx = load_index(fs / "ix")  # reading works
    assert_same_as_reference(idx, reference)
    assert idx.search(np.asarray(idx.features[:2]), 3)[1][:, 0].tolist() == [0, 1]
    with pytest.raises(StoreError, match="read-only"):
        idx.rebuild_index("flat", progress=False)
    with pytest.raises(StoreError, match="read-only"):
        build(xy, fs / "new")
    with pytest.raises(StoreError, match="read-only"):
        build(xy, fs / "ix", overwrite=True)
    pytest.importorskip("pandas")
    with pytest.raises(StoreError, match="read-only"):
        nnsim_hooks.audit(make_model(), Samples(*xy), out_dir=fs / "audit", progress=False, sketch_dim=8, k=3)
    assert sorted(p.name for p in fs.iterdir()) == ["ix"]


def test_read_only_without_root_is_simulated(xy, tmp_path, monkeypatch):
    """Where no tmpfs can be mounted (and chmod does not stop root): os.open raising EROFS."""
    real = os.open

    def read_only(path, flags, *a, **k):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and str(path).startswith(str(tmp_path / "ro")):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real(path, flags, *a, **k)

    (tmp_path / "ro").mkdir()
    monkeypatch.setattr(os, "open", read_only)
    with pytest.raises(StoreError, match=r"locking '.*ro/ix/\.lock' failed: the file system is read-only"):
        build(xy, tmp_path / "ro" / "ix")
