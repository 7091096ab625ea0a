"""Walking a ``--data`` folder: every real folder and file once, however it is linked.

Symlinked folders are followed (datasets are often assembled from links), but a folder or
file is identified by its device and inode, not its path: a link back to a folder already
walked (a symlink loop) or a second link to the same folder or file is skipped, and one
warning says which. Without this, one loop lists the same files dozens of times (until
path length limits stop it) and two loops never finish.
"""

from __future__ import annotations

import logging
import os
from typing import Callable, List, Sequence, Set, Tuple

from .files import SHOW

logger = logging.getLogger(__name__)

Identity = Tuple[int, int]


def identity(path: str) -> Identity:
    """``(st_dev, st_ino)`` of what ``path`` points to."""
    st = os.stat(path)
    return st.st_dev, st.st_ino


class Walk:
    """Folders and files seen so far across one listing (several class folders share it)."""

    def __init__(self, roots: Sequence[str] = ()) -> None:
        """``roots``: the listing's own folders (the data folder, its class folders), known
        from the start, so that a link into one of them from elsewhere is skipped rather
        than listed under another class; each is walked when :meth:`files_under` is called
        on it."""
        self.folders: Set[Identity] = set()
        self.files: Set[Identity] = set()
        self.skipped_folders: List[str] = []
        self.skipped_files: List[str] = []
        self._roots: Set[Identity] = set()
        for root in roots:
            try:
                self._roots.add(identity(root))
            except OSError:
                pass
        self.folders |= self._roots

    def files_under(self, folder: str, keep: Callable[[str], bool]) -> List[str]:
        """The files under ``folder`` whose names pass ``keep``, in sorted walk order (depth
        first, as ``os.walk``), each real folder and file once."""
        found: List[str] = []
        stack = [folder]
        while stack:
            current = stack.pop()
            if current is folder and self._is_root(folder):
                pass  # a listing's own folder, reserved at the start: walked now, once
            elif not self._first_visit(current, self.folders, self.skipped_folders):
                continue
            try:
                entries = sorted(os.scandir(current), key=lambda e: e.name)
            except OSError as exc:  # unreadable folder: as os.walk, skip it
                logger.warning("cannot list %s (%s); it is skipped", current, exc)
                continue
            subfolders = []
            for entry in entries:
                try:
                    is_dir = entry.is_dir()  # follows links
                except OSError:
                    continue
                if is_dir:
                    subfolders.append(entry.path)
                elif keep(entry.name) and self._first_visit(entry.path, self.files, self.skipped_files):
                    found.append(entry.path)
            stack.extend(reversed(subfolders))
        return found

    def _is_root(self, folder: str) -> bool:
        try:
            key = identity(folder)
        except OSError:
            return False
        if key in self._roots:
            self._roots.discard(key)
            return True
        return False

    @staticmethod
    def _first_visit(path: str, seen: Set[Identity], skipped: List[str]) -> bool:
        try:
            key = identity(path)
        except OSError:  # a dangling link
            return False
        if key in seen:
            skipped.append(path)
            return False
        seen.add(key)
        return True

    def warn(self, root: str) -> None:
        """One warning for everything skipped (nothing skipped: none)."""
        if self.skipped_folders:
            logger.warning(
                "%s: %d folder links lead to folders already listed (a symlink loop, or two links to one folder); "
                "each folder is listed once, these were skipped: %s", root, len(self.skipped_folders),
                ", ".join(self.skipped_folders[:SHOW]))
        if self.skipped_files:
            logger.warning(
                "%s: %d files are links to files already listed; each file is listed once, these were skipped: %s",
                root, len(self.skipped_files), ", ".join(self.skipped_files[:SHOW]))
