"""Checks that what an index folder holds is what its manifest says.

- Block checksums: every column file is cut into blocks of :data:`CHECKSUM_BLOCK` bytes
  whose CRC-32s the writer records in the manifest as it commits rows
  (``manifest["checksums"]``; the last block's is a running value, so appending never reads
  back). A reader checks what it touches: the small columns (ids, valid, norms, labels...)
  whole at load, ``features.bin`` block by block the first time a block is read
  (:class:`CheckedRows`), so loading a million rows reads none of them. A block that does
  not match is a :class:`~nnsim_hooks.errors.StoreError` naming the file and the rows.
  Feature rows that were not finite when written are recorded then
  (``manifest["nonfinite_rows"]``). Folders written before checksums existed are checked
  as follows.

- Feature rows that are not finite (a NaN written by another program, a bit flip) would
  make every sum over the index NaN (``density()`` for everyone). They are found block by
  block (memory stays bounded for memmaps of millions of rows), zeroed in a copy-on-write
  view (the file is not touched) and marked not valid, with a warning naming how many and
  the first ids.
- ``index.faiss`` is recorded in the manifest when it is written (size, SHA-256, vector
  count, dimension). A file of another size is refused when the index is loaded; its
  SHA-256, vector count and dimension are checked when it is first read, before any search
  uses it. A mismatch is a :class:`~nnsim_hooks.errors.StoreError` (never a silent
  rebuild: the folder was changed by something else, and the user should know); deleting
  the file makes the index rebuild it from the stored features.
- ``ids.bin`` and ``valid.bin`` (small: 9 bytes a row) have their SHA-256 recorded in the
  manifest's ``"checksums"`` when the index is completed, and checked at every load: an
  edited id or validity flag would otherwise silently point results at other samples.
  Folders written before the record existed load without the check.
"""

from __future__ import annotations

import hashlib
import logging
import os
import warnings
import zlib
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from ...errors import StoreError
from ...atomic import store_errors

logger = logging.getLogger(__name__)

# Bytes of feature rows scanned at once for non-finite values.
SCAN_BYTES = 64 << 20
#: Bytes per checksummed block of a column file.
CHECKSUM_BLOCK = 16 << 20
#: Column files up to this size are checked whole when an index is loaded.
CHECK_WHOLE_BYTES = 256 << 20
#: Non-finite rows listed in the manifest at most (more: the first ones, and the count).
MAX_LISTED_ROWS = 10_000
_HASH_CHUNK = 8 << 20


def nonfinite_rows(features: np.ndarray, block_bytes: int = SCAN_BYTES) -> np.ndarray:
    """Positions of the rows of ``features`` holding a NaN or an infinity, read block by block."""
    n = len(features)
    step = max(1, block_bytes // max(1, features[:1].nbytes))
    bad = [start + np.flatnonzero(~np.isfinite(np.asarray(features[start : start + step])).all(1))
           for start in range(0, n, step)]
    return np.concatenate(bad) if bad else np.zeros(0, dtype=np.int64)


def drop_nonfinite_rows(columns: Dict[str, np.ndarray], folder: Path, manifest: Dict[str, Any],
                        bad: Optional[np.ndarray] = None) -> Dict[str, np.ndarray]:
    """``columns`` with non-finite feature rows zeroed and marked not valid (see the module
    docstring); the same dict when every row is finite. ``bad``: the rows, when known
    (recorded at write time); else the features are scanned."""
    features = columns["features"]
    bad = nonfinite_rows(features) if bad is None else np.asarray(bad, dtype=np.int64)
    if not len(bad):
        return columns
    ids = np.asarray(columns["ids"])[bad[:10]].tolist()
    warnings.warn(
        f"nnsim_hooks: {len(bad)} feature rows of the index at '{folder}' are not finite (NaN or Inf; ids "
        f"{ids}{'...' if len(bad) > 10 else ''}): the file was changed after it was written. They are treated as "
        "samples without a gradient direction (valid=False) in this session; features.bin is not modified. "
        "Rebuild the index to recompute them",
        RuntimeWarning,
        stacklevel=3,
    )
    out = dict(columns)
    if isinstance(features, np.memmap):
        # copy-on-write: only the pages of the zeroed rows are copied, the file stays as it is
        fixed = np.memmap(Path(folder) / "features.bin", dtype=features.dtype, mode="c", shape=features.shape)
        if isinstance(features, CheckedRows):
            fixed = fixed.view(CheckedRows)
            fixed._checker = features._checker
    else:
        fixed = np.array(features)
    fixed[bad] = 0.0
    fixed.flags.writeable = False
    valid = np.array(columns["valid"], dtype=bool)
    valid[bad] = False
    valid.flags.writeable = False
    out["features"], out["valid"] = fixed, valid
    return out


# -- ids.bin and valid.bin ------------------------------------------------------------------

#: the columns whose whole files are checksummed at commit and checked at load
CHECKSUMMED = ("ids", "valid")


def sha256_of_rows(array: np.ndarray) -> str:
    """SHA-256 of the bytes of ``array`` (a column, memory-mapped or not), block by block."""
    digest = hashlib.sha256()
    rows = max(1, _HASH_CHUNK // max(1, array[:1].nbytes))
    for start in range(0, len(array), rows):
        digest.update(memoryview(np.ascontiguousarray(array[start : start + rows])).cast("B"))
    return digest.hexdigest()


def column_checksums(columns: Dict[str, np.ndarray]) -> Dict[str, str]:
    """The manifest's ``"checksums"`` record of the columns of a finished index."""
    return {name: sha256_of_rows(columns[name]) for name in CHECKSUMMED if name in columns}


def check_column_checksums(columns: Dict[str, np.ndarray], folder: Path, manifest: Dict[str, Any]) -> None:
    """Refuse ``ids.bin`` or ``valid.bin`` whose bytes are not those recorded at commit."""
    for name, recorded in (manifest.get("checksums") or {}).items():
        if name in columns and sha256_of_rows(columns[name]) != recorded:
            raise StoreError(
                f"'{Path(folder) / (name + '.bin')}' was changed after the index was written: its SHA-256 differs "
                f"from the one the manifest records. Its {name} would point results at other samples, so the index "
                "is not loaded; rebuild it (build_index(..., overwrite=True))"
            )


# -- index.faiss ----------------------------------------------------------------------------


def sha256_of(file: Path) -> str:
    digest = hashlib.sha256()
    with store_errors("reading", file), open(file, "rb") as f:
        for chunk in iter(lambda: f.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def index_file_record(file: Path, backend) -> Dict[str, Any]:
    """What the manifest records of a just written ``index.faiss``."""
    with store_errors("reading", file):
        size = Path(file).stat().st_size
    return {"bytes": int(size), "sha256": sha256_of(file), "count": int(backend.ntotal), "dim": int(backend.dim)}


def _refuse(file: Path, what: str) -> StoreError:
    return StoreError(
        f"'{file}' does not belong to this index: {what}. It was replaced or changed after the index was built; "
        f"delete it and the index is rebuilt from the stored features (or call rebuild_index)"
    )


def check_index_file_size(file: Path, record: Optional[Dict[str, Any]], n_valid: int, dim: int) -> None:
    """The cheap checks, at load time: the recorded size, count and dimension."""
    if record is None or not Path(file).is_file():
        return
    with store_errors("reading", file):
        size = Path(file).stat().st_size
    if size != record.get("bytes"):
        raise _refuse(file, f"it has {size} bytes, the manifest records {record.get('bytes')}")
    if record.get("count") != n_valid or record.get("dim") != dim:
        raise _refuse(file, f"the manifest records {record.get('count')} vectors of dimension {record.get('dim')}, "
                            f"the stored features are {n_valid} valid rows of dimension {dim}")


def read_index_file(file: Path, spec, dim: int, n_valid: int, record: Optional[Dict[str, Any]]):
    """Read ``index.faiss`` after checking it against the manifest's record (SHA-256 before
    reading, vector count and dimension after)."""
    from ..backend import FaissIndex

    check_index_file_size(file, record, n_valid, dim)
    if record is not None:
        found = sha256_of(file)
        if found != record.get("sha256"):
            raise _refuse(file, f"its SHA-256 is {found[:16]}..., the manifest records {str(record.get('sha256'))[:16]}...")
    backend = FaissIndex.read(file, spec, dim)
    if backend.ntotal != n_valid:
        raise _refuse(file, f"it holds {backend.ntotal} vectors, the index has {n_valid} valid samples")
    return backend


# -- block checksums ------------------------------------------------------------------------


class BlockSums:
    """CRC-32s of the :data:`CHECKSUM_BLOCK`-byte blocks of one file, fed the bytes as they
    are written (the last block's value is running: appending continues it)."""

    def __init__(self, crcs=(), size: int = 0):
        self.crcs = [int(c) for c in crcs]
        self.size = int(size)

    def feed(self, data) -> None:
        view = memoryview(data).cast("B")
        pos = 0
        while pos < len(view):
            used = self.size % CHECKSUM_BLOCK
            if used == 0:
                self.crcs.append(0)
            take = min(len(view) - pos, CHECKSUM_BLOCK - used)
            self.crcs[-1] = zlib.crc32(view[pos : pos + take], self.crcs[-1])
            pos += take
            self.size += take

    def record(self) -> Dict[str, Any]:
        return {"bytes": self.size, "crc32": list(self.crcs)}

    @classmethod
    def of_file(cls, file: Path, size: int) -> "BlockSums":
        """The sums of the first ``size`` bytes of ``file`` (a folder written before checksums)."""
        sums = cls()
        with store_errors("reading", file), open(file, "rb") as f:
            while sums.size < size:
                chunk = f.read(min(CHECKSUM_BLOCK, size - sums.size))
                if not chunk:
                    break
                sums.feed(chunk)
        return sums


def checksum_record(files: Dict[str, BlockSums]) -> Dict[str, Any]:
    """The manifest's ``checksums`` entry."""
    return {"algorithm": "crc32", "block_bytes": CHECKSUM_BLOCK, "files": {f: s.record() for f, s in files.items()}}


def recorded_sums(manifest: Dict[str, Any], file: str, size: int) -> Optional[List[int]]:
    """The recorded CRC-32s of ``file``, if the manifest has them for exactly ``size`` bytes."""
    record = manifest.get("checksums")
    if not isinstance(record, dict) or record.get("algorithm") != "crc32" or record.get("block_bytes") != CHECKSUM_BLOCK:
        return None
    entry = (record.get("files") or {}).get(file)
    if not isinstance(entry, dict) or entry.get("bytes") != size or not isinstance(entry.get("crc32"), list):
        return None
    crcs = entry["crc32"]
    if len(crcs) != -(-size // CHECKSUM_BLOCK) or not all(isinstance(c, int) for c in crcs):
        return None
    return crcs


class BlockChecker:
    """Verifies the blocks of one file against their recorded CRC-32s, each at most once."""

    def __init__(self, file: Path, crcs: List[int], size: int, row_bytes: int):
        self.file, self.crcs, self.size, self.row_bytes = Path(file), crcs, size, max(1, row_bytes)
        self.checked = np.zeros(len(crcs), dtype=bool)

    def check_bytes(self, start: int, end: int) -> None:
        first, last = start // CHECKSUM_BLOCK, (max(end, start + 1) - 1) // CHECKSUM_BLOCK
        todo = [b for b in range(first, min(last, len(self.crcs) - 1) + 1) if not self.checked[b]]
        if not todo:
            return
        with store_errors("reading", self.file):
            fd = os.open(self.file, os.O_RDONLY)
            try:
                for b in todo:
                    lo = b * CHECKSUM_BLOCK
                    data = os.pread(fd, min(CHECKSUM_BLOCK, self.size - lo), lo)
                    if zlib.crc32(data) != self.crcs[b]:
                        rows = (lo // self.row_bytes, (lo + len(data) - 1) // self.row_bytes)
                        raise StoreError(
                            f"'{self.file}' was changed after it was written: block {b} (bytes {lo}..{lo + len(data) - 1},"
                            f" rows {rows[0]}..{rows[1]}) does not match the CRC-32 the manifest records. The folder "
                            "is corrupt (disk error, or edited by another program); rebuild the index"
                        )
                    self.checked[b] = True
            finally:
                os.close(fd)

    def check_rows(self, start: int, end: int) -> None:
        self.check_bytes(start * self.row_bytes, end * self.row_bytes)

    def check_all(self) -> None:
        self.check_bytes(0, self.size)


def _row_range(key, n: int):
    """``(lo, hi)`` rows that ``array[key]`` reads, or None when it cannot be told cheaply."""
    if isinstance(key, tuple):
        key = key[0] if key else slice(None)
    if isinstance(key, (int, np.integer)):
        i = int(key) + (n if key < 0 else 0)
        return i, i + 1
    if isinstance(key, slice):
        start, stop, step = key.indices(n)
        if step < 0:
            start, stop = stop + 1, start + 1
        return (start, stop) if stop > start else (start, start)
    if key is Ellipsis or key is None:
        return 0, n
    idx = np.asarray(key)
    if idx.dtype == bool:
        idx = np.flatnonzero(idx)
    if idx.size == 0:
        return 0, 0
    if np.issubdtype(idx.dtype, np.integer):
        idx = np.where(idx < 0, idx + n, idx)
        return int(idx.min()), int(idx.max()) + 1
    return 0, n


class CheckedRows(np.memmap):
    """A read-only memmap of a column whose blocks are verified the first time rows of them
    are read by indexing (``rows[a:b]``, ``rows[ids]``)."""

    _checker: Optional[BlockChecker] = None

    def __array_finalize__(self, obj) -> None:
        super().__array_finalize__(obj)
        self._checker = None  # a view: its rows were checked when it was cut out

    def __getitem__(self, key):
        checker = self._checker
        if checker is not None:
            span = _row_range(key, len(self))
            if span is not None and span[1] > span[0]:
                checker.check_rows(*span)
        return super().__getitem__(key)


def check_columns(columns: Dict[str, np.ndarray], folder: Path, manifest: Dict[str, Any],
                  file_of: Dict[str, str]) -> Optional[Dict[str, np.ndarray]]:
    """The columns with their checksums verified as they are read: small files now, large
    ones block by block on first access. None when the manifest has no checksums for
    every file (a folder written before them)."""
    out = {}
    for name, col in columns.items():
        file = file_of[name]
        size = int(col.nbytes)
        crcs = recorded_sums(manifest, file, size)
        if crcs is None:
            return None
        row_bytes = int(col[:1].nbytes) if len(col) else 1
        checker = BlockChecker(Path(folder) / file, crcs, size, row_bytes)
        if size <= CHECK_WHOLE_BYTES or not isinstance(col, np.memmap):
            checker.check_all()
            out[name] = col
        else:
            checked = col.view(CheckedRows)
            checked._checker = checker
            out[name] = checked
    return out
