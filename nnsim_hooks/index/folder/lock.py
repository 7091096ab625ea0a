"""One writer per index folder: an advisory lock held for as long as a process writes.

The lock is ``fcntl.flock`` on ``<folder>/.lock``, a file that also records who holds it
(pid, host, purpose, start time) so that a refused writer can be told. The kernel drops a
flock when its holder exits, however it exits (kill -9 included): a lock file left by a
dead process is simply taken over, with a warning naming it. A clean release deletes the
file, so a finished folder holds no lock file. A second writer, in this
process or another, is refused with a :class:`~nnsim_hooks.errors.StoreError` naming the
holder. Readers do not take the lock: a store's readers only ever see committed rows
(:mod:`nnsim_hooks.index.folder.store`); :func:`holder` lets them name a writer still at work.

Where ``fcntl`` does not exist (Windows) the file is created exclusively instead, and a
record whose process no longer runs on this host counts as stale.

flock on network filesystems: NFSv4 and Lustre emulate it with POSIX locks, which works
across machines; older NFS may make it local to one machine. Use a local or a
lock-supporting filesystem for builds from several machines.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any, Dict, Optional, Union

from ...errors import StoreError
from ...atomic import describe_os_error
from ...safe_files import create_new, make_folder, open_lock_file, remove_file, remove_file_if_same, rewrite

try:  # pragma: no cover - platform dependent
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

logger = logging.getLogger(__name__)

LOCK_FILE = ".lock"
PathLike = Union[str, "os.PathLike[str]"]


def _record(purpose: str) -> Dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "purpose": purpose,
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def _describe(record: Optional[Dict[str, Any]]) -> str:
    if not record:
        return "another process (it left no record)"
    return (f"process {record.get('pid')} on host {record.get('host')} "
            f"({record.get('purpose', 'writing')}, since {record.get('since', '?')})")


def _read_record(file: Path) -> Optional[Dict[str, Any]]:
    try:
        record = json.loads(file.read_text(encoding="utf-8") or "null")
    except (OSError, ValueError, RecursionError):
        return None
    return record if isinstance(record, dict) else None


# How long a refused writer waits for the holder's record: a holder writes it right after
# taking the lock, so an empty lock file means "just started", not "no record".
RECORD_WAIT_S = 1.0


def _read_record_of_holder(file: Path) -> Optional[Dict[str, Any]]:
    """The record of a lock found held, waiting briefly for a holder that is writing it."""
    deadline = time.monotonic() + RECORD_WAIT_S
    while True:
        record = _read_record(file)
        if record or time.monotonic() > deadline:
            return record
        time.sleep(0.02)


def _alive_here(record: Dict[str, Any]) -> bool:
    """Whether the recorded process still runs (only knowable on the same host)."""
    if record.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(record["pid"]), 0)
    except (ProcessLookupError, ValueError, KeyError, TypeError):
        return False
    except PermissionError:
        return True
    return True


class FolderLock:
    """Exclusive write access to ``folder`` while held (a context manager).

    >>> with FolderLock(path, "build_index"):
    ...     ...  # write into path

    Raises :class:`StoreError` at :meth:`acquire` when another writer holds the folder.
    Re-entrant within one ``FolderLock`` object; two objects on one folder exclude each other
    even in one process.
    """

    def __init__(self, folder: PathLike, purpose: str = "writing"):
        self.folder = Path(folder)
        self.purpose = purpose
        self.file = self.folder / LOCK_FILE
        self._fd: Optional[int] = None
        self._depth = 0

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> "FolderLock":
        if self._fd is not None:
            self._depth += 1
            return self
        if self.folder.exists() and not self.folder.is_dir():
            raise StoreError(f"'{self.folder}' is a file; an index needs a folder path")
        try:
            make_folder(self.folder, own=False)
            self._fd = self._acquire_flock() if fcntl is not None else self._acquire_exclusive()
        except StoreError:
            raise
        except OSError as exc:
            raise StoreError(describe_os_error(exc, "locking", self.file)) from exc
        self._depth = 1
        return self

    def _acquire_flock(self) -> int:
        while True:
            fd = open_lock_file(self.file)  # O_NOFOLLOW: a link planted as .lock is refused
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise self._refusal(_read_record_of_holder(self.file)) from None
            except BaseException:
                os.close(fd)
                raise
            # The holder unlinks the file on release: if that happened between our open and
            # our flock, we locked a file nobody else will see; start again on the new one.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.file))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        previous = _read_record(self.file)
        if previous:
            logger.warning("taking over the lock of '%s': %s died without releasing it", self.folder,
                           _describe(previous))
        self._write_record(fd)
        return fd

    def _acquire_exclusive(self) -> int:  # pragma: no cover - Windows only
        for _ in range(2):
            try:
                fd = create_new(self.file)
            except FileExistsError:
                record = _read_record(self.file)
                if record and _alive_here(record):
                    raise self._refusal(record) from None
                logger.info("taking over %s: %s no longer runs", self.file, _describe(record))
                remove_file(self.file)
                continue
            self._write_record(fd)
            return fd
        raise self._refusal(_read_record(self.file))

    def _write_record(self, fd: int) -> None:
        rewrite(fd, json.dumps(_record(self.purpose)).encode("utf-8"))

    def _refusal(self, record: Optional[Dict[str, Any]]) -> StoreError:
        return StoreError(
            f"'{self.folder}' is being written by {_describe(record)}: two writers would corrupt it. Wait for that "
            f"process to finish, or stop it (a killed writer's lock is taken over automatically), or write elsewhere"
        )

    def release(self) -> None:
        if self._fd is None:
            return
        self._depth -= 1
        if self._depth > 0:
            return
        fd, self._fd = self._fd, None
        # Unlinked while still locked, so that no lock file outlives a clean release
        # (a waiting writer re-checks the inode, see _acquire_flock); only our own file.
        remove_file_if_same(self.file, fd)
        os.close(fd)  # closing drops the flock

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def holder(folder: PathLike) -> Optional[Dict[str, Any]]:
    """The record of the process writing ``folder`` now, or None when nobody does."""
    file = Path(folder) / LOCK_FILE
    if not file.is_file():
        return None
    if fcntl is None:  # pragma: no cover - Windows
        record = _read_record(file)
        return record if record and _alive_here(record) else None
    try:
        fd = os.open(file, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_record_of_holder(file) or {}
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def describe_holder(folder: PathLike) -> Optional[str]:
    """``holder`` in words, for error messages (None when nobody writes)."""
    record = holder(folder)
    return None if record is None else _describe(record)
