"""``audit(index=PATH)`` / ``nnsim audit --index PATH``: the audit of a finished index
folder, with no model and no data (the features are read where they are stored)."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

from ..errors import InputError, StoreError
from .output_choice import DEFAULT_K, DENOISING_INDEX

logger = logging.getLogger(__name__)



def index_folders(path: Union[str, Path]) -> Tuple[Path, Optional[Path]]:
    """``(index folder, denoising index folder or None)`` of ``path``: an index folder
    (``manifest.json`` in it) or an audit's output folder (``index/`` and, for classifiers
    audited on all outputs, ``index-denoising/``)."""
    path = Path(path)
    if (path / "manifest.json").is_file():
        return path, None
    if (path / "index" / "manifest.json").is_file():
        denoise = path / DENOISING_INDEX
        return path / "index", denoise if (denoise / "manifest.json").is_file() else None
    raise InputError(
        f"--index {path}: no index there (neither {path / 'manifest.json'} nor {path / 'index' / 'manifest.json'}); "
        "give an index folder written by build_index or an audit's output folder"
    )


def audit_index(
    index: Union[str, Path],
    *,
    out_dir: Optional[Union[str, Path]] = None,
    k: int = DEFAULT_K,
    recall: float = 0.95,
    exact_neighbors: Optional[bool] = None,
    max_memory=None,
    thresholds=None,
    progress: bool = True,
    overwrite: bool = False,
    save: bool = True,
    class_names=None,
):
    """Every check of the audit on the index folder ``index`` (see :func:`index_folders`),
    without re-running the model. ``recall`` is the neighbour step's target recall@k (1:
    exact search, as ``exact_neighbors=True``); ``max_memory`` (bytes or text like
    ``"2GB"``) bounds one block of it. The result is written to ``out_dir`` (a folder other
    than the one holding the index; the index is referred to, not copied); an interrupted
    neighbour step resumes when called again with the same arguments."""
    from ..index import load_index
    from ..index.all_neighbors import check_recall
    from .analysis import analyse
    from .batch_memory import parse_memory
    from .output_folder import NEIGHBOR_STATE, prepare_out_dir
    from .run_arguments import require_audit_extra, usable_k
    from .thresholds import Thresholds

    started = time.time()
    require_audit_extra()
    check_recall(recall)
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise InputError(f"k must be a positive integer, got {k!r}")
    budget = parse_memory(max_memory)
    limits = Thresholds.make(thresholds)
    main, denoise = index_folders(index)
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        source = Path(index).resolve()
        if out.resolve() == source or out.resolve() == main.resolve().parent and main.name == "index":
            raise StoreError(
                f"--out {out} is the folder holding the index; write the new audit to another folder (its index is "
                "referred to, not copied)"
            )
        prepare_out_dir(out, _config(main, k, recall, exact_neighbors, thresholds), overwrite=overwrite)
    idx = load_index(main)
    paper = load_index(denoise) if denoise is not None else None
    state = out / NEIGHBOR_STATE if out is not None else None
    layers = _layers_of(main)
    result = analyse(idx, k=usable_k(int(k), idx.n_valid), thresholds=limits, progress=progress,
                     denoise_index=paper, recall=recall, exact_neighbors=exact_neighbors,
                     max_memory=budget, neighbor_state=state, class_names=class_names,
                     context={"neighbor_layers": layers})
    result.summary.update({"index_path": str(main.resolve()), "seconds": round(time.time() - started, 2)})
    if layers is not None:  # the index's features hold these layers only: the report says so again
        result.summary["neighbor_layers"] = layers
    if out is not None and save:
        result.save(out, _finish=True, copy_index=False)
        from ..index.all_neighbors import remove_state

        remove_state(state)
    return result


def _layers_of(main: Path) -> Optional[str]:
    """The layers an earlier audit built this index from (its summary.json beside the
    index folder), so the warnings do not advise what it already did; None if unknown."""
    import json

    try:
        summary = json.loads((main.parent / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    layers = summary.get("neighbor_layers") if isinstance(summary, dict) else None
    return layers if isinstance(layers, str) else None


def _config(main: Path, k: int, recall: float, exact, thresholds) -> Dict[str, Any]:
    """What identifies the run for resuming."""
    import json

    manifest = json.loads((main / "manifest.json").read_text())
    return {"index": str(main.resolve()), "index_updated": manifest.get("updated"), "k": k, "recall": recall,
            "exact_neighbors": exact, "thresholds": thresholds if isinstance(thresholds, dict) else None}
