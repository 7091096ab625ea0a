"""What an index folder may hold: the store's own file names, column dtypes and row shapes.

A manifest is data read from disk, never an instruction: a column is accepted only under
one of the names below, in its file ``<name>.bin`` inside the folder, with exactly the
dtype and row rank the store writes. Anything else (``"file": "../x"``, ``float16``
features, ``int32`` ids) is refused with a :class:`~nnsim_hooks.errors.StoreError`, so
that neither a load reads garbage nor ``overwrite=True`` deletes a file the store did not
write.
"""

from __future__ import annotations

import re
from typing import Dict, Tuple

from .lock import LOCK_FILE

MANIFEST = "manifest.json"
INDEX_FILE = "index.faiss"

#: column name -> (numpy dtype name, number of dimensions of one row)
COLUMNS: Dict[str, Tuple[str, int]] = {
    "features": ("float32", 1),  # [D] unit rows, zero where undefined
    "ids": ("int64", 0),
    "valid": ("bool", 0),
    "norms": ("float32", 0),
    "labels": ("int64", 0),
    "predictions": ("int64", 0),
    "probabilities": ("float32", 1),  # [C]
    "outputs": ("float32", 1),  # [d]
}
#: columns every complete index has
REQUIRED = ("features", "ids", "valid", "norms")


def column_file(name: str) -> str:
    return f"{name}.bin"


#: every file name the store itself writes in a folder (besides temporary files and the
#: FAISS files of :func:`index_file_name`)
STORE_FILES = frozenset({column_file(n) for n in COLUMNS} | {INDEX_FILE, MANIFEST})
_INDEX_FILE = re.compile(r"^index(-[0-9a-f]{16})?\.faiss$")


def index_file_name(sha256: str) -> str:
    """The name of a FAISS file by its contents: a rebuild writes its file under a new name,
    commits the manifest naming it, then deletes the old one (a reader never sees a
    manifest and a FAISS file that do not belong together)."""
    return f"index-{sha256[:16]}.faiss"


def is_index_file(name: str) -> bool:
    """``index.faiss`` (older folders) or ``index-<16 hex>.faiss``."""
    return bool(_INDEX_FILE.match(name))


def is_store_file(name: str) -> bool:
    """Whether ``name`` is one of the files the store writes (not a temporary one)."""
    return name in STORE_FILES or is_index_file(name)



def is_store_temporary(name: str) -> bool:
    """Whether ``name`` is a temporary file of an atomic write of one of the store's files:
    ``.<file>.<random>.tmp`` (safe_files.write_atomic, safe_files.write_faiss_index) or
    ``.index.faiss.tmp`` (older versions), left behind only by a killed process."""
    if not (name.startswith(".") and name.endswith(".tmp")):
        return False
    return any(name == f".{f}.tmp" or name.startswith(f".{f}.") for f in STORE_FILES)


def is_store_owned(name: str) -> bool:
    """Whether the store may delete ``name`` in its folder: its own files, their temporary
    files, and its lock file."""
    return is_store_file(name) or name == LOCK_FILE or is_store_temporary(name)
