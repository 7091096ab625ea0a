"""One writer per index folder: the advisory lock of nnsim_hooks.index.folder.lock."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from nnsim_hooks.errors import StoreError
from nnsim_hooks.index.folder.lock import LOCK_FILE, FolderLock, describe_holder, holder


def test_second_writer_is_refused_with_the_holder_named(tmp_path):
    with FolderLock(tmp_path / "ix", "build_index"):
        assert holder(tmp_path / "ix")["pid"] == os.getpid()
        with pytest.raises(StoreError, match=rf"process {os.getpid()} on host .*build_index"):
            FolderLock(tmp_path / "ix").acquire()
    assert holder(tmp_path / "ix") is None
    assert not (tmp_path / "ix" / LOCK_FILE).exists(), "a clean release leaves no lock file"
    FolderLock(tmp_path / "ix").acquire().release()  # free again


def test_lock_is_reentrant_on_one_object(tmp_path):
    lock = FolderLock(tmp_path)
    with lock, lock:
        assert lock.held
    assert not lock.held and describe_holder(tmp_path) is None


def test_a_file_path_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(StoreError, match="is a file"):
        FolderLock(tmp_path / "f").acquire()


@pytest.mark.slow
def test_lock_of_a_killed_process_is_taken_over(tmp_path, caplog):
    code = textwrap.dedent(f"""
        import os, sys
        from nnsim_hooks.index.folder.lock import FolderLock
        FolderLock({str(tmp_path)!r}, "doomed").acquire()
        print("locked", flush=True)
        sys.stdin.readline()
        os._exit(1)  # no release: the kernel drops the flock, the record stays
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(StoreError, match=f"process {proc.pid} .*doomed"):
            FolderLock(tmp_path).acquire()
        proc.kill()
        proc.wait(timeout=30)
    finally:
        proc.kill()
    record = json.loads((tmp_path / LOCK_FILE).read_text())
    assert record["pid"] == proc.pid, "the dead holder's record is still there"
    assert holder(tmp_path) is None, "but nobody holds the lock"
    with caplog.at_level("WARNING"), FolderLock(tmp_path, "heir"):
        assert holder(tmp_path)["purpose"] == "heir"
    assert f"process {proc.pid}" in caplog.text and "died" in caplog.text
