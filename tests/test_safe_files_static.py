"""Every file nnsim_hooks writes, cuts or deletes goes through :mod:`nnsim_hooks.safe_files`
(issue 17): this walks the package's source and fails on any writer or deleter elsewhere."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "nnsim_hooks"
THE_MODULE = PACKAGE / "safe_files.py"

#: (file, line text fragment) -> why it is not a stored file
ALLOWED = {
    ("audit/batch_memory.py", "clear_refs"): "writes to /proc/self/clear_refs, a kernel control file, not a stored file",
    ("audit/demo.py", "torch.save(model.state_dict(), buf)"): "into an io.BytesIO; the bytes go to write_bytes_atomic",
    ("integrations/synthetic.py", "torch.save(net.state_dict(), buf)"): "into an io.BytesIO, as above",
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
