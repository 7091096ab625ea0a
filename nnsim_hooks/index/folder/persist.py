"""Index folders: writing a finished index (``save``, ``from_features``, ``finish``) and
reading one back (``read_index_folder``, for ``load_index``).

This module sits below :class:`~nnsim_hooks.index.GradientIndex`: it reads and writes
columns, manifests and FAISS files, and hands back what the class is built from (so the
class can call it without an import cycle)."""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import numpy as np
import torch

from ...errors import DataError, InputError, StoreError
from ...atomic import write_json_atomic
from ...safe_files import (is_link, make_folder, make_temporary_folder, move_folder, refuse_links, remove_empty_folder,
                           remove_owned, remove_temporary_folder)
from ..backend import FaissIndex, IndexSpec, make_spec
from ..arguments import UNIT_TOLERANCE, as_float32_rows, defined_rows
from .index_file import check_index_files, index_file_path, remove_other_index_files, write_index_file
from .integrity import check_column_checksums, column_checksums, drop_nonfinite_rows
from .lock import FolderLock, describe_holder
from .manifest import MANIFEST, new_manifest, now, read_manifest
from .schema import COLUMNS, is_store_owned
from .shard_folders import has_shards
from .store import ColumnSpec, Store, is_store, open_columns, remove_store_files, write_column

PathLike = Union[str, "os.PathLike[str]"]
logger = logging.getLogger(__name__)
# Rows of input features read at once by from_features().
BLOCK_BYTES = 64 << 20


def save_index(index, path: PathLike, *, overwrite: bool = False) -> Path:
    """Write ``index`` (a :class:`~nnsim_hooks.index.GradientIndex`) to the folder ``path`` (atomically: a reader sees the old folder or
    the complete new one). Returns the path."""
    path = Path(path)
    if index.path is not None and path.resolve() == index.path.resolve():
        return path  # already there: every change is written as it is made
    if path.exists() and not path.is_dir():
        raise StoreError(f"'{path}' is a file; an index needs a folder path")
    if path.is_dir() and any(path.iterdir()):
        if not is_store(path):
            raise StoreError(f"'{path}' is not empty and is not an nnsim_hooks index; choose a new or empty folder")
        if not overwrite:
            raise StoreError(f"'{path}' already holds an index; pass overwrite=True to replace it")
        writer = describe_holder(path)
        if writer is not None:
            raise StoreError(f"'{path}' is being written by {writer}; wait for it to finish, or save elsewhere")
        foreign = sorted(p.name for p in path.iterdir() if not is_store_owned(p.name))
        if foreign:  # the whole folder is replaced: only when it holds nothing but the index
            raise StoreError(
                f"'{path}' holds an index and files the index did not write ({', '.join(foreign[:5])}); overwrite "
                "replaces the whole folder, so move them away first, or save elsewhere"
            )
        refuse_links(path, is_store_owned)  # the old folder's files are deleted after the swap
    if is_link(path):
        raise StoreError(f"'{path}' is a symbolic link: save replaces the whole folder, which would replace your "
                         f"link; save to the folder it points to ({path.resolve()}) instead")
    make_folder(path.parent, own=False)
    tmp = make_temporary_folder(path.parent, path.name)
    try:
        for name in COLUMNS:
            col = index.column(name)
            if col is None:
                continue
            write_column(tmp / ColumnSpec(name, col.dtype.name, col.shape[1:]).file, col)
        index_file = None if index.spec.exact else write_index_file(tmp, index.backend)
        manifest = dict(index.manifest, updated=now(), index=index.spec.to_dict(), complete=True, index_file=index_file,
                        checksums=column_checksums({n: index.column(n) for n in ("ids", "valid")}))
        write_json_atomic(tmp / MANIFEST, manifest)
        _swap_in(tmp, path)
    except BaseException:
        remove_temporary_folder(tmp)
        raise
    return path


def index_from_features(features, labels=None, predictions=None, probabilities=None, norms=None, outputs=None, *,
                  index: str = "flat", index_options: Optional[Dict[str, Any]] = None,
                  path: Optional[PathLike] = None, overwrite: bool = False, normalize: bool = False,
                  progress: bool = False) -> Tuple[Store, Optional[FaissIndex]]:
    """The store of given feature rows, without a model (benchmarks, tests, features
    computed elsewhere), finished (see :func:`finish`); the FAISS index built if not flat.

    ``features``: float32 ``[N, D]`` unit rows (``normalize=True`` normalizes them);
    NaN or all-zero rows mark samples without a gradient direction. ``labels``,
    ``predictions`` (int [N]), ``probabilities`` ([N, C]; predictions default to their
    argmax), ``norms`` ([N], default 1: then the raw kernel equals the cosine) and
    ``outputs`` ([N, d]) are stored beside them. Written to the folder ``path`` if given.
    """
    feats = as_float32_rows(features, None, "features")  # a memmap stays a memmap
    n = len(feats)
    if n == 0:
        raise DataError("from_features() got no rows: an index needs at least one sample")
    columns: Dict[str, np.ndarray] = {"ids": np.arange(n, dtype=np.int64)}
    if norms is not None:
        columns["norms"] = _column(norms, n, "norms", np.float32)
    if labels is not None:
        columns["labels"] = _column(labels, n, "labels", np.int64)
    if probabilities is not None:
        columns["probabilities"] = _column(probabilities, n, "probabilities", np.float32, ndim=2)
        if predictions is None:
            predictions = columns["probabilities"].argmax(1)
    if predictions is not None:
        columns["predictions"] = _column(predictions, n, "predictions", np.int64)
    if outputs is not None:
        columns["outputs"] = _column(outputs, n, "outputs", np.float32, ndim=2)
    manifest = new_manifest(None, {"data": "from_features"})
    task = "classification" if predictions is not None else ("regression" if outputs is not None else None)
    manifest.update(feature_dim=int(feats.shape[1]), task=task)
    folder = Path(path) if path is not None else None
    existed = folder is not None and folder.exists()
    with FolderLock(folder, "from_features") if folder is not None else contextlib.nullcontext():
        store = Store.create(folder, manifest, overwrite=overwrite)
        _write_rows(store, feats, columns, norms, normalize, folder, existed)
        return store, finish(store, index, index_options, progress=progress)


def _write_rows(store: Store, feats: np.ndarray, columns: Dict[str, np.ndarray], norms, normalize: bool,
                folder: Optional[Path], existed: bool) -> None:
    n = len(feats)
    store.define_columns([ColumnSpec("features", "float32", feats.shape[1:]), ColumnSpec("valid", "bool")]
                         + [ColumnSpec(k, v.dtype.name, v.shape[1:]) for k, v in columns.items()]
                         + ([ColumnSpec("norms", "float32")] if norms is None else []))
    try:
        # block by block, so that a memory-mapped [N, D] input is never loaded whole
        block = max(1, BLOCK_BYTES // max(1, feats[:1].nbytes))
        for start in range(0, n, block):
            rows = _unit_rows(np.array(feats[start : start + block]), start, normalize)
            valid = defined_rows(rows)
            chunk = {k: v[start : start + block] for k, v in columns.items()}
            chunk.update(features=rows, valid=valid)
            if norms is None:
                chunk["norms"] = valid.astype(np.float32)  # unit norms: the raw kernel is the cosine
            store.append(chunk)
        store.commit(extraction_complete=True)
    except BaseException:
        store.close()
        if folder is not None:  # leave no half-written folder
            remove_store_files(folder)
            if not existed:
                remove_owned(folder, is_store_owned)  # the lock file too: nobody else writes here
                remove_empty_folder(folder)
        raise
    store.close()


def _unit_rows(rows: np.ndarray, offset: int, normalize: bool) -> np.ndarray:
    """Zero the undefined rows (NaN or zero) and check (or make) unit norms of the others."""
    valid = defined_rows(rows)
    rows[~valid] = 0.0
    lengths = np.linalg.norm(rows[valid], axis=1)
    if normalize:
        rows[valid] /= lengths[:, None]
    elif len(lengths) and np.abs(lengths - 1).max() > UNIT_TOLERANCE:
        worst = int(np.flatnonzero(valid)[np.abs(lengths - 1).argmax()])
        raise InputError(
            f"feature rows must have unit norm (row {offset + worst} has norm {np.linalg.norm(rows[worst]):.4g}); "
            "pass normalize=True, or use features from handle.features()"
        )
    return rows


def _column(x, n: int, name: str, dtype, ndim: int = 1) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if x.ndim == 1 and ndim == 2:
        x = x[:, None]
    if x.ndim != ndim or len(x) != n:
        want = f"[{n}]" if ndim == 1 else f"[{n}, C]"
        raise InputError(f"{name} must have shape {want} (one row per feature row), got {list(x.shape)}")
    if dtype == np.int64 and not np.issubdtype(x.dtype, np.integer):
        raise InputError(f"{name} must be integers, got {x.dtype}")
    return np.ascontiguousarray(x, dtype=dtype)


def _swap_in(tmp: Path, path: Path) -> None:
    """Move the finished folder ``tmp`` to ``path``, replacing an old index there (whose
    files are then deleted: only the store's own, through no link)."""
    if path.is_dir() and any(path.iterdir()):
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        move_folder(path, old)
        move_folder(tmp, path)
        remove_owned(old, is_store_owned)
        if not remove_empty_folder(old):
            logger.warning("kept %s: it holds files the index did not write", old)
    else:
        if path.is_dir():
            remove_empty_folder(path)
        move_folder(tmp, path)


def finish(store: Store, index: str, index_options: Optional[Dict[str, Any]], *,
           progress: bool) -> Optional[FaissIndex]:
    """Build (or reuse) the FAISS index of a fully extracted store and mark it complete:
    the index built now (None when reused, or flat: built on first search). The store's
    manifest then records the index's spec."""
    arrays = store.arrays()
    manifest = store.manifest
    n_valid = int(np.count_nonzero(arrays["valid"]))
    spec = make_spec(index, n_valid, index_options)
    stored = manifest.get("index")
    file = index_file_path(store.path, manifest)
    reuse = (
        manifest.get("complete")
        and stored is not None
        and IndexSpec.from_dict(stored).factory == spec.factory
        and (spec.exact or (file is not None and file.is_file()))
        and not index_options
    )
    if reuse:
        return None
    check_index_files(store.path)
    backend, index_file = None, None
    if not spec.exact:  # built now, to be saved; a flat index is built on first search
        backend = FaissIndex.build(arrays["features"], arrays["valid"], spec, progress=progress)
        if store.path is not None:
            index_file = write_index_file(store.path, backend)  # under a new name: the old one stays valid
    store.commit(index=spec.to_dict(), complete=True, index_file=index_file, checksums=column_checksums(arrays))
    if store.path is not None:
        remove_other_index_files(store.path, store.manifest)  # after the commit: a kill leaves old or new
    return backend


def read_index_folder(path: Path, *, mmap: bool = True) -> Tuple[Dict[str, np.ndarray], Dict[str, Any]]:
    """The checked columns and manifest of a finished index folder (what
    :func:`~nnsim_hooks.index.load_index` opens).

    What is checked (each failure a :class:`~nnsim_hooks.errors.StoreError` naming the file):
    the manifest's fields, types and bounds (:mod:`.manifest_fields`); that every column file
    holds exactly ``count`` rows; ``ids.bin``, ``valid.bin`` and ``index.faiss`` against
    their records (:mod:`.integrity`). Non-finite feature rows are marked not valid, with a warning. A folder still being
    written is refused, naming the writer; so is a folder of shards not merged yet.
    """
    if not is_store(path) and has_shards(path):
        raise StoreError(
            f"'{path}' holds the shards of a build shared by several processes, not merged yet: finish every "
            f"shard, then merge them (nnsim index merge {path}, or nnsim_hooks.index.merge_shards(path))"
        )
    manifest = read_manifest(path)
    if not manifest.get("complete"):
        writer = describe_holder(path) if path.is_dir() else None
        if writer is not None:
            raise StoreError(
                f"the index at '{path}' is being built by {writer} ({manifest['count']} samples committed so far): "
                "wait for that build to finish, then load it"
            )
        raise StoreError(
            f"the index at '{path}' is incomplete ({manifest['count']} samples stored so far): its build was "
            "interrupted. Run handle.build_index(data, path) again with the same data to finish it"
        )
    columns = open_columns(path, manifest)
    check_column_checksums(columns, path, manifest)
    if not mmap:
        columns = {k: np.array(v) for k, v in columns.items()}
    columns = drop_nonfinite_rows(columns, path, manifest)
    return columns, manifest
