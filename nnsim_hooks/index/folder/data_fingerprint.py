"""What identifies the data an index is built from, so that a build resumes only on the same.

At the first commit :func:`data_record` stores in the manifest (``"dataset"``): the number
of samples when known in advance, a SHA-256 of the first and the last sample (inputs and
targets, read through the dataset's own ``__getitem__``), and, when the dataset lists its
files (``samples`` / ``imgs`` of torchvision folders, ``files``), a SHA-256 of their paths.
Resuming compares them (:func:`data_differences`): a dataset of another length, or whose
first or last sample or file list changed, would otherwise mix two datasets in one index
or stop early and call it complete.

Cheap on purpose: two samples are read, never the whole dataset. What it cannot see:
samples changed in the middle, and iterables without random access (only their length
is checked, when they run out before the stored count). A dataset whose samples differ
on every read (random augmentation) is recorded without sample digests (it is read twice
to tell) and a warning is logged.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

logger = logging.getLogger(__name__)


def _random_access(data: Any) -> Optional[Dataset]:
    """The map-style dataset behind ``data``, or None (iterables, streams)."""
    if isinstance(data, DataLoader):
        data = data.dataset
    if isinstance(data, Dataset) and not isinstance(data, IterableDataset) and hasattr(data, "__len__"):
        return data
    return None


def _update(digest, value: Any) -> bool:
    """Feed ``value`` into ``digest``; False when it holds something without stable bytes."""
    if torch.is_tensor(value):
        t = value.detach().cpu().contiguous()
        digest.update(f"tensor{t.dtype}{list(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return True
    if isinstance(value, np.ndarray):
        digest.update(f"array{value.dtype}{list(value.shape)}".encode())
        digest.update(np.ascontiguousarray(value).tobytes())
        return True
    if isinstance(value, (str, bytes, int, float, bool, type(None), np.generic)):
        digest.update(repr(value).encode())
        return True
    if isinstance(value, dict):
        ok = True
        for key in sorted(value, key=str):
            digest.update(repr(key).encode())
            ok &= _update(digest, value[key])
        return ok
    if isinstance(value, (tuple, list)):
        digest.update(f"seq{len(value)}".encode())
        return all([_update(digest, v) for v in value])
    if hasattr(value, "tobytes") and hasattr(value, "size"):  # PIL images
        digest.update(f"{type(value).__name__}{getattr(value, 'mode', '')}{value.size}".encode())
        digest.update(value.tobytes())
        return True
    digest.update(type(value).__name__.encode())
    return False


def sample_digest(dataset: Dataset, i: int) -> Optional[str]:
    """SHA-256 of sample ``i`` (None when it cannot be read or has no stable bytes)."""
    try:
        item = dataset[i]
    except Exception as exc:  # noqa: BLE001 - only a fingerprint: the build reports read errors itself
        logger.info("sample %d could not be read for the data fingerprint (%s: %s)", i, type(exc).__name__, exc)
        return None
    digest = hashlib.sha256()
    return digest.hexdigest() if _update(digest, item) else None


def _file_list_digest(dataset: Dataset, n: int) -> Optional[str]:
    for attribute in ("samples", "imgs", "files"):
        entries = getattr(dataset, attribute, None)
        if isinstance(entries, (list, tuple)) and len(entries) == n:
            digest = hashlib.sha256()
            for entry in entries:
                path = entry[0] if isinstance(entry, (tuple, list)) and entry else entry
                digest.update(str(path).encode() + b"\0")
            return digest.hexdigest()
    return None


def data_record(data: Any, total: Optional[int]) -> Dict[str, Any]:
    """The ``"dataset"`` entry of a manifest (see the module docstring)."""
    record: Dict[str, Any] = {"length": total, "first": None, "last": None, "files": None}
    dataset = _random_access(data)
    if dataset is None or not total:
        return record
    first = sample_digest(dataset, 0)
    if first is not None and sample_digest(dataset, 0) != first:
        logger.warning("sample 0 of the data differs between two reads (random augmentation?): a resumed build "
                       "cannot check that it continues on the same data, and its features are not reproducible")
        first = None
    if first is not None:
        record["first"], record["last"] = first, sample_digest(dataset, total - 1)
    record["files"] = _file_list_digest(dataset, total)
    return record


def data_differences(stored: Optional[Dict[str, Any]], data: Any, total: Optional[int]) -> List[str]:
    """How ``data`` differs from what ``stored`` (a :func:`data_record`) describes."""
    if not stored:
        return []
    out = []
    if stored.get("length") is not None and total is not None and stored["length"] != total:
        out.append(f"length: {stored['length']} samples when the build started, {total} now")
    dataset = _random_access(data)
    if dataset is None or not total:
        return out
    for key, i in (("first", 0), ("last", total - 1)):
        if stored.get(key) is not None and (key == "first" or not out):
            now = sample_digest(dataset, i)
            if now is not None and now != stored[key]:
                out.append(f"{key} sample (id {i}): its contents differ (SHA-256 {stored[key][:12]}... then, "
                           f"{now[:12]}... now)")
    if stored.get("files") is not None:
        now = _file_list_digest(dataset, total)
        if now is not None and now != stored["files"]:
            out.append("file list: the dataset's file paths differ")
    return out
