"""Crash-safe whole-file writes (bytes, text, JSON), for index folders and audit folders alike.

The writing itself is :mod:`nnsim_hooks.safe_files` (every file the project writes or
deletes goes through it): into a temporary file in the same folder, flushed and fsync'ed,
given the permissions of a newly created file (the umask's, not the 0600 of a temporary
file), then ``os.replace``'d over the target (never through a link), and the folder is
fsync'ed so the rename itself survives a crash. Column files grow by appends that are fsync'ed before the
manifest commits the new row count (see :mod:`nnsim_hooks.index.folder.store`).

Every ``OSError`` becomes a :class:`~nnsim_hooks.errors.StoreError` naming the file, with
a hint for a full disk.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Union

from .safe_files import (  # noqa: F401 (the names index and audit code import from here)
    current_umask,
    describe_os_error,
    fsync_dir,
    store_errors,
    write_all,
    write_atomic,
)

PathLike = Union[str, "os.PathLike[str]"]

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
