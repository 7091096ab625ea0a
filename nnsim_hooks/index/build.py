"""``build_index``: features of a whole dataset, stored resumably, then indexed by FAISS."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import numpy as np
import torch

from ..errors import DataError, ExtractionError, IndexMismatchError, InputError, NnsimError
from ..engine.outputs import CLASSIFIER_OUTPUTS
from ..data import batching
from ..data.batch_source import Batch, BatchSource, to_device
from ..model_device import model_device_dtype
from ..safe_files import remove_empty_folder
from .folder.data_fingerprint import data_record
from .gradient_index import GradientIndex
from .nonfinite_samples import blank_rows, extract_finite, fill_rows
from .folder.lock import FolderLock
from .folder.manifest import check_fingerprint, new_manifest
from .folder.reuse import check_same_build
from .folder.store import ColumnSpec, Store, is_store, remove_store_files
from .sharded import build as sharded_build

logger = logging.getLogger(__name__)

# Per-sample outputs (classes) stored when there are at most this many (store_outputs="auto").
MAX_STORED_OUTPUTS = 256


def build_index(
    handle,
    data,
    path: Optional[Union[str, Path]] = None,
    *,
    batch_size: Optional[int] = None,
    progress: bool = True,
    index: str = "flat",
    index_options: Optional[Dict[str, Any]] = None,
    gpu: Optional[bool] = None,
    overwrite: bool = False,
    store_outputs: Union[bool, str] = "auto",
    task: str = "auto",
    num_workers: int = 0,
    use_targets: Optional[bool] = None,
    distributed: Optional[bool] = None,
    shard: Optional[Tuple[int, int]] = None,
) -> Optional[GradientIndex]:
    """Extract features of every sample of ``data`` with ``handle`` and index them.

    Args:
        handle: what :func:`nnsim_hooks.attach` returned.
        data: a Dataset of ``(input, target)`` pairs or bare inputs, a DataLoader that does
            not shuffle, or an iterable of ``(inputs[, targets])`` batches (see
            :mod:`nnsim_hooks.data.batch_source`). Sample ids are positions in this order.
        path: a folder to store everything in (memory-mapped, resumable). When it holds
            an interrupted build of the same model, recipe and data, extraction continues
            where it stopped (rows written but not committed are cut off first); when it
            holds a finished one, that index is returned (rebuilding only the FAISS part if
            ``index`` differs). None keeps everything in memory. One writer at a time: a
            second one gets a :class:`StoreError` naming the first.
        batch_size: samples per batch for a Dataset (default: the handle's batch_size).
        progress: tqdm progress bars.
        index: ``"flat"`` (exact, default), ``"ivf"``, ``"hnsw"``, ``"sq8"``, ``"ivf_sq8"``
            or a FAISS factory string; ``index_options`` their options (see
            :mod:`nnsim_hooks.index.backend`).
        gpu: put the FAISS index on GPU (None: when FAISS has GPUs).
        overwrite: replace an index already at ``path`` (only the files the store writes
            are deleted; other files in the folder are kept).
        store_outputs: store softmax probabilities (classifiers) or raw outputs (others)
            beside the features: ``"auto"`` when at most 256 values per sample, or
            True / False. Predictions (argmax) are stored for classifiers regardless.
        task: ``"classification"``, ``"regression"`` or ``"auto"`` (classification when
            the handle differentiates a classifier output: contrast, logit or loss).
        num_workers: DataLoader workers when ``data`` is a Dataset.
        use_targets: pass the targets to the handle's output function (``"contrast"`` and
            ``"loss"`` then use the label). None (the default): only when the output
            function needs them (``"loss"``, or a callable of yours); the built-in outputs
            then stay label-free (the predicted class), which is what auditing possibly
            noisy labels needs. Labels are stored either way.
        distributed: under an initialised torch.distributed group of several processes
            (torchrun, a DDP job), None (the default) or True shares the work: each rank
            extracts its contiguous share of the ids into ``path/shards/``, rank 0 merges
            them, and every rank returns the merged index (see
            :mod:`nnsim_hooks.index.sharded.build`). False: this process builds alone.
        shard: ``(i, n)``, without a process group: build only share ``i`` of ``n`` into
            ``path/shards/`` and return None; merge the shards with ``nnsim index merge
            PATH`` or :func:`nnsim_hooks.index.merge_shards`.

    A sample whose input or per-sample gradient holds NaN or Inf is stored without a
    gradient (``valid`` False, ``norms`` NaN) and named in a warning; the rest of its batch
    is extracted without it (see :mod:`nnsim_hooks.index.nonfinite_samples`).

    Raises:
        IndexMismatchError: ``path`` holds an index of another model, output or recipe,
            or of other data (its length, first or last sample, file list: see
            :mod:`nnsim_hooks.index.folder.data_fingerprint`).
        ExtractionError: a batch failed (the message names it); the folder keeps every
            sample before it, and calling again resumes.
        StoreError: writing failed (disk full...); the folder keeps what was committed.
        DataError: empty or unusable data (a shuffling DataLoader...).
    """
    if store_outputs not in (True, False, "auto"):
        raise InputError(f"store_outputs must be True, False or 'auto', got {store_outputs!r}")
    if task not in ("auto", "classification", "regression"):
        raise InputError(f"task must be 'auto', 'classification' or 'regression', got {task!r}")
    options = dict(batch_size=batch_size, progress=progress, index=index, index_options=index_options, gpu=gpu,
                   overwrite=overwrite, store_outputs=store_outputs, task=task, num_workers=num_workers,
                   use_targets=use_targets)
    # Builds shared by several processes: nnsim_hooks.index.sharded.build, which runs this
    # module's one-process build on each share (handed in: sharded/ does not import us).
    planned = sharded_build.plan(path, distributed, shard, overwrite)
    if planned is not None:
        return sharded_build.run(planned, handle, data, path, options, build_local=build_local)
    return build_local(handle, data, path, **options)


def build_local(handle, data, path: Optional[Union[str, Path]], *, batch_size: Optional[int], progress: bool,
                index: str, index_options: Optional[Dict[str, Any]], gpu: Optional[bool], overwrite: bool,
                store_outputs: Union[bool, str], task: str, num_workers: int,
                use_targets: Optional[bool]) -> GradientIndex:
    """:func:`build_index` in this process alone (arguments as there, already checked)."""
    if use_targets is None:
        use_targets = handle.wants_targets
    source = BatchSource(data, handle.batch_size if batch_size is None else batch_size, num_workers)
    if source.total == 0:
        raise DataError(f"the dataset is empty ({source.describe()} of length 0): there is nothing to index")
    folder_existed = path is not None and Path(path).exists()
    lock = FolderLock(path, "build_index") if path is not None else None
    if lock is not None:
        lock.acquire()  # one writer per folder: a second build_index here gets a StoreError naming us
    try:
        return _build(handle, source, path, lock, folder_existed, overwrite, progress, index, index_options, gpu,
                      store_outputs, task, use_targets)
    finally:
        if lock is not None:
            lock.release()


def _build(handle, source: BatchSource, path, lock, folder_existed: bool, overwrite: bool, progress: bool, index,
           index_options, gpu, store_outputs, task, use_targets) -> GradientIndex:
    store = _open_store(handle, path, overwrite, source, use_targets)
    try:
        if not store.manifest.get("extraction_complete"):
            try:
                _extract(handle, source, store, progress, store_outputs, task, use_targets)
            except DataError:
                if store.on_disk and store.count == 0:  # nothing to resume: leave no empty index behind
                    store.close()
                    remove_store_files(store.path)
                    if not folder_existed:
                        lock.release()  # deletes the lock file, so the folder can go
                        remove_empty_folder(store.path)
                raise
        else:
            logger.info("the index at %s is complete (%d samples)", path, store.count)
    finally:
        store.close()
    return GradientIndex.from_store(store, index, index_options, gpu=gpu, progress=progress)


def _open_store(handle, path, overwrite: bool, source: BatchSource, use_targets: bool) -> Store:
    fingerprint = handle.fingerprint()
    if path is not None:
        path = Path(path)
        if is_store(path) and not overwrite:
            store = Store.reopen(path)
            check_same_build(store.manifest, path, fingerprint=fingerprint, data=source.data, total=source.total,
                             use_targets=use_targets)
            if store.count and not store.manifest.get("extraction_complete"):
                logger.info("resuming the index at %s from sample %d", path, store.count)
            return store
    manifest = new_manifest(fingerprint, {"data": source.describe(), "batch_size": source.batch_size,
                                          "use_targets": use_targets})
    manifest["fingerprint"] = None  # set from the first batch, once the output is resolved
    return Store.create(path, manifest, overwrite=overwrite)


def _extract(handle, source: BatchSource, store: Store, progress: bool, store_outputs, task: str,
             use_targets: bool) -> None:
    from tqdm.auto import tqdm

    device, _ = model_device_dtype(handle.model)
    source.pin_memory = device.type == "cuda"
    where = f"The index folder '{store.path}'" if store.on_disk else "The in-memory index"
    first = True
    next_number = None  # number of the batch being loaded, once one has been seen
    batches = source.batches(store.count)
    bar = tqdm(total=source.n_batches(store.count), desc="features", unit="batch", disable=not progress)
    deferred = []  # batches whose samples were all skipped (NaN or Inf) before the first stored one
    try:
        while True:
            label = "the next batch" if next_number is None else f"batch {next_number}"
            try:
                batch = next(batches)
            except StopIteration:
                break
            except NnsimError:
                raise
            except Exception as exc:
                raise ExtractionError(
                    f"loading {label} (samples from {store.count} on) failed: {type(exc).__name__}: "
                    f"{exc}. {where} keeps the {store.count} samples before it; fix the cause and call build_index "
                    "again with the same path to resume"
                ) from exc
            next_number = batch.number + 1
            if batch.size == 0:
                continue
            rows = _extract_batch(handle, batch, device, store, where, first, store_outputs, task, use_targets)
            if rows is None:  # every sample skipped before the columns were known: stored with the next batch
                deferred.append(batch)
                bar.update(1)
                continue
            first = False
            if deferred:
                shard_start = int((store.manifest.get("shard") or {}).get("start", 0))
                skipped = [skipped_rows(store, b.targets, b.start + shard_start, b.size) for b in deferred]
                rows = {k: np.concatenate([r[k] for r in skipped] + [rows[k]]) for k in rows}
                deferred = []
            updates = {}
            if store.on_disk and store.count == 0:  # what the first commit records of the data
                updates["dataset"] = data_record(source.data, source.total)
            store.append(rows)
            store.commit(**updates)
            bar.update(1)
    finally:
        bar.close()
    if store.count == 0:
        if deferred:
            raise DataError(f"every sample of the data ({source.describe()}) has a NaN or Inf input or gradient: "
                            "there is nothing to index")
        raise DataError(f"the data ({source.describe()}) yielded no samples: there is nothing to index")
    store.commit(extraction_complete=True)


def _extract_batch(handle, batch: Batch, device, store: Store, where: str, first: bool, store_outputs, task,
                   use_targets: bool) -> Optional[Dict[str, np.ndarray]]:
    """The batch's rows; samples with NaN or Inf are stored blank (see nonfinite_samples).
    None when all were, before any batch defined the columns."""
    n = batch.size
    name = f"batch {batch.number} (samples {batch.start} to {batch.start + n - 1})"
    try:
        targets = to_device(batch.targets, device) if use_targets else None
        parts, keep = extract_finite(handle, to_device(batch.inputs, device), targets, n)
    except Exception as exc:
        raise ExtractionError(
            f"{name} failed: {type(exc).__name__}: {exc}. {where} keeps the {store.count} samples before it; fix "
            "the cause and call build_index again with the same path to resume"
        ) from exc
    first_id = batch.start + int((store.manifest.get("shard") or {}).get("start", 0))  # a shard's ids are global
    if len(keep) < n:
        skipped = sorted(set(range(n)) - set(keep.tolist()))
        logger.warning("%s: samples with ids %s hold NaN or Inf (input or gradient) and are stored without a "
                       "gradient (valid=False, norm NaN)", name, [first_id + i for i in skipped[:10]])
    if not parts:  # every sample skipped: blank rows, once the columns are known
        return None if not store.columns else skipped_rows(store, batch.targets, first_id, n)
    if first:
        _check_or_set_fingerprint(handle, store)
    fb = type(parts[0]).join(parts)
    whole = len(keep) == n
    rows = batch_columns(fb, batch.targets if whole else batching.take(batch.targets, keep), first_id,
                         _task(handle, fb, task, store), store_outputs)
    if not whole:
        rows = fill_rows(rows, keep.numpy(), n)
        rows["ids"] = np.arange(first_id, first_id + n, dtype=np.int64)
        if "labels" in rows:
            rows["labels"] = label_column(batch.targets)
    if not store.columns:
        store.define_columns([ColumnSpec(k, v.dtype.name, v.shape[1:]) for k, v in rows.items()])
        store.manifest["feature_dim"] = int(rows["features"].shape[1])
    elif set(rows) != set(store.columns):
        raise DataError(
            f"{name} has columns {sorted(rows)} but the earlier batches had {sorted(store.columns)}: every batch "
            "must come with targets, or none"
        )
    elif rows["features"].shape[1] != store.manifest["feature_dim"]:
        raise IndexMismatchError(
            f"{name} has {rows['features'].shape[1]}-dimensional features but {where} holds "
            f"{store.manifest['feature_dim']}-dimensional ones"
        )
    return rows


def _check_or_set_fingerprint(handle, store: Store) -> None:
    """Compare the full fingerprint (output now resolved) before anything is written."""
    current = handle.fingerprint()
    stored = store.manifest.get("fingerprint")
    if stored is None:
        store.manifest["fingerprint"] = current
        store.manifest["sketch"] = current.get("sketch")
    else:
        check_fingerprint(stored, current, store.path or "<in memory>")


def _task(handle, fb, task: str, store: Store) -> Optional[str]:
    if store.manifest.get("task") is not None or store.columns:
        return store.manifest.get("task")
    outputs = fb.outputs
    if task == "auto":
        if outputs is None:
            task = None
        elif handle.output_name in CLASSIFIER_OUTPUTS and outputs.dim() == 2:
            task = "classification"
        else:
            task = "regression"
    if task == "classification" and (outputs is None or outputs.dim() != 2 or outputs.shape[1] < 2):
        shape = None if outputs is None else list(outputs.shape)
        raise InputError(f"task='classification' needs model outputs [B, C] with C >= 2, got {shape}")
    store.manifest["task"] = task
    return task


def batch_columns(fb, targets, start: int, task: Optional[str], store_outputs) -> Dict[str, np.ndarray]:
    """The stored columns of one :class:`~nnsim_hooks.attach.FeatureBatch`."""
    features = fb.features.detach().float().cpu().numpy()
    undefined = fb.undefined.detach().cpu().numpy().astype(bool)
    features[undefined] = 0.0  # zero rows: inert in sums and products; flagged by `valid`
    n = len(features)
    rows: Dict[str, np.ndarray] = {
        "features": features,
        "ids": np.arange(start, start + n, dtype=np.int64),
        "valid": ~undefined,
        "norms": fb.norms.detach().float().cpu().numpy(),
    }
    labels = label_column(targets)
    if labels is not None:
        rows["labels"] = labels
    outputs = fb.outputs.detach().float().cpu() if fb.outputs is not None else None
    if task == "classification":
        rows["predictions"] = outputs.argmax(1).long().numpy()
        if store_outputs is True or (store_outputs == "auto" and outputs.shape[1] <= MAX_STORED_OUTPUTS):
            rows["probabilities"] = torch.softmax(outputs, 1).numpy()
    elif task == "regression" and outputs is not None:
        flat = outputs.reshape(n, -1)
        if store_outputs is True or (store_outputs == "auto" and flat.shape[1] <= MAX_STORED_OUTPUTS):
            rows["outputs"] = flat.numpy()
    return rows


def label_column(targets) -> Optional[np.ndarray]:
    """The stored labels of a batch's targets: class indices, or None (no targets, or not indices)."""
    if targets is None:
        return None
    t = torch.as_tensor(targets).detach().cpu()
    return t.long().numpy() if t.dim() == 1 and not t.is_floating_point() and not t.is_complex() else None


def skipped_rows(store: Store, targets, first_id: int, n: int) -> Dict[str, np.ndarray]:
    """Rows of a batch whose samples were all skipped (NaN or Inf: see
    :mod:`nnsim_hooks.index.nonfinite_samples`), in the store's columns."""
    rows = blank_rows({name: (spec.dtype, spec.shape) for name, spec in store.columns.items()}, n)
    rows["ids"] = np.arange(first_id, first_id + n, dtype=np.int64)
    if "labels" in rows:
        rows["labels"] = label_column(targets)
    return rows
