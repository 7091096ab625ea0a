"""Deleting what the store wrote in an index folder: its files, its shards, and in which order.

Only names the store writes are deleted (:mod:`.schema`; never a name read from a
manifest), through :mod:`nnsim_hooks.safe_files` (never through a link). An overwrite first
runs every check that could refuse (:func:`check_clearable`: a writer at work in a
shard, files of the user's in a shard folder, a link where the store's file belongs),
and only then deletes anything, so that a refusal leaves the folder as it was.

Shard folders (``PATH/shards/rank-*``) that are links to folders elsewhere are merged
read-only and never deleted at their target: after a merge the link is kept (and
named in a warning); an overwrite refuses them, saying to remove the link.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import List

from ...errors import StoreError
from ...safe_files import is_link, link_refusal, refuse_links, remove_empty_folder, remove_owned
from .lock import LOCK_FILE, describe_holder
from .schema import MANIFEST, is_store_owned
from .shard_folders import SHARDS_DIR, list_shards

logger = logging.getLogger(__name__)


def _store_file_or_temporary(name: str) -> bool:
    return name != LOCK_FILE and is_store_owned(name)


def remove_store_files(path: Path, *, keep_manifest: bool = False) -> None:
    """Delete the files the store writes in ``path`` and their temporary files (not the lock
    file). The manifest goes last, so that an interrupted removal still leaves an index
    folder."""
    owned = (lambda n: _store_file_or_temporary(n) and n != MANIFEST) if keep_manifest else _store_file_or_temporary
    remove_owned(path, owned, last=MANIFEST)


def _shard_problems(path: Path, *, links_ok: bool = False) -> List[str]:
    """Why the shards of ``path`` cannot be deleted now (empty when they can). ``links_ok``:
    shard folders that are links are not a problem (they are kept, not deleted)."""
    problems = []
    root = Path(path) / SHARDS_DIR
    if is_link(root):
        return [] if links_ok else [str(link_refusal(root))]
    for folder, _, _ in list_shards(path):
        if is_link(folder):
            if not links_ok:
                problems.append(str(link_refusal(folder)))
            continue
        writer = describe_holder(folder)
        if writer is not None:
            problems.append(f"'{folder}' is being written by {writer}: its shard cannot be deleted now. Wait for that "
                            "process to finish, or stop it")
            continue
        foreign = [p.name for p in folder.iterdir() if not is_store_owned(p.name)]
        if foreign:
            problems.append(f"'{folder}' holds files that are not ours ({', '.join(sorted(foreign)[:5])}); move them "
                            "away first")
    return problems


def check_clearable(path: Path) -> None:
    """Raise (a :class:`StoreError` listing every problem) unless :func:`clear_folder` can
    delete the store's files and shards of ``path`` without stopping half-way."""
    problems = _shard_problems(path) if (Path(path) / SHARDS_DIR).exists() else []
    try:
        refuse_links(path, is_store_owned)
    except StoreError as exc:
        problems.append(str(exc))
    if problems:
        raise StoreError(f"overwriting '{path}' is refused, and nothing in it was deleted:\n  - "
                         + "\n  - ".join(problems))


def remove_shards(path: Path, *, keep_links: bool = False) -> None:
    """Delete ``path/shards`` (only the files this package writes). With ``keep_links`` (after
    a merge), shard folders that are links are kept, and named; otherwise they are refused,
    like anything else that would stop the deletion half-way: before anything is deleted."""
    root = Path(path) / SHARDS_DIR
    if not root.exists() and not is_link(root):
        return
    linked = [root] if is_link(root) else [f for f, _, _ in list_shards(path) if is_link(f)]
    if keep_links and linked:
        logger.warning("kept %s: a link to shards elsewhere, read for the merge but never deleted through; remove "
                       "the link yourself when it is no longer needed", ", ".join(map(str, linked)))
    if keep_links and is_link(root):
        return
    problems = _shard_problems(path, links_ok=keep_links)
    if problems:
        raise StoreError("the shards cannot be deleted, and none was:\n  - " + "\n  - ".join(problems))
    for folder, _, _ in list_shards(path):
        if is_link(folder):
            continue
        left = remove_owned(folder, is_store_owned, last=MANIFEST)
        if left or not remove_empty_folder(folder):
            raise StoreError(f"'{folder}' holds files that are not ours ({', '.join(left[:5])}); delete them first")
    remove_empty_folder(root)


def clear_folder(path: Path) -> None:
    """Delete the shards and the store's files of ``path`` (the manifest last), after
    :func:`check_clearable` passed: nothing is deleted when a check refuses."""
    check_clearable(path)
    remove_shards(path)
    remove_store_files(path)
