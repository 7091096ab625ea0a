"""The JSON manifest of an index folder, and comparing model fingerprints.

The manifest is the folder's commit record: column files may hold more rows than
``count`` after a crash (a batch written but not committed); only the first ``count``
rows are valid, and resuming truncates the rest.

:func:`read_manifest` checks every field the store relies on (see :mod:`.schema`): a
manifest that was edited, truncated or crafted is a :class:`StoreError` naming the field,
never a garbage read or a file deleted outside the folder.
"""

from __future__ import annotations

import datetime
import json
import platform
from pathlib import Path
from typing import Any, Dict, List, Optional

from ...errors import IndexMismatchError, StoreError
from ...atomic import store_errors
from .manifest_fields import MAX_MANIFEST_BYTES, check_manifest, parse_manifest
from .schema import MANIFEST
FORMAT = "nnsim_hooks.index"
FORMAT_VERSION = 1


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def package_versions() -> Dict[str, str]:
    """Versions of what produced the features and the index."""
    import numpy
    import torch

    from ...version import __version__

    versions = {"nnsim_hooks": __version__, "numpy": numpy.__version__, "torch": torch.__version__}
    versions["python"] = platform.python_version()
    try:
        import faiss

        versions["faiss"] = getattr(faiss, "__version__", "unknown")
    except ImportError:  # pragma: no cover - faiss-cpu is a core dependency
        versions["faiss"] = "not installed"
    return versions


def new_manifest(fingerprint: Optional[Dict[str, Any]], source: Dict[str, Any]) -> Dict[str, Any]:
    """A manifest for an empty store; ``columns``, ``feature_dim`` and ``count`` are set as rows arrive."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created": now(),
        "updated": now(),
        "count": 0,
        "extraction_complete": False,
        "complete": False,
        "feature_dim": None,
        "task": None,
        "fingerprint": fingerprint,
        "sketch": (fingerprint or {}).get("sketch"),
        "columns": {},
        "index": None,
        "source": source,
        "versions": package_versions(),
    }


def read_manifest(folder: Path) -> Dict[str, Any]:
    """Read and sanity-check ``folder/manifest.json``."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise StoreError(
            f"'{folder}' is not an nnsim_hooks index folder: it has no {MANIFEST}. "
            "Build one with handle.build_index(data, path) or GradientIndex.from_features(..., path=...)"
        )
    with store_errors("reading", path), open(path, "rb") as f:
        raw = f.read(MAX_MANIFEST_BYTES + 1)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise StoreError(f"the manifest '{path}' is not UTF-8 text ({exc}); the folder is corrupt") from exc
    manifest = parse_manifest(text, path)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise StoreError(f"'{path}' is not an nnsim_hooks index manifest (no \"format\": \"{FORMAT}\")")
    version = manifest.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version != FORMAT_VERSION:
        raise StoreError(
            f"'{path}' uses index format version {_short(version, 40)}; this nnsim_hooks reads version {FORMAT_VERSION}. "
            "Rebuild the index with this version"
        )
    for key in ("count", "columns", "complete"):
        if key not in manifest:
            raise StoreError(f"the manifest '{path}' lacks the key '{key}'; the folder is corrupt")
    check_manifest(manifest, path)
    return manifest


def fingerprint_differences(stored: Any, current: Any, prefix: str = "") -> List[str]:
    """Human-readable differences between two fingerprints (nested dicts and lists)."""
    if isinstance(stored, dict) and isinstance(current, dict):
        out: List[str] = []
        for key in sorted(set(stored) | set(current), key=str):
            where = f"{prefix}.{key}" if prefix else str(key)
            if key not in stored:
                out.append(f"{where}: not in the stored index, now {_short(current[key])}")
            elif key not in current:
                out.append(f"{where}: stored {_short(stored[key])}, now missing")
            else:
                out.extend(fingerprint_differences(stored[key], current[key], where))
        return out
    if isinstance(stored, (list, tuple)) and isinstance(current, (list, tuple)):
        stored, current = list(stored), list(current)
        if stored == current:
            return []
        gone = [x for x in stored if x not in current]
        new = [x for x in current if x not in stored]
        detail = f"{len(stored)} stored vs {len(current)} now"
        if gone or new:
            detail += f"; only stored: {_short(gone)}; only now: {_short(new)}"
        return [f"{prefix or 'value'}: {detail}"]
    if stored != current:
        return [f"{prefix or 'value'}: stored {_short(stored)}, now {_short(current)}"]
    return []


def check_fingerprint(stored: Optional[Dict[str, Any]], current: Dict[str, Any], where: Any, *, unresolved_output: bool = False) -> None:
    """Raise :class:`IndexMismatchError` when ``current`` differs from ``stored``.

    ``unresolved_output``: the handle's output is still ``"auto"`` (no batch has run),
    so the output entry is not compared yet.
    """
    if stored is None:
        return
    if unresolved_output:
        stored = {k: v for k, v in stored.items() if k != "output"}
        current = {k: v for k, v in current.items() if k != "output"}
    stored_version = (stored.get("sketch") or {}).get("version")
    current_version = (current.get("sketch") or {}).get("version")
    if stored_version != current_version:
        raise IndexMismatchError(
            f"the index at '{where}' holds features sketched with sketch recipe version {stored_version}; this "
            f"nnsim_hooks sketches with version {current_version} (other random matrices), so its features cannot "
            "be compared with the stored ones. Rebuild the index (another path, or overwrite=True)"
        )
    diffs = fingerprint_differences(stored, current)
    if diffs:
        raise IndexMismatchError(
            f"the index at '{where}' was built with another model, output or sketch recipe than this handle:\n  - "
            + "\n  - ".join(diffs)
            + "\nUse the same model weights, output=, layers=, sketch_dim=, seed= and param_dim= as when it was "
            "built, or build a new index (another path, or overwrite=True)"
        )


def _short(value: Any, limit: int = 80) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."
