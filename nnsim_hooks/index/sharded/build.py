"""``build_index`` shared by several processes: under torch.distributed, or ``shard=(i, n)``.

Under a process group (torchrun, a DDP job) of more than one process, every rank calls
``h.build_index(data, path)`` with the same arguments, and:

1. the ranks agree first: same dataset length, model fingerprint (weights, layers,
   sketch recipe and seed) and options, else the same error on every rank naming the rank
   that differs (:func:`~nnsim_hooks.index.sharded.distributed.agree`);
2. rank 0 holds the folder's lock for the whole build (a second job, or a one-process
   build, on the same folder is refused); each rank extracts its contiguous share of the
   ids into ``path/shards/rank-RRRRR-of-NNNNN/``, a normal resumable store locked by that
   rank (:mod:`nnsim_hooks.index.sharded.shards`);
3. once every rank is done, rank 0 checks and merges the shards into ``path`` itself
   (an ordinary index folder) and builds the FAISS index;
4. every rank returns the same merged :class:`GradientIndex` (memory-mapped from the
   shared folder, so no copy per rank).

A failure on any rank (a bad batch, a full disk, a refused lock) raises on every rank.
Rerunning the same command after a crash resumes every shard. A folder whose shards come
from another number of processes is refused (resume with that number, or overwrite); a
finished folder is returned whatever the number of processes now.

The model is only run forward and backward for the features: no gradients are
exchanged. Attach to the bare model or to its ``DistributedDataParallel`` wrapper
(``attach`` unwraps ``.module``, so no DDP hook or buffer broadcast runs).

Without a process group, ``shard=(i, n)`` builds share ``i`` only (on any machine, in
any order, into the same folder or copied there later) and returns None; then
:func:`~nnsim_hooks.index.sharded.shards.merge_shards` (``nnsim index merge PATH``) merges them.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch.utils.data import DataLoader, Subset

from ...errors import DataError, IndexMismatchError, InputError, StoreError
from . import distributed as dist_
from ..folder.lock import FolderLock, describe_holder
from ..folder.manifest import new_manifest, read_manifest
from ..folder.reuse import check_same_build
from ...safe_files import refuse_link
from .shards import (
    check_layout,
    check_shard_arg,
    has_shards,
    remove_shards,
    shard_folder,
    shard_info,
    write_merged,
)
from ..folder.store import Store, clear_folder, is_store
from ..gradient_index import GradientIndex, load_index

logger = logging.getLogger(__name__)


def plan(path, distributed: Optional[bool], shard, overwrite: bool) -> Optional[Tuple]:
    """How to build: ``("distributed", ctx)``, ``("shard", i, n)`` or None (one process, the
    usual way; a folder holding shards is then refused, or cleared with ``overwrite``)."""
    if shard is not None:
        i, n = check_shard_arg(shard)
        if distributed:
            raise InputError("pass shard=(i, n) or distributed=True, not both: under a process group the ranks "
                             "choose their shares themselves")
        if path is None:
            raise InputError("shard=(i, n) needs a path: the shards are merged from the index folder")
        return ("shard", i, n)
    ctx = dist_.current(distributed)
    if ctx is not None and path is None and distributed is None:
        logger.warning("build_index under torch.distributed without a path: %s builds the whole index alone, in "
                       "memory (the ranks share a build through an index folder every rank sees)", ctx)
        return None
    if ctx is not None:
        return ("distributed", ctx)
    if path is not None and has_shards(Path(path)) and not _merged(Path(path)):
        if overwrite:
            writer = describe_holder(path)
            if writer is not None:
                raise StoreError(f"'{path}' is being written by {writer}: wait for it to finish, or stop it")
            # the shards are deleted by Store.create, under the folder's lock, once every check passed
        else:
            raise IndexMismatchError(
                f"'{path}' holds the shards of a build shared by several processes: resume it the same way (the same "
                "torchrun command, or shard=(i, n)), merge it when every shard is done (nnsim index merge PATH), or "
                "pass overwrite=True to start again in one process"
            )
    return None


def _merged(path: Path) -> bool:
    return is_store(path) and bool(read_manifest(path).get("extraction_complete"))


def shard_data(data: Any, start: int, stop: int):
    """The samples ``start..stop-1`` of ``data`` (needs a length: tensor, map-style Dataset
    or a sequential DataLoader over one)."""
    from ...data.batch_source import BatchSource, _is_map_dataset

    if torch.is_tensor(data):
        return data[start:stop]
    if isinstance(data, DataLoader):
        if not BatchSource._can_jump(data):
            raise DataError(
                "sharding a DataLoader needs one over a map-style Dataset with the default sequential sampler; pass "
                "the Dataset itself (and batch_size=)"
            )
        return DataLoader(Subset(data.dataset, range(start, stop)), batch_size=data.batch_size,
                          collate_fn=data.collate_fn, num_workers=data.num_workers,
                          worker_init_fn=data.worker_init_fn, pin_memory=data.pin_memory)
    if _is_map_dataset(data):
        return Subset(data, range(start, stop))
    raise DataError(
        f"a build shared by several processes needs data of known length (a tensor, a map-style Dataset or a "
        f"sequential DataLoader over one), got {type(data).__name__}: each process must know its share"
    )


def run(planned: Tuple, handle, data, path, options: Dict[str, Any], *, build_local: Callable[..., Any]):
    """Build as ``planned`` (see :func:`plan`); ``options`` are build_index's keyword
    arguments; ``build_local(handle, data, folder, **options)`` builds one share's store in
    this process (:func:`nnsim_hooks.index.build.build_local`)."""
    from ...data.batch_source import BatchSource

    if options["use_targets"] is None:
        options = dict(options, use_targets=handle.wants_targets)
    batch_size = handle.batch_size if options["batch_size"] is None else options["batch_size"]
    if planned[0] == "shard":
        _, i, n = planned
        source = BatchSource(data, batch_size, options["num_workers"])
        total = _total(source)
        if _merged(Path(path)):
            # the same checks as any reuse: a merged index of other data or another model is refused
            check_same_build(read_manifest(Path(path)), Path(path), fingerprint=handle.fingerprint(), data=data,
                             total=total, use_targets=options["use_targets"])
            logger.info("'%s' is merged already; shard %d of %d has nothing left to do", path, i, n)
            return None
        check_layout(Path(path), n, total)
        _build_share(build_local, handle, data, Path(path), i, n, total, source.describe(), options)
        return None
    ctx = planned[1]
    return _run_distributed(ctx, build_local, handle, data, path, batch_size, options)


def _total(source) -> int:
    total = source.total
    if total is None:
        raise DataError(
            f"a build shared by several processes needs data of known length, got {source.describe()} without one: "
            "pass a map-style Dataset, a tensor or a sequential DataLoader over one"
        )
    if total == 0:
        raise DataError(f"the dataset is empty ({source.describe()} of length 0): there is nothing to index")
    return total


def _summary(handle, total: int, options: Dict[str, Any]) -> Dict[str, Any]:
    fingerprint = handle.fingerprint()
    if fingerprint.get("output") == "auto":
        fingerprint = {k: v for k, v in fingerprint.items() if k != "output"}
    return {"samples": total, "fingerprint": fingerprint,
            **{k: options[k] for k in ("use_targets", "task", "store_outputs", "index", "overwrite")},
            "index_options": repr(options["index_options"])}


def _run_distributed(ctx, build_local, handle, data, path, batch_size: int, options: Dict[str, Any]):
    from ...data.batch_source import BatchSource

    def prelude():
        if path is None:
            raise InputError(
                "build_index under torch.distributed needs a path on a filesystem every rank sees (the ranks write "
                "their shares there and rank 0 merges them); or pass distributed=False to build on each rank alone"
            )
        source = BatchSource(data, batch_size, options["num_workers"])
        return source, _total(source)

    source, total = dist_.everywhere(ctx, "checking the data", prelude, timeout=dist_.agree_timeout())
    dist_.agree(ctx, _summary(handle, total, options), "data, model and options")
    path = Path(path)
    lock = FolderLock(path, f"build_index, rank 0 of {ctx.world}")
    dist_.on_main(ctx, "locking the index folder", lock.acquire, timeout=dist_.agree_timeout())
    try:
        state = dist_.on_main(ctx, "inspecting the index folder",
                              lambda: _prepare_folder(path, total, ctx.world, options, handle, data))
        state = dist_.broadcast(ctx, state, "sharing the folder's state")
        if state != "merged":
            progress = options["progress"] and ctx.main
            dist_.everywhere(
                ctx, "extracting the features",
                lambda: _build_share(build_local, handle, data, path, ctx.rank, ctx.world, total, source.describe(),
                                     dict(options, progress=progress)))
        dist_.on_main(ctx, "merging the shards", lambda: _merge_locked(path, state, options))
    finally:
        if ctx.main:
            lock.release()
    # FAISS-GPU puts an index on GPU 0: by default only rank 0 does (ShardedQueries uses every rank's GPU)
    gpu = options["gpu"] if options["gpu"] is not None else (None if ctx.main else False)
    idx = dist_.everywhere(ctx, "opening the merged index", lambda: load_index(path, gpu=gpu))
    idx.check_handle(handle)
    return idx


def _prepare_folder(path: Path, total: int, world: int, options: Dict[str, Any], handle, data) -> str:
    """Rank 0, holding the lock: ``"merged"`` (a finished index of this model and data:
    return it), or ``"build"`` after clearing the folder (overwrite: every check first,
    then the deletes) or checking that its shards fit this build."""
    if options["overwrite"]:
        clear_folder(path)
        return "build"
    if is_store(path):
        manifest = read_manifest(path)
        if not manifest.get("extraction_complete"):
            raise IndexMismatchError(
                f"'{path}' holds an interrupted build by one process ({manifest['count']} samples): resume it the "
                "same way (distributed=False, without torchrun), or pass overwrite=True"
            )
        check_same_build(manifest, path, fingerprint=handle.fingerprint(), data=data, total=total,
                         use_targets=options["use_targets"])
        return "merged"
    check_layout(path, world, total)
    return "build"


def _merge_locked(path: Path, state: str, options: Dict[str, Any]):
    manifest = read_manifest(path) if state == "merged" else write_merged(path)
    GradientIndex.from_store(Store(path, manifest), options["index"], options["index_options"], gpu=options["gpu"],
                             progress=options["progress"])
    if has_shards(path):
        remove_shards(path, keep_links=True)


def _build_share(build_local, handle, data, path: Path, i: int, n: int, total: int, describe: str,
                 options: Dict[str, Any]) -> None:
    """Extract share ``i`` of ``n`` into its shard folder (resuming what is there)."""
    info = shard_info(i, n, total, describe)
    folder = shard_folder(path, i, n)
    refuse_link(folder.parent)  # a shard is written only inside the folder: never through a link
    refuse_link(folder)
    if is_store(folder):
        stored = read_manifest(folder).get("shard") or {}
        keys = ("index", "count", "start", "stop", "total")
        if any(stored.get(k) != info[k] for k in keys):
            raise IndexMismatchError(
                f"the shard '{folder}' holds samples {stored.get('start')}..{stored.get('stop')} of "
                f"{stored.get('total')}, this build wants {info['start']}..{info['stop']} of {total}: it was built "
                "from other data. Use another path, or overwrite=True"
            )
        if info["start"] == info["stop"]:
            return
    else:
        manifest = new_manifest(None, {"data": "Subset", "batch_size": options["batch_size"],
                                       "use_targets": options["use_targets"]})
        manifest["shard"] = info
        if info["start"] == info["stop"]:  # an empty share: a finished store of nothing
            manifest.update(extraction_complete=True, complete=True)
        with FolderLock(folder, f"creating shard {i} of {n}"):
            if not is_store(folder):
                Store.create(folder, manifest)
        if info["start"] == info["stop"]:
            return
    build_local(handle, shard_data(data, info["start"], info["stop"]), folder,
                **dict(options, index="flat", index_options=None, gpu=False, overwrite=False))
