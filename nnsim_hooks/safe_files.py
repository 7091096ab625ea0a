"""Every file nnsim_hooks writes, cuts or deletes goes through this module.

The rules (the README's "What nnsim_hooks writes, and what it never touches"):

- A file is opened for writing with ``O_NOFOLLOW``; a file meant to be new is created with
  ``O_EXCL``. A symbolic link found where the project keeps one of its own files or
  folders (a column file, the lock, a manifest, ``index/`` inside an audit folder, a shard
  being written) is refused with a :class:`~nnsim_hooks.errors.StoreError` naming it and
  the fix: nothing is ever written, cut or deleted through a link. Reading may follow
  links (a shard symlinked in from another disk is merged, read-only).
- Deleting takes the name of a file the project writes (the caller's ``owned`` test,
  never a name read from a file) and removes only that directory entry, after checking
  that it is a regular file and not a link.
- Whole files are replaced atomically (temporary file, fsync, ``os.replace``, fsync of the
  folder): a reader sees the old or the complete new file.
- New files and folders get the permissions the umask gives (``0o666 & ~umask`` and
  ``0o777 & ~umask``, as ``numpy.save`` or ``mkdir`` would), never the 0600 of a
  temporary file, so that a team can share an index.

The folder a user names (``build_index(data, PATH)``, ``--out PATH``) may itself be a link:
the user chose it. Every path *inside* it that the project creates may not.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, List, Union

from .errors import StoreError

PathLike = Union[str, "os.PathLike[str]"]
logger = logging.getLogger(__name__)

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_BINARY = getattr(os, "O_BINARY", 0)


# -- errors -------------------------------------------------------------------------------


def describe_os_error(exc: OSError, what: str, path: PathLike) -> str:
    """A message for an ``OSError`` while doing ``what`` to ``path``."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        hint = "the disk is full (or over quota): free some space"
    elif exc.errno == errno.EROFS:
        hint = "the file system is read-only: write to another folder (copy a stored index there first)"
    elif exc.errno in (errno.EACCES, errno.EPERM):
        hint = "no permission to write there: choose another folder, or change its permissions"
    else:
        hint = os.strerror(exc.errno) if exc.errno else str(exc)
    return f"{what} '{path}' failed: {hint} ({type(exc).__name__}: {exc})"


@contextmanager
def store_errors(what: str, path: PathLike) -> Iterator[None]:
    """Turn an ``OSError`` raised inside the block into a :class:`StoreError`."""
    try:
        yield
    except StoreError:
        raise
    except OSError as exc:
        raise StoreError(describe_os_error(exc, what, path)) from exc


def link_refusal(path: PathLike) -> StoreError:
    return StoreError(
        f"'{path}' is a symbolic link where nnsim_hooks keeps a file or folder of its own: it never writes, cuts "
        "or deletes through a link. Remove the link (rm, which leaves its target alone), or put a real copy "
        "there (cp -rL), then run again"
    )


def is_link(path: PathLike) -> bool:
    try:
        return stat.S_ISLNK(os.lstat(path).st_mode)
    except OSError:
        return False


def refuse_link(path: PathLike) -> None:
    """:func:`link_refusal` when ``path`` is a symbolic link (a missing path is fine)."""
    if is_link(path):
        raise link_refusal(path)


def refuse_links(folder: PathLike, owned: Callable[[str], bool]) -> None:
    """Refuse when any entry of ``folder`` that ``owned`` names is a link (checked before a
    replace or a delete starts, so that a refusal leaves everything as it was)."""
    for name in _entries(folder):
        if owned(name):
            refuse_link(Path(folder) / name)


# -- permissions and durability -------------------------------------------------------------


def current_umask() -> int:
    """The process's umask, read without changing it where the system shows it (Linux):
    setting and restoring it is process-wide, so a thread creating a file meanwhile would
    get the wrong permissions."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def file_mode() -> int:
    return 0o666 & ~current_umask()


def folder_mode() -> int:
    return 0o777 & ~current_umask()


def fsync_dir(folder: PathLike) -> None:
    """Make a rename or a new file in ``folder`` durable (a no-op where unsupported)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_all(fd: int, data: Union[bytes, memoryview]) -> None:
    """``os.write`` until every byte is written (it may write fewer than asked)."""
    view = memoryview(data).cast("B")
    while len(view):
        written = os.write(fd, view)
        view = view[written:]


# -- opening --------------------------------------------------------------------------------


def _open(path: PathLike, flags: int, what: str) -> int:
    with store_errors(what, path):
        try:
            return os.open(path, flags | _NOFOLLOW | _CLOEXEC | _BINARY, 0o666)
        except OSError as exc:
            # ELOOP: the last component is a link (O_NOFOLLOW); EEXIST with O_EXCL may be one too
            if exc.errno in (errno.ELOOP, errno.EMLINK) or (exc.errno == errno.EEXIST and is_link(path)):
                raise link_refusal(path) from exc
            raise


def open_for_append(path: PathLike) -> int:
    """A column file opened to append rows (created when missing), never through a link."""
    return _open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, "appending to")


def open_lock_file(path: PathLike) -> int:
    """A folder's lock file, opened read-write (created when missing), never through a link."""
    return _open(path, os.O_RDWR | os.O_CREAT, "locking")


def create_new(path: PathLike) -> int:
    """A new file that must not exist yet (``O_EXCL``), opened to write."""
    return _open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, "creating")


def rewrite(fd: int, data: bytes) -> None:
    """Replace the contents of the open file ``fd`` by ``data`` (the record of a lock file):
    written first, then cut to its length, so that a reader never finds it empty."""
    os.pwrite(fd, data, 0)
    os.ftruncate(fd, len(data))


def cut(path: PathLike, size: int) -> None:
    """Truncate the file ``path`` to ``size`` bytes (uncommitted rows), never through a link."""
    fd = _open(path, os.O_WRONLY, "cutting")
    try:
        with store_errors("cutting", path):
            os.ftruncate(fd, size)
            os.fsync(fd)
    finally:
        os.close(fd)


# -- whole files ------------------------------------------------------------------------------


def _temporary(folder: Path, name: str) -> "tuple[int, Path]":
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)  # O_EXCL: never a link
    return fd, Path(tmp)


def write_atomic(path: PathLike, write: Callable[[int], None]) -> None:
    """Create or replace ``path`` with what ``write(fd)`` writes, atomically: a reader sees
    the old file or the complete new one, never a part. The folder must exist. A link at
    ``path`` is refused (replacing it would silently drop the user's link)."""
    path = Path(path)
    refuse_link(path)
    with store_errors("writing", path):
        fd, tmp = _temporary(path.parent, path.name)
        try:
            try:
                write(fd)
                os.fchmod(fd, file_mode())  # mkstemp makes 0600 files; give the usual permissions
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)  # replaces the directory entry: never writes through a link
        except BaseException:
            _unlink_quietly(tmp)
            raise
        fsync_dir(path.parent)


def write_faiss_index(index, folder: PathLike, name: str) -> Path:
    """Write a (CPU) FAISS ``index`` into a new temporary file of ``folder`` whose name
    starts with ``.name.`` (created with ``O_EXCL``, streamed through our own descriptor:
    FAISS never opens a path), fsync'ed, with the umask's permissions; returns its path.
    The caller renames it into place (:func:`rename_into_place`)."""
    import faiss

    folder = Path(folder)
    with store_errors("writing", folder / name):
        fd, tmp = _temporary(folder, name)
        try:
            try:
                writer = faiss.PyCallbackIOWriter(lambda data: write_all(fd, data) or len(data))
                try:
                    faiss.write_index(index, writer)
                except RuntimeError as exc:  # FAISS reports failed writes (disk full) as RuntimeError
                    raise StoreError(
                        f"writing the FAISS index '{folder / name}' failed: {str(exc).splitlines()[0]} (disk full?)"
                    ) from exc
                finally:
                    del writer
                os.fchmod(fd, file_mode())
                os.fsync(fd)
            finally:
                os.close(fd)
        except BaseException:
            _unlink_quietly(tmp)
            raise
    return tmp


def rename_into_place(tmp: PathLike, path: PathLike) -> None:
    """``os.replace`` a finished temporary file (ours) to ``path`` (a link there is refused)."""
    path = Path(path)
    try:
        refuse_link(path)
        with store_errors("writing", path):
            os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    fsync_dir(path.parent)


# -- folders ------------------------------------------------------------------------------


def make_folder(path: PathLike, *, own: bool = True) -> Path:
    """Create the folder ``path`` (and its parents) with the umask's permissions.

    ``own``: a folder the project creates inside one the user named (``index/`` of an
    audit, a shard): a link there is refused. ``own=False``: the folder the user named,
    which may be a link to a folder elsewhere."""
    path = Path(path)
    if own:
        refuse_link(path)
    with store_errors("creating the folder", path):
        if path.exists() and not path.is_dir():
            raise StoreError(f"'{path}' is a file; a folder is needed there")
        path.mkdir(parents=True, exist_ok=True)
    return path


def make_temporary_folder(parent: PathLike, name: str) -> Path:
    """A new, empty folder ``.name.<random>.tmp`` in ``parent`` (``mkdtemp``: created
    exclusively), given the umask's permissions instead of mkdtemp's 0700."""
    with store_errors("creating a folder in", parent):
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=parent))
        os.chmod(tmp, folder_mode())
    return tmp


def move_folder(source: PathLike, target: PathLike) -> None:
    """Rename the folder ``source`` to ``target`` (an empty folder or nothing there)."""
    with store_errors("moving a folder to", target):
        refuse_link(target)
        os.replace(source, target)
        fsync_dir(Path(target).parent)


# -- deleting ---------------------------------------------------------------------------------


def remove_file(path: PathLike, *, missing_ok: bool = True) -> None:
    """Delete the regular file ``path`` (a name the project writes); a link or a folder
    there is refused, never followed."""
    path = Path(path)
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        if missing_ok:
            return
        raise StoreError(f"'{path}' does not exist; nothing to delete") from None
    except OSError as exc:
        raise StoreError(describe_os_error(exc, "deleting", path)) from exc
    if stat.S_ISLNK(info.st_mode):
        raise link_refusal(path)
    if not stat.S_ISREG(info.st_mode):
        raise StoreError(f"'{path}' is not a regular file where nnsim_hooks keeps one of its files; it is kept. "
                         "Move it away, then run again")
    with store_errors("deleting", path):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def remove_file_if_same(path: PathLike, fd: int) -> None:
    """Delete ``path`` only if it is still the file open as ``fd`` (a lock file released)."""
    try:
        same = os.path.samestat(os.fstat(fd), os.lstat(path))
    except OSError:
        return
    if same:
        try:
            os.unlink(path)
        except OSError:
            pass


def remove_owned(folder: PathLike, owned: Callable[[str], bool], *, last: str = "",
                 skip_links: bool = False) -> List[str]:
    """Delete the entries of ``folder`` that ``owned`` names (regular files only). A link
    among them is refused before anything is deleted, or, with ``skip_links`` (cleaning
    leftover temporary files, after a commit), left alone with a warning. ``last``: a name
    deleted after the others (a manifest, so that an interrupted removal still leaves a
    recognisable folder). Returns the names left."""
    folder = Path(folder)
    names = [n for n in _entries(folder) if owned(n)]
    links = [n for n in names if is_link(folder / n)]
    if links and not skip_links:
        raise link_refusal(folder / links[0])
    if links:
        logger.warning("kept %s: a symbolic link where nnsim_hooks keeps its own files (never deleted through; "
                       "remove it yourself)", ", ".join(str(folder / n) for n in links))
    for name in sorted(names, key=lambda n: n == last):
        if name not in links:
            remove_file(folder / name)
    return _entries(folder)


def remove_empty_folder(path: PathLike) -> bool:
    """``rmdir`` the folder ``path`` when it is empty and not a link; whether it was removed."""
    if is_link(path):
        return False
    try:
        os.rmdir(path)
    except OSError:
        return False
    return True


def remove_temporary_folder(path: PathLike) -> None:
    """Delete a folder made by :func:`make_temporary_folder` in this process, and all in it
    (everything there is ours; ``shutil.rmtree`` removes links inside without following them)."""
    import shutil

    if is_link(path):
        return
    shutil.rmtree(path, ignore_errors=True)


def _entries(folder: PathLike) -> List[str]:
    with store_errors("listing", folder):
        try:
            return sorted(os.listdir(folder))
        except FileNotFoundError:
            return []


def _unlink_quietly(path: PathLike) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
