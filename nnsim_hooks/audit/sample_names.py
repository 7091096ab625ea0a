"""What the audit calls each sample and class: file paths and class names beside the numbers.

Every row of the table names its sample twice: by its dataset position (the table's
index, ``sample``) and, for file-backed datasets, by its file (``path``), relative to
the dataset's root (the ``--data`` folder, or the folder of a CSV or datalist) so that
the table can be read on another machine. Each class column (``label``,
``prediction``, ``suggested_label``, and any check's class column) gets a ``<column>_name``
column right after it with the class's name.

Paths come from ``audit(paths=...)``, else from the dataset: ``paths`` (the
integrations' :class:`~nnsim_hooks.integrations.FileDataset`; for records, not files, a
Hugging Face dataset's id or row index and a WebDataset's ``shard.tar/key``, shown as they
are), or ``samples``
(torchvision's ``ImageFolder``/``DatasetFolder``), through ``Subset``s. Class names come
from ``audit(class_names=...)``, else the dataset's ``classes``; without any, the name
is the class index written out (``"3"``).
"""

from __future__ import annotations

import os
from typing import Any, List, Optional, Sequence

from ..errors import InputError

#: The suffix of the name column that follows each class column.
NAME_SUFFIX = "_name"


def dataset_paths(dataset: Any) -> Optional[List[str]]:
    """The file of each sample, in dataset order, or None when the dataset has no files."""
    from torch.utils.data import Subset

    if isinstance(dataset, Subset):
        inner = dataset_paths(dataset.dataset)
        return None if inner is None else [inner[int(i)] for i in dataset.indices]
    paths = getattr(dataset, "paths", None)
    if paths is None:
        samples = getattr(dataset, "samples", None)
        try:
            paths = None if samples is None else [s[0] if isinstance(s, (tuple, list)) else s for s in samples]
        except TypeError:
            return None
    if paths is None or isinstance(paths, (str, bytes)):
        return None
    try:
        paths = [os.fspath(p) for p in paths]
    except TypeError:
        return None
    return paths if len(paths) == len(dataset) else None


def dataset_root(dataset: Any) -> Optional[str]:
    """The folder paths are shown relative to: the dataset's ``source`` (the ``--data``
    path: a folder, or the CSV / datalist whose folder it is) or ``root`` (torchvision)."""
    from torch.utils.data import Subset

    if isinstance(dataset, Subset):
        return dataset_root(dataset.dataset)
    if getattr(dataset, "names_are_files", True) is False:  # records (HF rows, tar members): names as they are
        return None
    for attribute in ("source", "root"):
        value = getattr(dataset, attribute, None)
        if isinstance(value, (str, os.PathLike)) and os.fspath(value) and os.path.exists(os.fspath(value)):
            value = os.fspath(value)  # (a source that is no path, fiftyone:NAME, keeps the paths absolute)
            return value if os.path.isdir(value) else os.path.dirname(value) or "."
    return None


def relative_paths(paths: Sequence[str], root: Optional[str]) -> List[str]:
    """``paths`` relative to ``root``, with ``/`` as separator; paths outside ``root``
    (or on another drive) stay as they are."""
    out = []
    base = os.path.abspath(root) if root else None
    for path in paths:
        shown = path
        if base is not None:
            full = os.path.abspath(path)
            try:
                rel = os.path.relpath(full, base)
            except ValueError:  # another drive (Windows)
                rel = None
            if rel is not None and not rel.startswith(os.pardir):
                shown = rel
        out.append(shown.replace(os.sep, "/"))
    return out


def resolve_paths(dataset: Any, paths: Optional[Sequence], n: int) -> Optional[List[str]]:
    """The ``path`` column: ``paths`` given to the audit (checked, kept as given), else
    the dataset's files relative to its root, else None (no files)."""
    if paths is None:
        found = dataset_paths(dataset)
        return None if found is None else relative_paths(found, dataset_root(dataset))
    if isinstance(paths, (str, bytes, os.PathLike)):
        raise InputError(f"paths must be one path per sample (a list of {n}), got the single path {paths!r}")
    paths = list(paths)
    if len(paths) != n:
        raise InputError(f"paths has {len(paths)} entries but the dataset {n} samples; give one path per sample, "
                         "in dataset order")
    out = []
    for i, p in enumerate(paths):
        if p is None:
            out.append(None)
            continue
        try:
            out.append(os.fspath(p))
        except TypeError:
            raise InputError(f"paths[{i}] is {p!r} ({type(p).__name__}); expected a str or path-like, or None "
                             "for a sample without a file") from None
    return out


def resolve_class_names(dataset: Any, class_names: Optional[Sequence]) -> Optional[List[str]]:
    """``class_names`` given to the audit (checked), else the dataset's ``classes`` when
    they are names, else None."""
    if class_names is None:
        from torch.utils.data import Subset

        inner = dataset
        while isinstance(inner, Subset):
            inner = inner.dataset
        found = getattr(inner, "classes", None)
        if isinstance(found, (list, tuple)) and found and all(isinstance(c, str) for c in found):
            return list(found)
        return None
    if isinstance(class_names, (str, bytes)):
        raise InputError(f"class_names must be one name per class (a list), got the string {class_names!r}")
    names = [str(c) for c in class_names]
    if len(set(names)) != len(names):
        twice = sorted({c for c in names if names.count(c) > 1})
        raise InputError(f"class_names must be distinct; {twice} appear more than once")
    return names


def class_name(names: Optional[Sequence[str]], value: Any) -> Optional[str]:
    """The name of class ``value`` (its index written out when unnamed), None when missing."""
    try:
        if value is None or value != value:  # None, NaN, pandas <NA> raises TypeError on bool
            return None
        c = int(value)
    except (TypeError, ValueError):
        return None
    if c < 0:
        return None
    return names[c] if names is not None and c < len(names) else str(c)


def add_name_columns(table, class_columns: Sequence[str], names: Optional[Sequence[str]]) -> None:
    """Insert ``<column>_name`` (pandas string dtype, <NA> where the class is missing)
    right after each class column of ``table``, in place."""
    import pandas as pd

    for column in class_columns:
        if column not in table:
            continue
        values = [class_name(names, v) for v in table[column].tolist()]
        named = pd.array(values, dtype="string")
        target = column + NAME_SUFFIX
        if target in table:
            table[target] = named
        else:
            table.insert(int(table.columns.get_loc(column)) + 1, target, named)


def path_column(paths: Optional[Sequence[Optional[str]]], n: int):
    """The ``path`` column: a pandas string array, <NA> where a sample has no file."""
    import pandas as pd

    values = list(paths) if paths is not None else [None] * n
    return pd.array(values, dtype="string")


def display_name(path: Optional[str], position: int) -> str:
    """How the report names a sample: its file name, or ``#position`` without a file."""
    import pandas as pd

    if path is None or pd.isna(path):
        return f"#{int(position)}"
    return os.path.basename(str(path).rstrip("/")) or str(path)
