"""What a data layout is (:class:`Layout`, declared once per layout in
:mod:`.layouts`) and what it yields (:class:`Listing`: the files, their labels and class
names, in dataset order)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence, Tuple

from nnsim_hooks.errors import DataError

from .files import SHOW


@dataclass
class Listing:
    """The samples of one layout.

    Attributes:
        paths: the files, in dataset order.
        labels: integer labels (-1 when missing).
        classes: class names by index, or [] when the labels are bare integers.
        layout: ``imagefolder``, ``folder``, ``csv`` or ``datalist``.
        masks: segmentation mask files (datalists), None where absent.
    """

    paths: List[str]
    labels: List[int]
    classes: List[str]
    layout: str
    masks: Optional[List[Optional[str]]] = None


def check_exist(paths: Sequence[str], source: str) -> None:
    """Listed files that do not exist are an error naming the first few."""
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        raise DataError(
            f"{len(missing)} of the {len(paths)} files listed in {source} do not exist, for example: "
            + ", ".join(missing[:SHOW])
            + ". Paths are read relative to the list's own folder."
        )


@dataclass(frozen=True)
class Layout:
    """One way people lay out a dataset on disk.

    Attributes:
        name: what :attr:`Listing.layout` says for it (or the first of its names).
        recognises: whether an existing ``path`` is this layout (a folder, a suffix...).
        what: the layout in a few words, for error messages and ``--data`` checks
            (``"a .csv of path,label"``).
        help: the layout in a few words for the CLI's ``--data`` help.
        options: the keyword options :attr:`list_samples` takes besides ``classes``
            (e.g. the datalist's ``section``); other layouts' options are ignored.
        list_samples: ``(path, classes, **options) -> Listing``, listed files checked to
            exist (``classes``: class names in index order, or None).
        suffixes: file suffixes it reads (none for a folder).
        opens: for layouts whose samples are not files (a Hugging Face dataset,
            WebDataset shards): ``(source, loaded, config, classes, **options) -> Dataset``,
            used by ``load_dataset`` instead of :attr:`list_samples`.
        patterns: whether ``recognises`` also takes paths that name several files (a brace
            pattern such as ``shards-{000..009}.tar``) and so need not exist themselves.
    """

    name: str
    recognises: Callable[[str], bool]
    what: str
    help: str
    list_samples: Callable[..., Listing]
    options: Tuple[str, ...] = ()
    suffixes: Tuple[str, ...] = ()
    opens: Optional[Callable[..., Any]] = None
    patterns: bool = False
