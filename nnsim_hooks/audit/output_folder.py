"""The audit's output folder rules (files are written by :mod:`nnsim_hooks.atomic`).

An output folder is *ours* when it holds the marker file ``nnsim-audit.json``, written
before anything else and updated when the audit finishes:

- a missing or empty folder is used as is;
- a folder with a *finished* audit is refused unless ``overwrite=True``, which deletes
  the audit's own files and only them: the files named in :data:`OUTPUT_FILES`, the
  index folders of :data:`INDEX_FOLDERS` (only the files the index store writes; a
  folder that then holds anything else is kept), ``demo/model.pt``. A file of yours in
  the folder, or in ``index/`` or ``demo/``, is never deleted;
- a folder with an *unfinished* audit of the same configuration is resumed: the
  gradient index inside it continues where it stopped (Ctrl-C, crash);
- an unfinished audit of another configuration is refused unless ``overwrite=True``
  (or unless it stored nothing yet: a run that failed early is simply replaced);
- a non-empty folder without the marker is never touched: choose another folder.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Dict, Optional

from ..errors import StoreError
from ..atomic import store_errors, write_json_atomic

logger = logging.getLogger(__name__)

MARKER = "nnsim-audit.json"
#: The files the audit writes at the top of its folder (what ``overwrite`` deletes, with
#: the two below).
OUTPUT_FILES = (MARKER, "report.html", "table.csv", "table.parquet", "summary.json", "per_class.csv", "knn_graph.npz")
#: The index folders it builds there (emptied of the index store's own files only).
INDEX_FOLDERS = ("index", "index-denoising")
#: Where the neighbour step keeps its progress (removed when the audit is saved).
NEIGHBOR_STATE = ".neighbors-progress"
#: Files in subfolders: the demo's trained model.
NESTED_FILES = ("demo/model.pt",)


def write_json(path: Path, obj: Any) -> None:
    """The audit's JSON files: strict JSON (no NaN: :func:`clean_json` first), written
    atomically."""
    write_json_atomic(path, obj, allow_nan=False)


def clean_json(obj: Any) -> Any:
    """NaN/inf -> None, numpy scalars -> Python, recursively (JSON has no NaN)."""
    import math

    import numpy as np

    if isinstance(obj, dict):
        return {str(k): clean_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean_json(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return clean_json(obj.tolist())
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return None if not math.isfinite(float(obj)) else float(obj)
    return obj


def read_marker(folder: Path) -> Optional[Dict[str, Any]]:
    path = Path(folder) / MARKER
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise StoreError(f"{path} is unreadable ({exc}); delete the folder or pass overwrite=True") from exc


def prepare_out_dir(folder, config: Dict[str, Any], overwrite: bool = False) -> bool:
    """Apply the folder rules of this module; return True when an unfinished audit is resumed."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise StoreError(f"the output path {folder} exists and is not a folder; choose another --out")
    with store_errors("reading the output folder", folder):
        entries = list(folder.iterdir()) if folder.exists() else []
    if entries:
        marker = read_marker(folder)
        if marker is None:
            raise StoreError(
                f"the output folder {folder} is not empty and holds no nnsim audit ({MARKER} missing); "
                "nothing in it is deleted: choose a new or empty folder"
            )
        same = clean_json(marker.get("config")) == clean_json(config)
        running = marker.get("state") == "running"
        if running and same and not overwrite:
            logger.info("resuming the unfinished audit in %s", folder)
            return True
        if running and not _holds_work(folder):
            overwrite = True  # a run that failed before storing anything: nothing to lose
        if not overwrite:
            what = "a finished audit" if marker.get("state") == "done" else "an unfinished audit of another configuration"
            raise StoreError(
                f"the output folder {folder} already holds {what}; pass --overwrite (overwrite=True) to replace it, "
                "or choose another folder"
            )
        remove_outputs(folder)
    with store_errors("creating the output folder", folder):
        folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / MARKER, {"state": "running", "config": clean_json(config)})
    return False


def _holds_work(folder: Path) -> bool:
    """Whether an unfinished audit stored anything worth resuming (features, a trained model)."""
    folder = Path(folder)
    if (folder / "demo" / "model.pt").exists():
        return True
    try:
        return int(json.loads((folder / "index" / "manifest.json").read_text()).get("count", 0)) > 0
    except (OSError, ValueError):
        return (folder / "index").exists()


def remove_outputs(folder: Path) -> None:
    """Delete the audit's own files in ``folder`` (nothing else; see the module docstring)."""
    from ..index.folder.lock import LOCK_FILE, describe_holder
    from ..index.folder.store import remove_store_files

    folder = Path(folder)
    with store_errors("deleting the old audit in", folder):
        for name in INDEX_FOLDERS:
            path = folder / name
            if path.is_symlink() or path.is_file():
                path.unlink()
            elif path.is_dir():
                writer = describe_holder(path)
                if writer is not None:
                    raise StoreError(f"'{path}' is being written by {writer}; wait for it to finish, or stop it")
                remove_store_files(path)
                (path / LOCK_FILE).unlink(missing_ok=True)
                _remove_if_empty(path)
        for name in OUTPUT_FILES + NESTED_FILES:
            path = folder / name
            if path.is_symlink() or path.is_file():
                path.unlink()
        _remove_if_empty(folder / "demo")


def _remove_if_empty(path: Path) -> None:
    if path.is_dir() and not any(path.iterdir()):
        path.rmdir()
    elif path.is_dir():
        logger.warning("kept %s: it holds files the audit did not write (%s)", path,
                       ", ".join(sorted(p.name for p in path.iterdir())[:5]))


def mark_done(folder: Path, summary: Dict[str, Any]) -> None:
    marker = read_marker(folder) or {}
    marker.update({"state": "done", "summary": clean_json(summary)})
    write_json(Path(folder) / MARKER, marker)
