"""The Hugging Face ``datasets`` layout: a folder written by ``save_to_disk`` (read with
``datasets.load_from_disk``) or an in-memory ``datasets.Dataset`` / ``DatasetDict``.

Samples are the dataset's rows, in its order (so an interrupted extraction resumes by
row index); the audit names them by an id column when the dataset has one
(``--id-column``, or a column called ``path``, ``file_name``, ``filename``, ``image_id``
or ``id`` holding distinct values), else by their row index. The image column
(``--image-column``) and the label column (``--label-column``) are taken by name; left
out, they are the one column of the ``Image`` feature (else the one called ``image``,
``img``, ``pixel_values`` or ``volume``) and the one ``ClassLabel`` column (else one
called ``label``, ``labels``, ``class`` or ``target``; none: unlabelled). A
``ClassLabel``'s names are the class names; other labels follow :mod:`..labels`.
"""

from __future__ import annotations

import logging
import os
from typing import Any, List, Optional, Sequence

from nnsim_hooks.errors import InputError
from nnsim_hooks.optional import require

from ..labels import parse_labels
from ..listing import Layout, Listing

logger = logging.getLogger(__name__)

IMAGE_COLUMNS = ("image", "img", "pixel_values", "volume")
LABEL_COLUMNS = ("label", "labels", "class", "target")
ID_COLUMNS = ("path", "file_name", "filename", "image_id", "id")
#: the files ``save_to_disk`` writes in a dataset's (or a DatasetDict's) folder
_MARKERS = (("state.json", "dataset_info.json"), ("dataset_dict.json",))


def is_saved_dataset(path: str) -> bool:
    """A folder ``save_to_disk`` wrote (a Dataset or a DatasetDict)."""
    return os.path.isdir(path) and any(all(os.path.isfile(os.path.join(path, f)) for f in files)
                                       for files in _MARKERS)


def is_hf_dataset(obj: Any) -> bool:
    """An in-memory ``datasets.Dataset`` or ``DatasetDict`` (told by its type's module, so
    that ``datasets`` is not imported to ask)."""
    return any(t.__module__.startswith("datasets.") and t.__name__ in ("Dataset", "DatasetDict")
               for t in type(obj).__mro__)


def _pick_split(dataset: Any, split: Optional[str], where: str) -> Any:
    """One split of a DatasetDict: ``split``, else ``train``, else the only one."""
    if not hasattr(dataset, "column_names") or isinstance(dataset.column_names, dict):
        splits = list(dataset.keys())
        if split is None:
            if "train" in splits or len(splits) == 1:
                split = "train" if "train" in splits else splits[0]
            else:
                raise InputError(f"{where} holds the splits {splits}; choose one with split=... (--split)")
        if split not in splits:
            raise InputError(f"{where} has no split {split!r}; its splits are {splits}")
        return dataset[split]
    if split is not None:
        raise InputError(f"{where} is a single Dataset, not a DatasetDict: it has no split {split!r}; drop split")
    return dataset


def _column(features: dict, given: Optional[str], kind_names: Sequence[str], names: Sequence[str], role: str,
            flag: str, where: str, required: bool) -> Optional[str]:
    """The column ``given``, else the one of a feature type in ``kind_names``, else one of ``names``."""
    columns = list(features)
    if given is not None:
        if given not in features:
            raise InputError(f"{where} has no column {given!r} ({flag}); its columns are {columns}")
        return given
    typed = [c for c, f in features.items() if type(f).__name__ in kind_names]
    if len(typed) == 1:
        return typed[0]
    named = [c for c in names if c in features]
    if len(typed) > 1 or len(named) > 1:
        raise InputError(f"{where}: several columns could be the {role} ({typed or named}); choose one with {flag}")
    if named:
        return named[0]
    if required:
        raise InputError(f"{where}: no column is an image column ({' / '.join(names)} or an Image feature); "
                         f"name it with {flag}; its columns are {columns}")
    return None


def _names(dataset: Any, id_column: Optional[str], where: str) -> List[str]:
    """Each row's name: the id column's values when distinct, else the row index."""
    features = dataset.features
    given = id_column is not None
    if given and id_column not in features:
        raise InputError(f"{where} has no column {id_column!r} (--id-column); its columns are {list(features)}")
    column = id_column if given else next((c for c in ID_COLUMNS if c in features
                                          and type(features[c]).__name__ == "Value"), None)
    if column is not None:
        values = [str(v) for v in dataset[column]]
        if len(set(values)) == len(values):
            return values
        if given:
            raise InputError(f"{where}: the id column {column!r} repeats values; name a column of distinct ids")
    return [str(i) for i in range(len(dataset))]


def open_hf(source: Any, loaded=None, config=None, classes: Optional[Sequence[str]] = None, *,
            image_column: Optional[str] = None, label_column: Optional[str] = None, split: Optional[str] = None,
            id_column: Optional[str] = None):
    """A :class:`~nnsim_hooks.integrations.records.RecordDataset` of a saved folder or a
    ``datasets`` object (see the module docstring)."""
    from ..config import DataConfig
    from ..records import RecordDataset

    if isinstance(source, (str, os.PathLike)):
        where = f"the Hugging Face dataset '{os.fspath(source)}'"
        require("datasets", "reading Hugging Face datasets")
        import datasets

        dataset = datasets.load_from_disk(os.fspath(source))
        shown = os.fspath(source)
    else:
        where, dataset, shown = f"the Hugging Face {type(source).__name__}", source, ""
    dataset = _pick_split(dataset, split, where).with_format(None)  # PIL images and lists, not a torch format
    features = dataset.features
    image = _column(features, image_column, ("Image", "Array2D", "Array3D", "Array4D"), IMAGE_COLUMNS,
                    "image", "--image-column", where, required=True)
    label = _column(features, label_column, ("ClassLabel",), LABEL_COLUMNS, "label", "--label-column", where,
                    required=False)
    if label is None:
        labels, names = [-1] * len(dataset), list(classes) if classes is not None else []
        logger.info("%s: no label column; the samples are unlabelled", where)
    elif type(features[label]).__name__ == "ClassLabel" and classes is None:
        labels = [int(v) if v is not None and v >= 0 else -1 for v in dataset[label]]
        names = list(features[label].names)
    else:
        raw = list(dataset[label])
        labels, names = parse_labels(raw, [f"row {i}" for i in range(len(raw))], f"{where}, column {label!r}",
                                     classes)
    rows = dataset.select_columns([image])
    return RecordDataset(_names(dataset, id_column, where), labels, config or DataConfig(mean=None, std=None),
                         lambda position: rows[int(position)][image], classes=names, loaded=loaded,
                         layout="hf", source=shown)


def list_hf(path: str, classes: Optional[Sequence[str]] = None, **options) -> Listing:
    """The rows' names and labels (see :func:`open_hf`)."""
    dataset = open_hf(path, classes=classes, **options)
    return Listing(list(dataset.paths), list(dataset.labels), list(dataset.classes), layout="hf")


LAYOUT = Layout(
    name="hf",
    recognises=is_saved_dataset,
    what="a Hugging Face dataset folder (save_to_disk)",
    help="a Hugging Face dataset saved with save_to_disk (--image-column, --label-column)",
    list_samples=list_hf,
    options=("image_column", "label_column", "split", "id_column"),
    opens=open_hf,
)
