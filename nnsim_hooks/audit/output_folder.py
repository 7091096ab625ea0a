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
- a non-empty folder without the marker is never touched: choose another folder;
- a link where the audit keeps its own files or folders (``index/``, ``demo/``,
  ``table.csv``...) is refused, never written or deleted through; the folder given as
  ``out_dir`` may itself be a link;
- temporary files a killed audit left (``.table.csv.<random>.tmp``) are deleted by the
  next run in the folder.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Dict, Optional

from ..errors import StoreError
from ..atomic import store_errors, write_json_atomic
from ..safe_files import make_folder, refuse_link, remove_empty_folder, remove_file, remove_owned

logger = logging.getLogger(__name__)

MARKER = "nnsim-audit.json"
#: The files the audit writes at the top of its folder (what ``overwrite`` deletes, with
#: the two below).
OUTPUT_FILES = (MARKER, "report.html", "table.csv", "table.parquet", "summary.json", "per_class.csv", "knn_graph.npz")
#: The index folders it builds there (emptied of the index store's own files only).
INDEX_FOLDERS = ("index", "index-denoising")
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
        refuse_nested_links(folder)
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
            remove_temporaries(folder)
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
    make_folder(folder, own=False)  # the folder the user named may be a link; nothing inside it may
    remove_temporaries(folder)
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


def _nested(folder: Path):
    """Every path inside ``folder`` the audit writes or deletes (files and folders)."""
    folder = Path(folder)
    yield from (folder / name for name in INDEX_FOLDERS + OUTPUT_FILES)
    yield folder / "demo"
    yield from (folder / name for name in NESTED_FILES)


def refuse_nested_links(folder: Path) -> None:
    """A link where the audit keeps its own files or folders (``index/``, ``demo/``,
    ``table.csv``...) is refused: nothing is written or deleted through it."""
    for path in _nested(folder):
        refuse_link(path)


def _is_output_temporary(name: str) -> bool:
    return name.startswith(".") and name.endswith(".tmp") and any(
        name.startswith(f".{Path(f).name}.") for f in OUTPUT_FILES + NESTED_FILES)


def remove_temporaries(folder: Path) -> None:
    """Delete the temporary files a killed audit left (``.table.csv.<random>.tmp``...)."""
    folder = Path(folder)
    for where in (folder, folder / "demo"):
        if where.is_dir():
            remove_owned(where, _is_output_temporary, skip_links=True)


def remove_outputs(folder: Path) -> None:
    """Delete the audit's own files in ``folder`` (nothing else; see the module docstring).
    Every check that could refuse runs first, so that a refusal deletes nothing."""
    from ..index.folder.clearing import check_clearable, clear_folder
    from ..index.folder.lock import LOCK_FILE, describe_holder

    folder = Path(folder)
    refuse_nested_links(folder)
    indexes = [folder / name for name in INDEX_FOLDERS if (folder / name).exists()]
    for path in indexes:
        if not path.is_dir():
            raise StoreError(f"'{path}' is a file where the audit keeps an index folder; move it away first")
        writer = describe_holder(path)
        if writer is not None:
            raise StoreError(f"'{path}' is being written by {writer}; wait for it to finish, or stop it")
        check_clearable(path)
    for path in indexes:
        clear_folder(path)
        remove_owned(path, lambda name: name == LOCK_FILE)
        _remove_if_empty(path)
    for name in OUTPUT_FILES + NESTED_FILES:
        remove_file(folder / name)
    remove_temporaries(folder)
    _remove_if_empty(folder / "demo")


def _remove_if_empty(path: Path) -> None:
    if path.is_dir() and not remove_empty_folder(path):
        logger.warning("kept %s: it holds files the audit did not write (%s)", path,
                       ", ".join(sorted(p.name for p in path.iterdir())[:5]))


def mark_done(folder: Path, summary: Dict[str, Any]) -> None:
    marker = read_marker(folder) or {}
    marker.update({"state": "done", "summary": clean_json(summary)})
    write_json(Path(folder) / MARKER, marker)
