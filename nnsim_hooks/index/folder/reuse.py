"""Whether a stored index (or an unfinished build) may be reused for this build: one check
for every build path (one process, torchrun, ``shard=(i, n)``), so that none returns a
finished index of other data or another model.

Compared: the model fingerprint (weights, layers, output, sketch recipe and seed,
:func:`.manifest.check_fingerprint`), ``use_targets``, and the data's record
(:mod:`.data_fingerprint`: length, first and last sample digests, file list). A finished
index must also hold exactly one row per sample.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional

from ...errors import IndexMismatchError
from .data_fingerprint import data_differences
from .manifest import check_fingerprint


def check_same_build(manifest: Dict[str, Any], path: Path, *, fingerprint: Dict[str, Any], data: Any,
                     total: Optional[int], use_targets: bool) -> None:
    """Raise :class:`IndexMismatchError` unless ``manifest`` (of the folder ``path``)
    describes a build of this model (``fingerprint``), ``use_targets`` and ``data`` (of
    ``total`` samples, None when unknown)."""
    check_fingerprint(manifest.get("fingerprint"), fingerprint, path,
                      unresolved_output=fingerprint.get("output") == "auto")
    stored = (manifest.get("source") or {}).get("use_targets", True)
    if stored != use_targets:
        raise IndexMismatchError(
            f"the index at '{path}' was built with use_targets={stored}, now use_targets={use_targets}: the "
            "features would differ. Use the same setting, or build a new index (another path, or overwrite=True)"
        )
    count = int(manifest["count"])
    finished = bool(manifest.get("extraction_complete"))
    if finished and total is not None and total != count:
        raise IndexMismatchError(
            f"the index at '{path}' holds {count} samples but the data has {total}: it was built from other "
            "data. Use another path, or overwrite=True"
        )
    diffs = data_differences(manifest.get("dataset"), data, total)
    if not diffs and total is not None and count > total:  # a folder written before data records existed
        diffs = [f"length: the folder already holds {count} samples, the data has {total}"]
    if diffs:
        state = "a finished index" if finished else f"an unfinished build ({count} samples stored)"
        raise IndexMismatchError(
            f"the index at '{path}' holds {state} of other data than this:\n  - " + "\n  - ".join(diffs)
            + "\nResume with the same data in the same order, or build a new index (another path, or overwrite=True)"
        )
