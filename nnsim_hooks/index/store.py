"""Per-sample columns of an index, in a folder (raw memory-mappable files) or in memory.

Folder layout (format version 1)::

    manifest.json        what follows, the committed row count, fingerprint, versions
    features.bin         float32 [count, feature_dim], unit rows; zero rows where undefined
    ids.bin              int64   [count], position in the dataset's order
    valid.bin            bool    [count], False where the gradient had no direction
    norms.bin            float32 [count], estimated gradient norm sqrt(Tr K(x, x))
    labels.bin           int64   [count], the targets, when they were class indices
    predictions.bin      int64   [count], argmax of the outputs (classifiers)
    probabilities.bin    float32 [count, C], softmax of the outputs (classifiers, small C)
    outputs.bin          float32 [count, d], raw outputs (other models, small d)
    index.faiss          the FAISS index, for index types other than "flat"

Each ``.bin`` file is a C-ordered raw array (``np.memmap(file, dtype, shape=...)``
reads it; dtype and row shape are in ``manifest["columns"]``). Rows are appended batch by
batch; a batch counts once its bytes are fsync'ed and the manifest, rewritten atomically,
says so. Rows past ``count`` (a batch cut short by a crash) are cut off when the build
resumes.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from ..errors import StoreError
from .atomic import describe_os_error, store_errors, write_all, write_atomic, write_json_atomic
from .lock import LOCK_FILE
from .manifest import MANIFEST, now, read_manifest

logger = logging.getLogger(__name__)

INDEX_FILE = "index.faiss"
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
        return f"{self.name}.bin"

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
    """Make ``path`` an empty folder for a new store, refusing to clobber anything else."""
    if path.exists() and not path.is_dir():
        raise StoreError(f"'{path}' is a file; an index needs a folder path")
    if path.is_dir():
        if is_store(path):
            if not overwrite:
                raise StoreError(f"'{path}' already holds an index; pass overwrite=True to replace it")
            remove_store_files(path)
        leftover = [p.name for p in path.iterdir() if p.name != LOCK_FILE]
        if leftover:
            raise StoreError(
                f"'{path}' is not empty ({', '.join(sorted(leftover)[:5])}...) and is not an nnsim_hooks index; "
                "choose a new or empty folder"
            )
    with store_errors("creating the folder", path):
        path.mkdir(parents=True, exist_ok=True)


def remove_store_files(path: Path) -> None:
    """Delete the files of the store in ``path`` (only files this package writes)."""
    manifest_path = path / MANIFEST
    names = {INDEX_FILE}
    try:
        manifest = read_manifest(path)
        names |= {spec.get("file", f"{name}.bin") for name, spec in manifest.get("columns", {}).items()}
    except StoreError:
        names |= {f"{n}.bin" for n in ("features", "ids", "valid", "norms", "labels", "predictions", "probabilities", "outputs")}
    with store_errors("deleting the old index in", path):
        for name in names:
            (path / name).unlink(missing_ok=True)
        for tmp in path.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)
        manifest_path.unlink(missing_ok=True)


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
            write_json_atomic(path / MANIFEST, manifest)
        return cls(path, manifest)

    @classmethod
    def reopen(cls, path: Path) -> "Store":
        """Open an existing store to append more rows, cutting rows past the committed count."""
        store = cls(Path(path), read_manifest(path))
        store._truncate_to_count()
        return store

    def _truncate_to_count(self) -> None:
        count = self.count
        for spec in self.columns.values():
            file = self.path / spec.file
            want = count * spec.row_bytes
            with store_errors("checking", file):
                size = file.stat().st_size if file.exists() else 0
                if size < want:
                    raise StoreError(
                        f"'{file}' holds {size // max(spec.row_bytes, 1)} rows but the manifest commits {count}: "
                        "the folder is corrupt; rebuild with overwrite=True"
                    )
                if size > want:
                    logger.info("cutting %d uncommitted bytes off %s", size - want, file)
                    os.truncate(file, want)

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
            self._fds[name] = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
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


def open_columns(folder: Path, manifest: Dict[str, Any]) -> Dict[str, np.ndarray]:
    """Read-only memmaps of the committed rows of each column in ``folder``."""
    count = int(manifest["count"])
    out = {}
    for name, raw in manifest["columns"].items():
        spec = ColumnSpec.from_dict(name, raw)
        file = Path(folder) / spec.file
        with store_errors("opening", file):
            size = file.stat().st_size
        if size < count * spec.row_bytes:
            raise StoreError(
                f"'{file}' holds {size // max(spec.row_bytes, 1)} rows but the manifest commits {count}: the folder is "
                "corrupt (copied while being written?); rebuild it"
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
