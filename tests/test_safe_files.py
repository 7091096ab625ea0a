"""Every file nnsim_hooks writes, cuts or deletes goes through :mod:`nnsim_hooks.safe_files`
(issue 17): a walk of the package's source fails on any writer or deleter elsewhere, and
each of the module's primitives refuses a link (tests/test_safe_writes.py: each writer of
the package)."""

from __future__ import annotations

import ast
import json
import os
import threading
from pathlib import Path

import pytest

from nnsim_hooks import safe_files
from nnsim_hooks.errors import StoreError

PACKAGE = Path(__file__).resolve().parent.parent / "nnsim_hooks"
THE_MODULE = PACKAGE / "safe_files.py"

#: (file, line text fragment) -> why it is not a stored file
ALLOWED = {
    ("audit/batch_memory.py", "clear_refs"): "writes to /proc/self/clear_refs, a kernel control file, not a stored file",
    ("audit/demo.py", "torch.save(model.state_dict(), buf)"): "into an io.BytesIO; the bytes go to write_bytes_atomic",
    ("integrations/synthetic.py", "torch.save(net.state_dict(), buf)"): "into an io.BytesIO, as above",
    ("audit/fitting.py", "torch.save(target.state_dict(), buf)"): "into an io.BytesIO; the bytes go to write_bytes_atomic",
    ("index/all_neighbors.py", "np.save(buffer, array)"): "into an io.BytesIO; the bytes go to write_bytes_atomic",
    ("index/all_neighbors.py", "np.savez(buffer, **arrays)"): "into an io.BytesIO, as above",
}

# any call of an attribute (or function) of these names writes, cuts, creates or deletes
_ANY = {"truncate", "ftruncate", "rmtree", "unlink", "rmdir", "removedirs", "tofile", "write_index", "write_text",
        "write_bytes", "mkstemp", "mkdtemp", "NamedTemporaryFile", "mkdir", "makedirs", "symlink_to", "savez",
        "savez_compressed", "hardlink_to", "touch"}
# these only as module.function
_QUALIFIED = {("os", "remove"), ("os", "replace"), ("os", "rename"), ("os", "renames"), ("os", "link"),
              ("os", "symlink"), ("os", "chmod"), ("np", "save"), ("numpy", "save"), ("torch", "save"),
              ("shutil", "move"), ("shutil", "copy"), ("shutil", "copy2"), ("shutil", "copyfile"),
              ("shutil", "copytree"), ("nib", "save"), ("nibabel", "save")}


def _mode_writes(node) -> bool:
    """Whether an ``open`` mode argument may write (unknown modes count as writing)."""
    if node is None:
        return False
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return any(c in node.value for c in "wax+")
    return True


def _os_open_writes(call: ast.Call) -> bool:
    flags = call.args[1] if len(call.args) > 1 else None
    return not (isinstance(flags, ast.Attribute) and flags.attr == "O_RDONLY")


def violations(source: str):
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
        base = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else None
        mode = next((k.value for k in node.keywords if k.arg == "mode"), None)
        bad = name in _ANY or (base, name) in _QUALIFIED
        if name == "open" and base == "os":
            bad = _os_open_writes(node)
        elif name == "open" and isinstance(func, ast.Name):  # builtin open(file, mode)
            bad = _mode_writes(node.args[1] if len(node.args) > 1 else mode)
        elif name == "open" and base == "io":  # io.open(file, mode)
            bad = _mode_writes(node.args[1] if len(node.args) > 1 else mode)
        elif name == "open" and isinstance(func, ast.Attribute):  # Path.open("w"); Image.open(path) reads
            arg = node.args[0] if node.args else mode
            bad = isinstance(arg, ast.Constant) and _mode_writes(arg)
        if bad:
            yield node.lineno, ast.get_source_segment(source, node) or name


def test_every_writer_goes_through_safe_files():
    found = []
    files = sorted(PACKAGE.rglob("*.py")) + sorted((PACKAGE / "integrations").resolve().rglob("*.py"))  # a linked folder
    assert any("integrations" in str(f) for f in files) and len(files) > 100
    for file in files:
        if file == THE_MODULE:
            continue
        source = file.read_text(encoding="utf-8")
        rel = file.relative_to(PACKAGE).as_posix() if file.is_relative_to(PACKAGE) else f"integrations/{file.name}"
        for line, text in violations(source):
            if any(rel == f and frag in text for f, frag in ALLOWED):
                continue
            found.append(f"nnsim_hooks/{rel}:{line}: {text}")
    assert not found, "write or delete outside nnsim_hooks/safe_files.py:\n" + "\n".join(found)


def test_the_walk_finds_each_kind_of_writer():
    """The checker itself: every pattern the issue names is caught, reads are not."""
    caught = ['open(p, "w")', 'open(p, "a")', 'open(p, "r+")', 'open(p, mode="wb")', 'p.open("w")', "os.truncate(p, 0)",
              "shutil.rmtree(p)", "os.remove(p)", "os.unlink(p)", "p.unlink()", "np.save(p, a)", "a.tofile(p)",
              "faiss.write_index(i, p)", "os.open(p, os.O_WRONLY | os.O_CREAT)", "p.write_text('x')", "p.mkdir()",
              "os.replace(a, b)", "open(p, m)"]
    for code in caught:
        assert list(violations(code)), code
    for code in ['open(p)', 'open(p, "rb")', "p.read_text()", "os.open(p, os.O_RDONLY)", "s.replace('a', 'b')",
                 "items.remove(x)", "np.load(p)"]:
        assert not list(violations(code)), code


# -- the primitives: a link is refused by each, its target untouched ----------------------------

PRECIOUS = b"not ours\n" * 10

PRIMITIVES = {
    "open_for_append": lambda p: os.close(safe_files.open_for_append(p)),
    "open_lock_file": lambda p: os.close(safe_files.open_lock_file(p)),
    "create_new": lambda p: os.close(safe_files.create_new(p)),
    "cut": lambda p: safe_files.cut(p, 0),
    "write_atomic": lambda p: safe_files.write_atomic(p, lambda fd: safe_files.write_all(fd, b"x")),
    "remove_file": lambda p: safe_files.remove_file(p),
    "remove_owned": lambda p: safe_files.remove_owned(p.parent, lambda name: name == p.name),
    "make_folder": lambda p: safe_files.make_folder(p),
    "rename_into_place": lambda p: safe_files.rename_into_place(p.parent / "new.tmp", p),
}


@pytest.mark.parametrize("primitive", list(PRIMITIVES))
def test_each_primitive_refuses_a_link(tmp_path, primitive):
    target = tmp_path / "elsewhere" / "victim"
    target.parent.mkdir()
    target.write_bytes(PRECIOUS)
    (tmp_path / "folder").mkdir()
    link = tmp_path / "folder" / "file"
    link.symlink_to(target)
    (tmp_path / "folder" / "new.tmp").write_bytes(b"new")
    with pytest.raises(StoreError, match="symbolic link"):
        PRIMITIVES[primitive](link)
    assert target.read_bytes() == PRECIOUS and link.is_symlink()


def test_new_files_and_folders_get_the_umasks_permissions(tmp_path):
    old = os.umask(0o007)
    try:
        os.close(safe_files.open_for_append(tmp_path / "a"))
        safe_files.write_atomic(tmp_path / "b", lambda fd: None)
        safe_files.make_folder(tmp_path / "c" / "d")
        folder = safe_files.make_temporary_folder(tmp_path, "e")
    finally:
        os.umask(old)
    for path, want in ((tmp_path / "a", 0o660), (tmp_path / "b", 0o660), (tmp_path / "c", 0o770),
                       (tmp_path / "c" / "d", 0o770), (folder, 0o770)):
        assert oct(path.stat().st_mode & 0o777) == oct(want), path


def test_a_refused_writer_names_a_holder_that_writes_its_record_an_instant_late(tmp_path):
    """The holder's record is written just after its flock: the refused writer waits for it
    instead of saying the holder "left no record"."""
    import fcntl

    from nnsim_hooks.index.folder.lock import FolderLock

    fd = os.open(tmp_path / ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    late = threading.Timer(0.05, lambda: os.pwrite(fd, json.dumps({"pid": 4242, "host": "h", "purpose": "p",
                                                                     "since": "now"}).encode(), 0))
    late.start()
    try:
        with pytest.raises(StoreError, match="process 4242 on host h"):
            FolderLock(tmp_path).acquire()
    finally:
        late.join()
        os.close(fd)
