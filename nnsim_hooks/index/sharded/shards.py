"""Shards of one index folder: their layout, their checks, and merging them.

A build shared by ``n`` processes (``torchrun``, or ``build_index(..., shard=(i, n))`` run
``n`` times, anywhere) writes each share into its own store inside the index folder::

    PATH/shards/rank-00000-of-00002/   samples [0, 76) of 151: a normal resumable store
    PATH/shards/rank-00001-of-00002/   samples [76, 151)

Shares are contiguous ranges of ids in dataset order (:func:`shard_range`: the first
``N % n`` shares hold one sample more), so concatenating the shards in rank order gives
the ids of a one-process build. Each shard's manifest records its share under
``"shard"`` (index, count, start, stop, total); its ``ids`` column holds dataset ids.

:func:`merge_shards` checks every shard (same fingerprint and sketch recipe, same dataset
length, complete, disjoint shares covering every id) and refuses a mismatch listing each
problem; then it writes the concatenated columns into ``PATH`` itself, which becomes an
ordinary index folder (``load_index(PATH)``; its manifest's ``"shards"`` records the
layout) and, unless ``keep_shards``, deletes the shards (so the features are not stored
twice). The merged files are written before the manifest that commits them: a merge
interrupted before that commit is simply redone.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from ...errors import IndexMismatchError, InputError, StoreError
from ...atomic import write_all, write_atomic, write_json_atomic
from ..folder.manifest import MANIFEST, fingerprint_differences, now, read_manifest
from ..folder.shard_folders import SHARDS_DIR, has_shards, list_shards, shard_folder, shard_name  # noqa: F401 (re-exported)
from ..folder.clearing import remove_shards  # noqa: F401 (re-exported)
from ..folder.store import Store, is_store, open_columns
from ..gradient_index import GradientIndex

logger = logging.getLogger(__name__)

_CHUNK_BYTES = 64 << 20


def shard_range(total: int, i: int, n: int) -> Tuple[int, int]:
    """Share ``i`` of ``n`` of ids ``0..total-1``: ``[start, stop)``, contiguous, sizes differing
    by at most one (the first ``total % n`` shares are the larger ones)."""
    base, extra = divmod(total, n)
    start = i * base + min(i, extra)
    return start, start + base + (1 if i < extra else 0)


def check_shard_arg(shard: Any) -> Tuple[int, int]:
    """``shard=(i, n)`` as two ints with ``0 <= i < n``."""
    ok = isinstance(shard, (tuple, list)) and len(shard) == 2 and all(
        isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in shard)
    if not ok:
        raise InputError(f"shard must be a pair (i, n): this process builds share i of n; got {shard!r}")
    i, n = int(shard[0]), int(shard[1])
    if n < 1 or not 0 <= i < n:
        raise InputError(f"shard=({i}, {n}): i must be in 0..n-1 (share i of n shares, counted from 0), got i={i}, n={n}")
    return i, n


def shard_info(i: int, n: int, total: int, data: str) -> Dict[str, Any]:
    start, stop = shard_range(total, i, n)
    return {"index": i, "count": n, "start": start, "stop": stop, "total": total, "data": data}


def check_layout(path: Path, n: int, total: int) -> None:
    """Refuse to add shares of ``n`` to a folder holding shards of another split."""
    other = [(f, i, m) for f, i, m in list_shards(path) if m != n]
    if other:
        sizes = sorted({m for _, _, m in other})
        raise IndexMismatchError(
            f"'{path}' holds the shards of an unfinished build by {' or '.join(map(str, sizes))} processes "
            f"({', '.join(f.name for f, _, _ in other[:4])}), and this build has {n}: mixing them would scramble "
            f"the ids. Resume it with {sizes[0]} processes (torchrun --nproc_per_node={sizes[0]}, or "
            f"shard=(i, {sizes[0]})), or pass overwrite=True to start again"
        )
    for folder, i, m in list_shards(path):
        if not is_store(folder):
            continue
        info = read_manifest(folder).get("shard") or {}
        if info.get("total") != total:
            raise IndexMismatchError(
                f"the shard '{folder}' was built from a dataset of {info.get('total')} samples, this one has {total}: "
                "it was built from other data. Use another path, or overwrite=True"
            )


# -- checks before a merge ----------------------------------------------------------------


def _coverage_problems(total: int, spans: List[Tuple[int, int, str]]) -> List[str]:
    """Gaps and overlaps of the shares ``(start, stop, name)`` over ``[0, total)``."""
    problems = []
    position, last = 0, None
    for start, stop, name in sorted(s for s in spans if s[1] > s[0]):
        if start > position:
            problems.append(f"samples {position}..{start - 1} are in no shard")
        elif start < position:
            problems.append(f"samples {start}..{min(stop, position) - 1} are in both {last} and {name}")
        if stop > position:
            position, last = stop, name
    if position < total:
        problems.append(f"samples {position}..{total - 1} are in no shard")
    return problems


def check_shards(path: Path) -> Tuple[int, int, List[Dict[str, Any]]]:
    """``(total, n, manifests of the shards in order)`` once every check passes; else an
    :class:`IndexMismatchError` listing every problem."""
    path = Path(path)
    found = list_shards(path)
    if not found:
        raise StoreError(f"'{path}' holds no shards ({path / SHARDS_DIR}/rank-*-of-* folders): nothing to merge")
    problems: List[str] = []
    manifests: Dict[Tuple[int, int], Dict[str, Any]] = {}
    for folder, i, n in found:
        try:
            manifests[(i, n)] = read_manifest(folder)
        except StoreError as exc:
            problems.append(f"{folder.name}: {exc}")
    sizes = sorted({n for _, _, n in found})
    if len(sizes) > 1:
        problems.append(f"shards of splits into {' and '.join(map(str, sizes))} shares are mixed: "
                        + ", ".join(f.name for f, _, _ in found))
    totals = sorted({(m.get("shard") or {}).get("total") for m in manifests.values()}, key=str)
    if len(totals) > 1:
        problems.append(f"the shards were built from datasets of different lengths: {totals}")
    total = totals[0] if totals and isinstance(totals[0], int) else 0
    n = sizes[0]
    missing = [shard_name(i, n) for i in range(n) if (i, n) not in manifests and len(sizes) == 1]
    if missing:
        problems.append(f"missing shards: {', '.join(missing)}")
    reference = None
    spans = []
    for (i, m_n), m in sorted(manifests.items()):
        name = shard_name(i, m_n)
        info = m.get("shard") or {}
        if (info.get("index"), info.get("count")) != (i, m_n):
            problems.append(f"{name}: its manifest says it is shard {info.get('index')} of {info.get('count')}")
            continue
        start, stop = int(info.get("start", 0)), int(info.get("stop", 0))
        if isinstance(info.get("total"), int) and (start, stop) != shard_range(info["total"], i, m_n):
            problems.append(f"{name}: holds samples {start}..{stop - 1}, not share {i} of {m_n} of {info['total']} samples")
        spans.append((start, stop, name))
        if stop == start:
            continue
        if not m.get("extraction_complete") or int(m["count"]) != stop - start:
            problems.append(f"{name}: incomplete ({m['count']} of {stop - start} samples): run its build again "
                            "with the same arguments to resume it")
            continue
        ids = open_columns(path / SHARDS_DIR / name, m).get("ids")
        if ids is None or not np.array_equal(np.asarray(ids), np.arange(start, stop)):
            problems.append(f"{name}: its ids are not {start}..{stop - 1}")
        if reference is None:
            reference = (name, m)
            continue
        ref_name, ref = reference
        for key in ("fingerprint", "sketch", "feature_dim", "task", "columns"):
            for diff in fingerprint_differences(ref.get(key), m.get(key), key):
                problems.append(f"{name} differs from {ref_name}: {diff.replace('stored', ref_name).replace('now', name)}")
        a, b = (ref.get("source") or {}).get("use_targets"), (m.get("source") or {}).get("use_targets")
        if a != b:
            problems.append(f"{name} was built with use_targets={b}, {ref_name} with use_targets={a}")
    if len(sizes) == 1:
        problems += _coverage_problems(total, spans)
    if reference is None and not problems:
        problems.append("every shard is empty")
    if problems:
        raise IndexMismatchError(
            f"the shards in '{path / SHARDS_DIR}' cannot be merged:\n  - " + "\n  - ".join(problems)
            + "\nEvery shard must come from the same model, recipe and data, built with the same number of shares"
        )
    ordered = [manifests[(i, n)] for i in range(n)]
    return total, n, ordered


# -- merging ----------------------------------------------------------------------------


def _write_concatenated(file: Path, parts: List[np.ndarray]) -> None:
    def write(fd: int) -> None:
        for part in parts:
            rows = max(1, _CHUNK_BYTES // max(1, part[:1].nbytes))
            for start in range(0, len(part), rows):
                write_all(fd, memoryview(np.ascontiguousarray(part[start : start + rows])).cast("B"))

    write_atomic(file, write)


def write_merged(path: Path) -> Dict[str, Any]:
    """Check the shards of ``path`` and write their concatenation into ``path``; returns the
    merged manifest (extraction complete, FAISS index not built yet)."""
    path = Path(path)
    total, n, manifests = check_shards(path)
    filled = [(i, m) for i, m in enumerate(manifests) if int(m["count"]) > 0]
    reference = filled[0][1]
    columns = {i: open_columns(shard_folder(path, i, n), m) for i, m in filled}
    for name, spec in reference["columns"].items():
        _write_concatenated(path / spec["file"], [columns[i][name] for i, _ in filled])
    info = reference["shard"]
    manifest = {k: v for k, v in reference.items() if k != "shard"}
    # The whole dataset's record (data_fingerprint): its length, the first share's first sample
    # and the last share's last one, so that a later one-process build with this data reuses it.
    first, last = (filled[0][1].get("dataset") or {}), (filled[-1][1].get("dataset") or {})
    dataset = {"length": total, "first": first.get("first"), "last": last.get("last"), "files": None}
    manifest.update(
        dataset=dataset, count=total, extraction_complete=True, complete=False, index=None, updated=now(),
        source=dict(reference.get("source") or {}, data=info.get("data")),
        shards={"count": n, "ranges": [[m["shard"]["start"], m["shard"]["stop"]] for m in manifests], "merged": now()},
    )
    write_json_atomic(path / MANIFEST, manifest)  # the commit: the merged columns count from here on
    logger.info("merged %d shards into %s (%d samples)", n, path, total)
    return manifest


def _check_merged_from(path: Path, merged: Dict[str, Any]) -> None:
    """Refuse to delete leftover shards that the merged index of ``path`` was not made of
    (another model, recipe or dataset length): they are somebody's work."""
    problems = []
    for folder, _, _ in list_shards(path):
        if not is_store(folder):
            continue  # a shard whose deletion was interrupted: only its manifest names it
        try:
            m = read_manifest(folder)
        except StoreError as exc:
            problems.append(f"{folder.name}: {exc}")
            continue
        for key in ("fingerprint", "sketch", "feature_dim"):
            problems += [f"{folder.name}: {d}" for d in fingerprint_differences(merged.get(key), m.get(key), key)]
        shard_total = (m.get("shard") or {}).get("total")
        if shard_total != merged["count"]:
            problems.append(f"{folder.name}: a share of {shard_total} samples, the merged index holds {merged['count']}")
    if problems:
        raise IndexMismatchError(
            f"'{path}' holds a merged index and shards it was not merged from; nothing is deleted:\n  - "
            + "\n  - ".join(problems) + "\nMove the shards (or the index) elsewhere, or build with overwrite=True"
        )


def merge_shards(path, *, index: str = "flat", index_options: Optional[Dict[str, Any]] = None,
                 gpu: Optional[bool] = None, progress: bool = True, keep_shards: bool = False):
    """Merge the shards of the index folder ``path`` (built with ``shard=(i, n)`` or under
    torchrun) into one index there, and return it (a :class:`GradientIndex`).

    Refuses (:class:`IndexMismatchError`, listing every problem) shards of other models,
    recipes, data or splits, incomplete shards, and shares that overlap or miss ids.
    ``keep_shards``: keep the shard folders (the features are then stored twice).
    ``index``, ``index_options``, ``gpu``: the FAISS index, as in ``build_index``.
    """
    from ..folder.lock import FolderLock

    path = Path(path)
    if not path.is_dir():
        raise StoreError(f"'{path}' is not a folder: give the index folder that holds shards/rank-*-of-*")
    with FolderLock(path, "merging shards"):
        if is_store(path):
            manifest = read_manifest(path)
            if not manifest.get("extraction_complete"):
                raise StoreError(
                    f"'{path}' holds an interrupted build by one process besides its shards: finish that build "
                    "(same command without sharding), or pass overwrite=True to the build"
                )
            if has_shards(path):
                _check_merged_from(path, manifest)  # before deleting anything
                logger.info("'%s' is merged already; deleting the leftover shards", path)
        else:
            manifest = write_merged(path)
        idx = GradientIndex.from_store(Store(path, manifest), index, index_options, gpu=gpu, progress=progress)
        if not keep_shards:
            remove_shards(path, keep_links=True)  # a shard linked in from elsewhere: the link is kept
    return idx
