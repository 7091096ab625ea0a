"""Per-sample columns of an index, in a folder (raw memory-mappable files) or in memory.

Folder layout (format version 1)::

    manifest.json        what follows, the committed row count, fingerprints, versions
    features.bin         float32 [count, feature_dim], unit rows; zero rows where undefined
    ids.bin              int64   [count], position in the dataset's order
    valid.bin            bool    [count], False where the gradient had no direction
    norms.bin            float32 [count], estimated gradient norm sqrt(Tr K(x, x))
    labels.bin           int64   [count], the targets, when they were class indices
    predictions.bin      int64   [count], argmax of the outputs (classifiers)
    probabilities.bin    float32 [count, C], softmax of the outputs (classifiers, small C)
    outputs.bin          float32 [count, d], raw outputs (other models, small d)
    index.faiss          the FAISS index, for index types other than "flat"
    .lock                while a writer works in the folder (:mod:`.lock`)

Each ``.bin`` file is a C-ordered raw array (``np.memmap(file, dtype, shape=...)``
reads it). The manifest's ``columns`` lists the columns present with their dtype and row
shape; names, files, dtypes and row ranks are fixed by :mod:`.schema` and anything else is
refused. ``manifest["dataset"]`` records the data's length and a digest of its first and
last samples (resuming with other data is refused, :mod:`.data_fingerprint`);
``manifest["index_file"]`` the size, SHA-256, vector count and dimension of
``index.faiss`` (checked when it is read, :mod:`.integrity`).

Commits: rows are appended batch by batch; a batch counts once its bytes are fsync'ed and
the manifest, rewritten atomically, says so. Opening a folder to write cuts every column
file back to the committed count (files the manifest does not list yet, before the first
commit, to zero), so a batch cut short by a crash never shows twice. A complete index has
exactly ``count`` rows in every column file; loading checks it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from ...errors import StoreError
from ...atomic import describe_os_error, store_errors, write_all, write_atomic, write_json_atomic
from ...safe_files import cut, make_folder, open_for_append, remove_owned
from .clearing import check_clearable, clear_folder, remove_shards, remove_store_files
from .manifest import now, read_manifest
from .schema import COLUMNS, INDEX_FILE, LOCK_FILE, MANIFEST, column_file, is_store_file, is_store_owned, is_store_temporary
from .shard_folders import SHARDS_DIR, has_shards

logger = logging.getLogger(__name__)

__all__ = ["INDEX_FILE", "ColumnSpec", "Store", "clear_folder", "is_store", "open_columns", "prepare_folder",
           "remove_store_files", "write_column"]
# Bytes written per os.write when a whole column is saved at once.
_CHUNK_BYTES = 64 << 20


@dataclass(frozen=True)
class ColumnSpec:
    """One per-sample column: numpy dtype name and the shape of one row."""

    name: str
    dtype: str
    shape: Tuple[int, ...] = ()

    @property
    def file(self) -> str:
        return column_file(self.name)

    @property
    def row_bytes(self) -> int:
        return int(np.dtype(self.dtype).itemsize * int(np.prod(self.shape, dtype=np.int64)))

    def to_dict(self) -> Dict[str, Any]:
        return {"file": self.file, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, name: str, spec: Dict[str, Any]) -> "ColumnSpec":
        return cls(name, str(spec["dtype"]), tuple(int(s) for s in spec["shape"]))

    def check(self, array: np.ndarray, rows: int) -> np.ndarray:
        """``array`` as a C-contiguous array of this column's dtype and ``rows`` rows."""
        if array.shape != (rows,) + self.shape:
            raise StoreError(
                f"column '{self.name}' expects rows of shape {list(self.shape)} ({rows} rows), got an array of "
                f"shape {list(array.shape)}; every batch must have the same kind of targets and outputs"
            )
        return np.ascontiguousarray(array, dtype=self.dtype)


def is_store(folder: Path) -> bool:
    return (Path(folder) / MANIFEST).is_file()


def prepare_folder(path: Path, overwrite: bool) -> None:
    """Make ``path`` a folder for a new store, refusing to clobber anything that is not the
    store's own. Only checks here: :meth:`Store.create` deletes the old store's files and
    shards once the new manifest is written, after every check passed."""
    if path.exists() and not path.is_dir():
        raise StoreError(f"'{path}' is a file; an index needs a folder path")
    if path.is_dir():
        names = sorted(p.name for p in path.iterdir())
        shards = has_shards(path)  # a sharded build, or a merge killed before its commit
        foreign = [n for n in names if not is_store_owned(n) and not (n == SHARDS_DIR and shards)]
        if is_store(path) or (shards and overwrite and not foreign):
            if not overwrite:
                raise StoreError(f"'{path}' already holds an index; pass overwrite=True to replace it")
            check_clearable(path)  # every refusal before anything is deleted
            if foreign:
                logger.warning("replacing the index in %s; the files it did not write are kept: %s", path,
                               ", ".join(foreign[:5]))
        elif foreign or shards or any(is_store_file(n) for n in names):
            # only temporary files of a killed first write are cleaned; anything else may be the user's
            shown = [n for n in names if not is_store_temporary(n) and n != LOCK_FILE]
            raise StoreError(
                f"'{path}' is not empty ({', '.join(shown[:5])}{'...' if len(shown) > 5 else ''}) and is not an "
                "nnsim_hooks index (no manifest.json); nothing in it is deleted: choose a new or empty folder"
            )
        else:
            remove_store_files(path)  # leftovers of a first manifest write that was killed
    make_folder(path, own=False)


class Store:
    """Rows appended batch by batch, committed atomically; on disk when ``path`` is set,
    in memory otherwise."""

    def __init__(self, path: Optional[Path], manifest: Dict[str, Any]):
        self.path = Path(path) if path is not None else None
        self.manifest = manifest
        self.columns: Dict[str, ColumnSpec] = {
            name: ColumnSpec.from_dict(name, spec) for name, spec in manifest.get("columns", {}).items()
        }
        self._fds: Dict[str, int] = {}
        self._pending = 0  # rows appended since the last commit
        self._memory: Dict[str, List[np.ndarray]] = {name: [] for name in self.columns}

    # -- opening --------------------------------------------------------------------------

    @classmethod
    def create(cls, path: Optional[Path], manifest: Dict[str, Any], *, overwrite: bool = False) -> "Store":
        if path is not None:
            path = Path(path)
            prepare_folder(path, overwrite)
            # The new, empty manifest first: from then on the folder is an empty store, however
            # the rest is interrupted (reopening cuts leftover column files to zero rows).
            write_json_atomic(path / MANIFEST, manifest)
            remove_shards(path)
            remove_store_files(path, keep_manifest=True)
        return cls(path, manifest)

    @classmethod
    def reopen(cls, path: Path) -> "Store":
        """Open an existing store to append more rows, cutting rows past the committed count
        and deleting temporary files of writes a killed process left (the caller holds the
        folder's lock: no other writer can be using them)."""
        store = cls(Path(path), read_manifest(path))
        store._truncate_to_count()
        remove_owned(path, is_store_temporary, skip_links=True)
        return store

    def _truncate_to_count(self) -> None:
        """Cut every column file to the committed rows. Before the first commit the manifest
        lists no columns; the files the store would write are then cut to zero, so that the
        rows of a first batch written but never committed are not counted again."""
        count = self.count
        for name in COLUMNS:
            spec = self.columns.get(name)
            if spec is None and count > 0:
                continue  # a column this store does not have: never written
            file = self.path / column_file(name)
            want = count * spec.row_bytes if spec is not None else 0
            with store_errors("checking", file):
                size = file.stat().st_size if file.exists() else 0
                if size < want:
                    raise StoreError(
                        f"'{file}' holds {size // max(spec.row_bytes, 1)} rows but the manifest commits {count}: "
                        "the folder is corrupt; rebuild with overwrite=True"
                    )
                if size > want:
                    logger.info("cutting %d uncommitted bytes off %s", size - want, file)
                    cut(file, want)

    # -- state ----------------------------------------------------------------------------

    @property
    def count(self) -> int:
        return int(self.manifest["count"])

    @property
    def on_disk(self) -> bool:
        return self.path is not None

    def define_columns(self, specs: List[ColumnSpec]) -> None:
        """Fix the columns at the first batch (kept in the manifest at the next commit)."""
        self.columns = {s.name: s for s in specs}
        self.manifest["columns"] = {s.name: s.to_dict() for s in specs}
        self._memory = {s.name: [] for s in specs}

    # -- appending ------------------------------------------------------------------------

    def append(self, rows: Dict[str, np.ndarray]) -> None:
        """Write one batch of rows; they count only after :meth:`commit`."""
        missing = set(self.columns) ^ set(rows)
        if missing:
            raise StoreError(
                f"this batch has columns {sorted(rows)} but the store has {sorted(self.columns)}; every batch must "
                "have the same kind of targets and outputs"
            )
        n = len(next(iter(rows.values())))
        arrays = {name: self.columns[name].check(np.asarray(a), n) for name, a in rows.items()}
        if not self.on_disk:
            for name, a in arrays.items():
                self._memory[name].append(a)
            self._pending += n
            return
        name = None
        try:
            for name, a in arrays.items():
                write_all(self._fd(name), memoryview(a).cast("B"))
        except OSError as exc:
            self._discard_uncommitted()
            raise StoreError(
                describe_os_error(exc, "appending to", self.path / self.columns[name].file)
                + f". The index folder still holds the {self.count} samples committed before this batch; "
                "run build_index again with the same path to resume"
            ) from exc
        self._pending += n

    def commit(self, **updates: Any) -> None:
        """Make the appended rows durable and count them in the manifest."""
        pending = self._pending
        manifest = dict(self.manifest, **updates)
        manifest["count"] = self.count + pending
        manifest["updated"] = now()
        if self.on_disk:
            try:
                for fd in self._fds.values():
                    os.fsync(fd)
                write_json_atomic(self.path / MANIFEST, manifest)
            except (OSError, StoreError) as exc:
                self._discard_uncommitted()
                msg = describe_os_error(exc, "committing to", self.path) if not isinstance(exc, StoreError) else str(exc)
                raise StoreError(
                    f"{msg}. The index folder still holds the {self.count} samples committed before; run "
                    "build_index again with the same path to resume"
                ) from exc
        self.manifest = manifest
        self._pending = 0

    def _discard_uncommitted(self) -> None:
        """Best effort: cut the files back to the committed rows (resuming does it anyway)."""
        self._pending = 0
        self.close()
        try:
            self._truncate_to_count()
        except (OSError, StoreError):
            pass

    def _fd(self, name: str) -> int:
        if name not in self._fds:
            file = self.path / self.columns[name].file
            self._fds[name] = open_for_append(file)  # never through a link; the umask's permissions
        return self._fds[name]

    def close(self) -> None:
        for fd in self._fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds = {}

    # -- reading --------------------------------------------------------------------------

    def arrays(self) -> Dict[str, np.ndarray]:
        """The committed rows of every column: read-only memmaps on disk, arrays in memory."""
        if not self.on_disk:
            out = {}
            for name, spec in self.columns.items():
                parts = self._memory[name]
                out[name] = np.concatenate(parts) if parts else np.empty((0,) + spec.shape, spec.dtype)
                self._memory[name] = [out[name]]
            return out
        return open_columns(self.path, self.manifest)


def open_columns(folder: Path, manifest: Dict[str, Any], *, exact: bool = True) -> Dict[str, np.ndarray]:
    """Read-only memmaps of the committed rows of each column in ``folder``.

    ``exact``: every file must hold exactly ``count`` rows (a finished store); otherwise
    longer files (uncommitted rows) are allowed."""
    count = int(manifest["count"])
    out = {}
    for name, raw in manifest["columns"].items():
        spec = ColumnSpec.from_dict(name, raw)
        file = Path(folder) / spec.file
        with store_errors("opening", file):
            size = file.stat().st_size
        want = count * spec.row_bytes
        if size < want or (exact and size != want):
            rows = f"{size // max(spec.row_bytes, 1)} rows" + (f" and {size % spec.row_bytes} bytes" if size % spec.row_bytes else "")
            raise StoreError(
                f"'{file}' holds {rows} but the manifest commits {count} ({size} bytes where {count} rows of "
                f"{spec.row_bytes} bytes make {want}): the folder is corrupt (copied while being written, or edited?); "
                "rebuild it"
            )
        if count == 0:
            out[name] = np.empty((0,) + spec.shape, spec.dtype)
            continue
        with store_errors("memory-mapping", file):
            out[name] = np.memmap(file, dtype=spec.dtype, mode="r", shape=(count,) + spec.shape)
    return out


def write_column(path: Path, array: np.ndarray) -> None:
    """Write a whole column to ``path`` atomically, in chunks (works for memmaps larger than RAM)."""
    rows_per_chunk = max(1, _CHUNK_BYTES // max(1, array[:1].nbytes))

    def write(fd: int) -> None:
        for start in range(0, len(array), rows_per_chunk):
            chunk = np.ascontiguousarray(array[start : start + rows_per_chunk])
            write_all(fd, memoryview(chunk).cast("B"))

    write_atomic(path, write)
