"""Crash-safe file writes, for index folders and audit folders alike.

Whole files are written atomically: into a temporary file in the same folder, flushed
and fsync'ed, given the permissions of a newly created file (the umask's, not the 0600
of a temporary file), then ``os.replace``'d over the target, and the folder is fsync'ed
so the rename itself survives a crash. Column files grow by appends that are fsync'ed before the
manifest commits the new row count (see :mod:`nnsim_hooks.index.folder.store`).

Every ``OSError`` becomes a :class:`~nnsim_hooks.errors.StoreError` naming the file, with
a hint for a full disk.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Union

from .errors import StoreError

PathLike = Union[str, "os.PathLike[str]"]


def describe_os_error(exc: OSError, what: str, path: PathLike) -> str:
    """A message for an ``OSError`` while doing ``what`` to ``path``."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        hint = "the disk is full (or over quota): free some space"
    elif exc.errno == errno.EROFS:
        hint = "the file system is read-only: write to another folder (copy a stored index there first)"
    elif exc.errno in (errno.EACCES, errno.EPERM):
        hint = "no permission to write there: choose another folder, or change its permissions"
    else:
        hint = os.strerror(exc.errno) if exc.errno else str(exc)
    return f"{what} '{path}' failed: {hint} ({type(exc).__name__}: {exc})"


@contextmanager
def store_errors(what: str, path: PathLike) -> Iterator[None]:
    """Turn an ``OSError`` raised inside the block into a :class:`StoreError`."""
    try:
        yield
    except StoreError:
        raise
    except OSError as exc:
        raise StoreError(describe_os_error(exc, what, path)) from exc


def write_all(fd: int, data: Union[bytes, memoryview]) -> None:
    """``os.write`` until every byte is written (it may write fewer than asked)."""
    view = memoryview(data).cast("B")
    while len(view):
        written = os.write(fd, view)
        view = view[written:]


def fsync_dir(folder: PathLike) -> None:
    """Make a rename or a new file in ``folder`` durable (a no-op where unsupported)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def current_umask() -> int:
    """The process's umask, read without changing it where the system shows it (Linux):
    setting and restoring it is process-wide, so a thread creating a file meanwhile would
    get the wrong permissions."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: PathLike, write: Callable[[int], None]) -> None:
    """Create or replace ``path`` with what ``write(fd)`` writes, atomically: a reader sees
    the old file or the complete new one, never a part. The folder must exist."""
    path = Path(path)
    with store_errors("writing", path):
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            try:
                write(fd)
                os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes 0600 files; give the usual permissions
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except BaseException:
            _remove_quietly(tmp)
            raise
        fsync_dir(path.parent)


def write_bytes_atomic(path: PathLike, data: bytes) -> None:
    write_atomic(path, lambda fd: write_all(fd, data))


def write_text_atomic(path: PathLike, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: PathLike, obj: Any, *, allow_nan: bool = True) -> None:
    """``obj`` as indented JSON with sorted keys (numpy scalars and arrays, paths as
    plain values); ``allow_nan=False`` refuses NaN and infinities, which strict JSON
    readers reject."""
    text = json.dumps(obj, indent=2, sort_keys=True, default=_plain_json, allow_nan=allow_nan) + "\n"
    write_text_atomic(path, text)


def _plain_json(value: Any) -> Any:
    import numpy as np

    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _remove_quietly(path: PathLike) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
