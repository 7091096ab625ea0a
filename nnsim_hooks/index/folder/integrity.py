"""Checks that what an index folder holds is what its manifest says, at load time.

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
import warnings
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np

from ...errors import StoreError
from ...atomic import store_errors

logger = logging.getLogger(__name__)

# Bytes of feature rows scanned at once for non-finite values.
SCAN_BYTES = 64 << 20
_HASH_CHUNK = 8 << 20


def nonfinite_rows(features: np.ndarray, block_bytes: int = SCAN_BYTES) -> np.ndarray:
    """Positions of the rows of ``features`` holding a NaN or an infinity, read block by block."""
    n = len(features)
    step = max(1, block_bytes // max(1, features[:1].nbytes))
    bad = [start + np.flatnonzero(~np.isfinite(np.asarray(features[start : start + step])).all(1))
           for start in range(0, n, step)]
    return np.concatenate(bad) if bad else np.zeros(0, dtype=np.int64)


def drop_nonfinite_rows(columns: Dict[str, np.ndarray], folder: Path, manifest: Dict[str, Any]) -> Dict[str, np.ndarray]:
    """``columns`` with non-finite feature rows zeroed and marked not valid (see the module
    docstring); the same dict when every row is finite."""
    features = columns["features"]
    bad = nonfinite_rows(features)
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
