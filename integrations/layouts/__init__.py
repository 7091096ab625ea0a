"""The dataset layouts :func:`~nnsim_hooks.integrations.load_dataset` and ``nnsim audit
--data`` read: one module each, declaring a :class:`~nnsim_hooks.integrations.listing.Layout`,
and the registry :data:`LAYOUTS` (a path is read by the first layout that recognises it).

A new layout is one module here with its ``LAYOUT`` and one line in :data:`LAYOUTS`; the
dispatch in ``load_dataset``, its options, the CLI's ``--data`` help, its path checks and
the error messages all come from the registry.
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence

from nnsim_hooks.errors import DataError

from ..listing import Layout, Listing
from . import csv_file, data_folder, datalist, fiftyone_dataset, hf_datasets, webdataset_shards

#: every layout, in the order a path is tried (a saved Hugging Face dataset is a folder too)
LAYOUTS: List[Layout] = [
    hf_datasets.LAYOUT,
    data_folder.LAYOUT,
    csv_file.LAYOUT,
    datalist.LAYOUT,
    webdataset_shards.LAYOUT,
    fiftyone_dataset.LAYOUT,
]

#: what the files of every layout may be (read by :mod:`nnsim_hooks.integrations.images` and ``.volumes``)
FILE_KINDS = "images, NIfTI/MHA/NRRD volumes or .npy arrays"


def _either(phrases: Sequence[str], last: str = "or") -> str:
    return phrases[0] if len(phrases) == 1 else f"{', '.join(phrases[:-1])} {last} {phrases[-1]}"


def expected() -> str:
    """The layouts in words: ``a folder (...), a .csv of path,label or a .json MONAI datalist``."""
    return _either([layout.what for layout in LAYOUTS])


def data_help() -> str:
    """The CLI's ``--data`` help: every layout's one-line help, and the file kinds."""
    return f"{_either([layout.help for layout in LAYOUTS])}; {FILE_KINDS}"


def layout_of(path: str) -> Optional[Layout]:
    """The first layout that recognises ``path`` (an existing path, or a pattern of files
    for a layout that reads :attr:`~Layout.patterns`), or None."""
    exists = os.path.exists(path)
    return next((layout for layout in LAYOUTS if (exists or layout.patterns) and layout.recognises(path)), None)


def check_options(path: str, options) -> None:
    """Unknown layout options are refused, naming the ones the layouts take."""
    known = layout_options()
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise DataError(f"unknown layout option(s) {unknown} for '{path}'; the layouts take {sorted(known)} "
                        f"({', '.join(f'{o}: {known[o].name}' for o in sorted(known))})")


def find_layout(path: str) -> Layout:
    """The layout of ``path``; a DataError saying what was expected when none reads it."""
    layout = layout_of(path)
    if layout is not None:
        return layout
    if not os.path.exists(path):
        raise DataError(f"data path '{path}' does not exist; expected {expected()}")
    raise DataError(f"data path '{path}' is neither {_either([x.what for x in LAYOUTS], 'nor')}")


def layout_options() -> Dict[str, Layout]:
    """Every layout option by name, with the layout that declares it."""
    return {option: layout for layout in reversed(LAYOUTS) for option in layout.options}


def list_samples(path: str, *, classes: Optional[Sequence[str]] = None, **options) -> Listing:
    """The files and labels of the layout at ``path``, listed files checked to exist.

    ``options``: layout options (see each layout's ``LAYOUT.options``, e.g. the datalist's
    ``section``); those of other layouts than ``path``'s are ignored, unknown ones refused."""
    path = os.fspath(path)
    check_options(path, options)
    layout = find_layout(path)
    listing = layout.list_samples(path, classes, **{k: v for k, v in options.items() if k in layout.options})
    if not listing.paths:
        raise DataError(f"no samples found in '{path}'")
    return listing
