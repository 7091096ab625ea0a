"""The FAISS file of an index folder: its name, and replacing it so that a kill cannot break it.

A FAISS file is named by its contents, ``index-<first 16 hex of its SHA-256>.faiss``
(:func:`.schema.index_file_name`), and the manifest's ``index_file`` record names it
(``"file"``; folders written before this record the fixed name ``index.faiss``). A new
FAISS index (``rebuild_index``, a build that reuses extracted features with another index
type) is written to a temporary file, renamed to its own name, committed by the manifest,
and only then are the other FAISS files deleted. At every instant the manifest names a
complete file that belongs to it: a kill leaves the old index or the new one, and a reader
sees one of them, never a mismatch. A FAISS file the manifest does not name is the
leftover of a killed rebuild: the next writer deletes it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional

from ...errors import StoreError
from ...safe_files import refuse_links, remove_owned, rename_into_place, write_faiss_index
from .integrity import sha256_of
from .schema import INDEX_FILE, index_file_name, is_index_file, is_store_temporary


def index_file_path(folder: Optional[Path], manifest: Dict[str, Any]) -> Optional[Path]:
    """The FAISS file the manifest of ``folder`` commits (None in memory); a name other than
    the store's own (``"../x"``) is refused."""
    if folder is None:
        return None
    record = manifest.get("index_file")
    name = record.get("file", INDEX_FILE) if isinstance(record, dict) else INDEX_FILE
    if not isinstance(name, str) or not is_index_file(name):
        raise StoreError(
            f"the manifest of '{folder}' names the FAISS file {name!r}; the store's FAISS files are 'index.faiss' or "
            "'index-<16 hex digits>.faiss' inside the folder, and no other is read or deleted. The manifest was "
            "edited: rebuild the index"
        )
    return Path(folder) / name


def write_index_file(folder: Path, backend) -> Dict[str, Any]:
    """Write ``backend`` (a :class:`~nnsim_hooks.index.backend.FaissIndex`) into ``folder``
    under its content name; returns the manifest's ``index_file`` record for it. Nothing is
    deleted: the caller commits the manifest, then calls :func:`remove_other_index_files`."""
    folder = Path(folder)
    tmp = write_faiss_index(backend.cpu_index, folder, INDEX_FILE)
    size = tmp.stat().st_size
    digest = sha256_of(tmp)
    name = index_file_name(digest)
    rename_into_place(tmp, folder / name)
    return {"file": name, "bytes": int(size), "sha256": digest, "count": int(backend.ntotal), "dim": int(backend.dim)}


def remove_other_index_files(folder: Path, manifest: Dict[str, Any]) -> None:
    """After a commit: delete every FAISS file (and FAISS temporary) of ``folder`` but the
    one the manifest names (none for a flat index)."""
    keep = index_file_path(folder, manifest).name if manifest.get("index_file") else None

    def stale(name: str) -> bool:
        if is_index_file(name):
            return name != keep
        return is_store_temporary(name) and name.startswith(f".{INDEX_FILE}.")

    remove_owned(folder, stale, skip_links=True)  # committed already: a link left is only named


def check_index_files(folder: Optional[Path]) -> None:
    """Before writing a new FAISS file: refuse a link among the FAISS files of ``folder``
    (the old one is deleted after the commit, and a refusal then would come too late)."""
    if folder is not None:
        refuse_links(folder, is_index_file)
