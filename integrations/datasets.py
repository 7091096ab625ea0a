"""``load_dataset(path, loaded_model)``: the data layouts people already have, as a
torch Dataset of ``(tensor, label)``.

==============================  =====================================================
``path``                        layout (:mod:`.layouts`, first match)
==============================  =====================================================
a folder of class folders       ImageFolder: ``root/<class>/<file>``; labels are the
                                class folders' indices in sorted order
a folder of files               unlabelled (label -1)
``*.csv``                       ``path,label`` rows (a header is optional; paths are
                                relative to the CSV's folder)
``*.json``                      a MONAI datalist ``{"training": [{"image": path,
                                "label": ...}]}`` (paths relative to the JSON's folder)
a ``save_to_disk`` folder, or   a Hugging Face ``datasets`` dataset: its rows, an image
a ``datasets.Dataset``          and a label column by name (``image_column``,
                                ``label_column``; ``split`` of a ``DatasetDict``)
``*.tar``, ``s-{000..009}.tar`` WebDataset shards: the members of one key are a sample
                                (``image_column="png"``, ``label_column="cls"``)
``fiftyone:NAME``, or a         a FiftyOne dataset's files (``filepath``) and labels
``fiftyone`` Dataset or view    (``ground_truth.label``, or ``label_column``)
==============================  =====================================================

The pieces: the layouts, one module each, and their registry in :mod:`.layouts`;
the label rule (integers for every row, or class names for every row, or missing; never
a mix) in :mod:`.labels`; reading 2-D images (one rule per PIL mode: 16-bit and float
images keep their full range, alpha is dropped) in :mod:`.images`; volumes (NIfTI
through nibabel, MHA, NRRD with MONAI's ``LoadImage``, ``ScaleIntensity``, ``Resize``)
and ``.npy`` arrays in :mod:`.volumes`; the Dataset in :mod:`.dataset`. A MONAI
bundle's own ``preprocessing`` is used for its data when it has one.

Hugging Face datasets and WebDataset shards are read by their own libraries (the
``hf`` and ``webdataset`` extras) into a :class:`~.records.RecordDataset`, a FileDataset
whose samples are records, named by id or index (HF) and ``shard/key`` (WebDataset).

A datalist ``label`` that is a file (a segmentation mask) gives -1 as the class; mask
files (that label, or a ``mask`` entry) are listed in ``dataset.masks``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from typing import Optional, Sequence, Union

from nnsim_hooks.errors import DataError

from .config import DataConfig, LoadedModel
from .file_dataset import FileDataset
from .files import ARRAY_EXTENSIONS, IMAGE_EXTENSIONS, SHOW, VOLUME_EXTENSIONS, is_data_file, kind_of
from .images import image_transform
from .layouts import check_options, find_layout, list_samples
from .layouts.fiftyone_dataset import is_fiftyone_collection, list_fiftyone
from .layouts.hf_datasets import is_hf_dataset, open_hf
from .layouts.csv_file import LABEL_COLUMNS, PATH_COLUMNS

__all__ = ["load_dataset", "list_samples", "FileDataset", "image_transform", "kind_of", "is_data_file",
           "IMAGE_EXTENSIONS", "VOLUME_EXTENSIONS", "ARRAY_EXTENSIONS", "SHOW", "PATH_COLUMNS", "LABEL_COLUMNS"]

logger = logging.getLogger(__name__)


def load_dataset(
    path: Union[str, "os.PathLike", "datasets.Dataset"],
    loaded_model: Optional[Union[LoadedModel, DataConfig]] = None,
    *,
    spatial_size: Optional[Union[int, Sequence[int]]] = None,
    classes: Optional[Sequence[str]] = None,
    check: bool = True,
    **layout_options,
) -> FileDataset:
    """The dataset at ``path`` (ImageFolder, folder, CSV, MONAI datalist, Hugging Face
    dataset, WebDataset shards), read the way ``loaded_model`` expects.

    Args:
        path: a folder, a ``.csv``, a ``.json`` datalist, a ``save_to_disk`` folder or an
            in-memory ``datasets.Dataset``/``DatasetDict``, a ``.tar`` shard or a brace
            pattern of shards.
        loaded_model: what :func:`~nnsim_hooks.integrations.load_model` returned (or
            just a :class:`DataConfig`); None reads 2-D RGB images without resizing.
        spatial_size: resize every sample to this size (overrides the model's).
        classes: the class names, index = class. CSV and datalist labels may then be
            these names or integer indices (mixed); ImageFolder folders get these indices
            instead of their sorted order. None: inferred (see :mod:`.labels`).
        check: read the first readable sample now, so that a 2-D/3-D or channel mismatch
            is reported before anything runs (unreadable files before it are skipped).
        layout_options: options of the layout at ``path`` (:mod:`.layouts`; those of other
            layouts are ignored). The datalist's: ``section`` (default ``training``, else
            the first present), ``image_key``, ``label_key``, ``mask_key`` (its keys; a
            ``label`` that is a file is taken as a mask). Hugging Face datasets':
            ``image_column``, ``label_column``, ``split``, ``id_column``; WebDataset's:
            ``image_column``, ``label_column`` (member extensions, e.g. ``"png"``, ``"cls"``).
            A column or member that does not exist is an InputError listing those there are.
    """
    if isinstance(loaded_model, LoadedModel):
        loaded, config = loaded_model, loaded_model.data_config
    elif isinstance(loaded_model, DataConfig):
        loaded, config = None, loaded_model
    elif loaded_model is None:
        loaded, config = None, DataConfig(mean=None, std=None)
    else:
        raise DataError(f"loaded_model must be a LoadedModel or a DataConfig, got {type(loaded_model).__name__}")
    if spatial_size is not None:
        config = config.with_size(spatial_size if isinstance(spatial_size, int) else tuple(spatial_size))
        if loaded is not None:
            loaded = replace(loaded, data_config=config)
    if is_hf_dataset(path):
        dataset = open_hf(path, loaded, config, classes, **_options_of("hf", layout_options))
        return _checked(dataset, check)
    if is_fiftyone_collection(path):
        listing = list_fiftyone(path, classes, **_options_of("fiftyone", layout_options))
        return _checked(FileDataset(listing.paths, listing.labels, config, classes=listing.classes, loaded=loaded,
                                    layout="fiftyone", source=""), check)
    path = os.fspath(path)
    check_options(path, layout_options)
    layout = find_layout(path)
    if layout.opens is not None:
        dataset = layout.opens(path, loaded, config, classes,
                               **{k: v for k, v in layout_options.items() if k in layout.options})
        return _checked(dataset, check)
    listing = list_samples(path, classes=classes, **layout_options)
    dataset = FileDataset(listing.paths, listing.labels, config, classes=listing.classes, masks=listing.masks,
                          loaded=loaded, layout=listing.layout, source=path)
    return _checked(dataset, check)


def _options_of(name: str, options: dict) -> dict:
    from .layouts import LAYOUTS

    layout = next(x for x in LAYOUTS if x.name == name)
    check_options(name, options)
    return {k: v for k, v in options.items() if k in layout.options}


def _checked(dataset: FileDataset, check: bool) -> FileDataset:
    if check:
        dataset.check()
    logger.info("%r", dataset)
    return dataset
