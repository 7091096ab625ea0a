"""``load_dataset(path, loaded_model)``: the data layouts people already have, as a
torch Dataset of ``(tensor, label)``.

==============================  =====================================================
``path``                        layout
==============================  =====================================================
a folder of class folders       ImageFolder: ``root/<class>/<file>``; labels are the
                                class folders' indices in sorted order
a folder of files               unlabelled (label -1)
``*.csv``                       ``path,label`` rows (a header is optional; paths are
                                relative to the CSV's folder; labels are integers or
                                class names)
``*.json``                      a MONAI datalist ``{"training": [{"image": path,
                                "label": ...}]}`` (paths relative to the JSON's folder)
==============================  =====================================================

Files are read by extension: 2-D images (PNG, JPEG, TIFF, BMP...) with PIL and the
model's transform (timm's own for timm models: resize, centre crop, mean/std);
volumes (NIfTI ``.nii``/``.nii.gz``, ``.mha``, ``.nrrd``...) with MONAI's ``LoadImage``
(NIfTI through nibabel), ``ScaleIntensity`` and ``Resize``; ``.npy`` arrays as they are.
A MONAI bundle's own ``preprocessing`` is used for its data when it has one.

Labels: an integer class (ImageFolder index, CSV integer, datalist number), a class
name mapped to its index in sorted order, or -1 when missing. A datalist ``label``
that is a file (a segmentation mask) gives -1 as the class; mask files (that label, or
a ``mask`` entry) are listed in ``dataset.masks``.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from dataclasses import replace
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from nnsim_hooks.errors import DataError

from ._optional import require
from .config import DataConfig, LoadedModel
from .thumbnails import DEFAULT_SIZE, central_slice, fit, from_channels_first, to_uint8

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm")
VOLUME_EXTENSIONS = (".nii", ".nii.gz", ".mha", ".mhd", ".nrrd", ".nhdr", ".dcm")
ARRAY_EXTENSIONS = (".npy",)
SHOW = 5  # how many paths an error lists

Record = Tuple[str, int]


def kind_of(path: str) -> str:
    """``image``, ``volume``, ``array`` or ``unknown``, by extension."""
    lower = path.lower()
    if lower.endswith(IMAGE_EXTENSIONS):
        return "image"
    if lower.endswith(VOLUME_EXTENSIONS):
        return "volume"
    if lower.endswith(ARRAY_EXTENSIONS):
        return "array"
    return "unknown"


def _is_data_file(name: str) -> bool:
    return kind_of(name) != "unknown" and not os.path.basename(name).startswith(".")


# -- layouts -----------------------------------------------------------------------------


def _image_folder(root: str) -> Tuple[List[str], List[int], List[str]]:
    entries = sorted(os.listdir(root))
    class_dirs = [e for e in entries if os.path.isdir(os.path.join(root, e)) and not e.startswith(".")]
    files = [e for e in entries if os.path.isfile(os.path.join(root, e)) and _is_data_file(e)]
    if class_dirs:
        paths, labels = [], []
        for index, name in enumerate(class_dirs):
            folder = os.path.join(root, name)
            for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
                dirnames.sort()
                for f in sorted(filenames):
                    if _is_data_file(f):
                        paths.append(os.path.join(dirpath, f))
                        labels.append(index)
        empty = [c for i, c in enumerate(class_dirs) if i not in set(labels)]
        if empty:
            logger.warning("ImageFolder %s: class folders without image files: %s", root, empty[:SHOW])
        if files:
            logger.warning("ImageFolder %s: %d files directly in the root are ignored (not in a class folder)",
                           root, len(files))
        if not paths:
            raise DataError(
                f"ImageFolder '{root}' has class folders {class_dirs[:SHOW]} but no image or volume files in them "
                f"(extensions {IMAGE_EXTENSIONS + VOLUME_EXTENSIONS})"
            )
        return paths, labels, class_dirs
    if files:
        return [os.path.join(root, f) for f in files], [-1] * len(files), []
    raise DataError(
        f"folder '{root}' holds neither class folders nor image/volume files; expected root/<class>/<image> "
        "(ImageFolder), a CSV of path,label or a MONAI datalist JSON"
    )


def _label_values(raw: List[Any], where: str) -> Tuple[List[int], List[str]]:
    """Integer labels from integers, integral floats, class names or missing values."""
    def is_int(v):
        if isinstance(v, bool):
            return False
        if isinstance(v, (int, np.integer)):
            return True
        if isinstance(v, float):
            return v.is_integer()
        if isinstance(v, str):
            try:
                return float(v.strip()).is_integer()
            except ValueError:
                return False
        return False

    present = [v for v in raw if v is not None and v != ""]
    if all(is_int(v) for v in present):
        return [int(float(v)) if v is not None and v != "" else -1 for v in raw], []
    names = sorted({str(v) for v in present})
    index = {n: i for i, n in enumerate(names)}
    logger.info("%s: %d class names mapped to indices in sorted order", where, len(names))
    return [index[str(v)] if v is not None and v != "" else -1 for v in raw], names


PATH_COLUMNS = ("path", "image", "file", "filename", "filepath", "img")
LABEL_COLUMNS = ("label", "target", "class", "y", "category")


def _csv(path: str) -> Tuple[List[str], List[int], List[str]]:
    base = os.path.dirname(os.path.abspath(path))
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = [r for r in csv.reader(f) if r and any(c.strip() for c in r)]
    if not rows:
        raise DataError(f"CSV '{path}' is empty; expected rows of path,label")
    header = [c.strip().lower() for c in rows[0]]
    path_col, label_col = 0, 1 if len(rows[0]) > 1 else None
    first_line = 1
    if any(h in PATH_COLUMNS for h in header):
        path_col = next(i for i, h in enumerate(header) if h in PATH_COLUMNS)
        label_col = next((i for i, h in enumerate(header) if h in LABEL_COLUMNS), None)
        rows, first_line = rows[1:], 2
    elif not _is_data_file(rows[0][0].strip()) and not os.path.exists(os.path.join(base, rows[0][0].strip())):
        raise DataError(
            f"CSV '{path}': the first row {rows[0]} is neither a header with a column among {list(PATH_COLUMNS)} "
            "nor a data row whose first column is an image path"
        )
    paths, raw = [], []
    for line, row in enumerate(rows, start=first_line):
        if path_col >= len(row):
            raise DataError(f"CSV '{path}' row {line}: {row} has no path column")
        paths.append(os.path.join(base, row[path_col].strip()))
        raw.append(row[label_col].strip() if label_col is not None and label_col < len(row) else None)
    labels, classes = _label_values(raw, f"CSV '{path}'")
    return paths, labels, classes


def _datalist(path: str, section: Optional[str], image_key: str, label_key: str, mask_key: str = "mask"):
    base = os.path.dirname(os.path.abspath(path))
    try:
        with open(path, encoding="utf-8") as f:
            content = json.load(f)
    except json.JSONDecodeError as exc:
        raise DataError(f"datalist '{path}' is not valid JSON: {exc}") from exc
    if isinstance(content, list):
        items = content
    elif isinstance(content, dict):
        if section is None:
            section = next((k for k in ("training", "validation", "test", "testing") if k in content), None)
        if section is None or section not in content:
            raise DataError(
                f"datalist '{path}' has no section {section or 'training'!r}; its keys are {sorted(content)}. "
                "Expected {\"training\": [{\"image\": path, \"label\": ...}, ...]}"
            )
        items = content[section]
    else:
        raise DataError(f"datalist '{path}' must hold a JSON object or list, got {type(content).__name__}")
    if not isinstance(items, list) or not items:
        raise DataError(f"datalist '{path}' section {section!r} is empty or not a list")
    paths, raw, masks = [], [], []
    for i, item in enumerate(items):
        if isinstance(item, str):
            item = {image_key: item}
        if not isinstance(item, dict) or image_key not in item:
            raise DataError(f"datalist '{path}' item {i} has no {image_key!r} entry: {item!r}")
        image = item[image_key]
        if isinstance(image, list):
            raise DataError(f"datalist '{path}' item {i}: multi-file images {image[:2]}... are not supported")
        paths.append(os.path.join(base, str(image)))
        label = item.get(label_key)
        if isinstance(label, list) and len(label) == 1:
            label = label[0]
        if isinstance(label, list):
            label = int(np.argmax(label))  # one-hot
        mask = item.get(mask_key)
        if isinstance(label, str) and _is_data_file(label):
            mask, label = label, None
        masks.append(os.path.join(base, str(mask)) if isinstance(mask, str) else None)
        raw.append(label)
    labels, classes = _label_values(raw, f"datalist '{path}'")
    return paths, labels, classes, masks


def _check_exist(paths: Sequence[str], source: str) -> None:
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        raise DataError(
            f"{len(missing)} of the {len(paths)} files listed in {source} do not exist, for example: "
            + ", ".join(missing[:SHOW])
            + ". Paths are read relative to the list's own folder."
        )


# -- reading files -------------------------------------------------------------------------


def _interpolation(name: str):
    from torchvision.transforms import InterpolationMode

    try:
        return InterpolationMode(name)
    except ValueError:
        return InterpolationMode.BILINEAR


def image_transform(config: DataConfig, loaded: Optional[LoadedModel] = None) -> Callable:
    """PIL image -> tensor ``[C, H, W]``: timm's own transform for timm models, else
    resize / centre crop / to-tensor / normalise from the data config."""
    if loaded is not None and loaded.source == "timm" and config.spatial_size is not None:
        from .timm import timm_transform

        return timm_transform(config)
    from torchvision import transforms as T

    steps = []
    if config.spatial_size is not None:
        size = tuple(config.spatial_size)
        resize = int(size[0] / config.crop_pct) if config.crop_pct < 1 and size[0] == size[1] else size
        steps += [T.Resize(resize, interpolation=_interpolation(config.interpolation)), T.CenterCrop(size)]
    steps.append(T.ToTensor())
    if config.intensity == "normalize" and config.mean is not None and config.std is not None:
        steps.append(T.Normalize(config.mean, config.std))
    return T.Compose(steps)


def _open_image(path: str, channels: int):
    from PIL import Image

    image = Image.open(path)
    image.load()
    mode = "RGB" if channels == 3 else "L" if channels == 1 else None
    if mode is None:
        raise DataError(f"2-D image files give 1 or 3 channels; the model expects {channels} ('{path}')")
    return image.convert(mode)


def _monai_transforms():
    require("monai", "reading medical volumes (NIfTI, MHA, NRRD)")
    require("nibabel", "reading NIfTI volumes")
    from monai import transforms as MT

    return MT


class FileDataset(Dataset):
    """``(tensor, label)`` pairs from a list of files; see the module docstring.

    Attributes:
        paths: the files, in dataset order.
        labels: integer labels (-1 when missing).
        classes: class names by index (ImageFolder folders, CSV/datalist names), or [].
        masks: segmentation mask files from a datalist (None where absent).
        data_config: how files become inputs.
        layout: ``imagefolder``, ``folder``, ``csv`` or ``datalist``.
        source: the folder or file the list came from.
    """

    def __init__(
        self,
        paths: Sequence[str],
        labels: Sequence[int],
        data_config: DataConfig,
        *,
        classes: Sequence[str] = (),
        masks: Optional[Sequence[Optional[str]]] = None,
        loaded: Optional[LoadedModel] = None,
        layout: str = "files",
        source: str = "",
    ):
        if len(paths) != len(labels):
            raise DataError(f"{len(paths)} paths but {len(labels)} labels")
        self.paths = list(paths)
        self.labels = [int(v) for v in labels]
        self.classes = list(classes)
        self.masks = list(masks) if masks is not None else [None] * len(self.paths)
        self.data_config = data_config
        self.layout = layout
        self.source = source
        self._loaded = loaded
        self._preprocess = (loaded.info.get("preprocess") if loaded is not None else None)
        self._image_transform: Optional[Callable] = None
        self._volume_transform: Optional[Tuple[Callable, Callable]] = None
        self._model_spec = loaded.spec if loaded is not None else "the model"

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def targets(self) -> List[int]:
        """torchvision's name for the labels."""
        return self.labels

    @property
    def samples(self) -> List[Tuple[str, int]]:
        """``(path, label)`` pairs, as torchvision's ImageFolder has them."""
        return list(zip(self.paths, self.labels))

    def loader(self, path: str):
        """The file as people look at it, without the model's transform (ImageFolder's
        ``loader`` convention; reports draw it): a PIL image for 2-D images, the uint8
        central slice of a volume."""
        kind = kind_of(path)
        if kind == "image":
            from PIL import Image

            return Image.open(path)
        if kind in ("volume", "array"):
            return self._picture(path, kind, size=1 << 16)
        raise DataError(f"'{path}' has an extension this loader does not read")

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        path = self.paths[index]
        try:
            tensor = self._read(path)
        except DataError:
            raise
        except Exception as exc:
            raise DataError(f"sample {index}: cannot read '{path}': {type(exc).__name__}: {exc}") from exc
        self._check_shape(tensor, path, index)
        return tensor, self.labels[index]

    # -- reading ---------------------------------------------------------------------

    def _read(self, path: str) -> torch.Tensor:
        kind = kind_of(path)
        if self._preprocess is not None and kind != "unknown":
            image = self._preprocess({"image": path})["image"]
            if hasattr(image, "as_tensor"):  # a MONAI MetaTensor: keep the plain tensor
                image = image.as_tensor()
            return torch.as_tensor(np.asarray(image) if not torch.is_tensor(image) else image).float()
        config = self.data_config
        if kind == "image":
            if config.spatial_dims != 2:
                # Read it anyway so that the shape check below explains the mismatch.
                return torch.as_tensor(np.asarray(_open_image(path, 1), dtype=np.float32))[None]
            if self._image_transform is None:
                self._image_transform = image_transform(config, self._loaded)
            return self._image_transform(_open_image(path, config.channels)).float()
        if kind == "volume":
            if self._volume_transform is None:
                self._volume_transform = self._make_volume_transform()
            load, post = self._volume_transform
            volume = load(path)
            if volume.dim() - 1 != config.spatial_dims:
                return torch.as_tensor(np.asarray(volume)).float()  # the shape check explains
            return torch.as_tensor(np.asarray(post(volume))).float()
        if kind == "array":
            array = np.load(path, allow_pickle=False)
            tensor = torch.as_tensor(np.asarray(array, dtype=np.float32))
            if tensor.dim() == config.spatial_dims:
                tensor = tensor[None]
            return self._resize_volume(tensor)
        raise DataError(
            f"'{path}' has an extension this loader does not read; images: {IMAGE_EXTENSIONS}, volumes: "
            f"{VOLUME_EXTENSIONS}, arrays: {ARRAY_EXTENSIONS}"
        )

    def _make_volume_transform(self) -> Tuple[Callable, Callable]:
        """(read the file as [C, *spatial], then intensity and size)."""
        MT = _monai_transforms()
        config = self.data_config
        load = MT.LoadImage(image_only=True, ensure_channel_first=True)
        steps = []
        if config.intensity == "scale":
            steps.append(MT.ScaleIntensity())
        elif config.intensity == "normalize" and config.mean is not None:
            steps.append(MT.NormalizeIntensity(subtrahend=config.mean, divisor=config.std, channel_wise=True))
        if config.spatial_size is not None:
            steps.append(MT.Resize(spatial_size=tuple(config.spatial_size), mode=config.interpolation
                                   if config.interpolation in ("trilinear", "bilinear", "nearest", "area") else "area"))
        steps.append(MT.EnsureType(data_type="tensor", track_meta=False))
        return load, MT.Compose(steps)

    def _resize_volume(self, tensor: torch.Tensor) -> torch.Tensor:
        size = self.data_config.spatial_size
        if size is None or tuple(tensor.shape[1:]) == tuple(size) or tensor.dim() - 1 != len(size):
            return tensor
        mode = "trilinear" if len(size) == 3 else "bilinear"
        return torch.nn.functional.interpolate(tensor[None], size=tuple(size), mode=mode, align_corners=False)[0]

    def _check_shape(self, tensor: torch.Tensor, path: str, index: int) -> None:
        config = self.data_config
        dims = tensor.dim() - 1
        names = {2: "[C, H, W]", 3: "[C, D, H, W]", 1: "[C, L]"}
        if dims != config.spatial_dims:
            if config.spatial_dims == 3 and dims == 2:
                fix = "give it 3-D volumes (NIfTI .nii/.nii.gz), or build a 2-D model (MONAI: spatial_dims=2)"
            elif config.spatial_dims == 2 and dims == 3:
                fix = ("give it 2-D images, or use a 3-D model (MONAI networks with spatial_dims=3); "
                       "timm and torchvision image models are 2-D")
            else:
                fix = "check the data against the model"
            raise DataError(
                f"{self._model_spec} is a {config.spatial_dims}-D model (inputs {names.get(config.spatial_dims)}) "
                f"but sample {index} '{path}' is {dims}-D, shape {list(tensor.shape)}: {fix}"
            )
        if tensor.shape[0] != config.channels:
            raise DataError(
                f"{self._model_spec} expects {config.channels} input channel(s) but sample {index} '{path}' has "
                f"{tensor.shape[0]} (shape {list(tensor.shape)}); build the model with in_channels={tensor.shape[0]} "
                "or convert the files"
            )
        if config.spatial_size is None:
            # All samples must share a size to be batched: the first one fixes it.
            first = getattr(self, "_first_size", None)
            if first is None:
                self._first_size = tuple(tensor.shape[1:])
            elif tuple(tensor.shape[1:]) != first:
                raise DataError(
                    f"sample {index} '{path}' has spatial size {tuple(tensor.shape[1:])} but earlier samples have "
                    f"{first}; pass spatial_size=... to load_dataset to resize every sample to one size"
                )

    def check(self, tries: int = 5) -> None:
        """Read the first readable sample (of the first ``tries``) so that a model/data
        mismatch (2-D vs 3-D, channels) is reported now; unreadable files are left to the
        caller (audits skip and count them)."""
        first_error = None
        for index in range(min(tries, len(self))):
            path = self.paths[index]
            try:
                tensor = self._read(path)
            except Exception as exc:  # an unreadable file: try the next one
                first_error = first_error or DataError(f"sample {index}: cannot read '{path}': {exc}")
                continue
            self._check_shape(tensor, path, index)
            return
        if first_error is not None:
            raise first_error

    # -- thumbnails ------------------------------------------------------------------

    def thumbnail(self, index: int, size: int = DEFAULT_SIZE) -> np.ndarray:
        """A uint8 picture of sample ``index`` from its file: the image itself (2-D) or the
        central slice of the volume (3-D), at most ``size`` pixels on its longest side."""
        path = self.paths[index]
        kind = kind_of(path)
        try:
            return self._picture(path, kind, size)
        except DataError:
            raise
        except Exception as exc:
            raise DataError(f"cannot make a thumbnail of sample {index} '{path}': {exc}") from exc

    def _picture(self, path: str, kind: str, size: int) -> np.ndarray:
        if kind == "image":
            from PIL import Image

            with Image.open(path) as image:
                if image.mode in ("I", "I;16", "F"):  # 16-bit or float: stretch, do not clip
                    array = to_uint8(np.asarray(image))
                else:
                    array = np.asarray(image.convert("L" if image.mode in ("L", "1", "P") and
                                                     image.getbands() == ("L",) else "RGB"))
            return fit(array, size)
        if kind == "volume":
            MT = _monai_transforms()
            volume = np.asarray(MT.LoadImage(image_only=True, ensure_channel_first=True)(path))
            return from_channels_first(volume, volume.ndim - 1, size)
        if kind == "array":
            array = np.load(path, allow_pickle=False)
            if array.ndim == 3 and self.data_config.spatial_dims == 3:
                return fit(to_uint8(central_slice(array)), size)
            return from_channels_first(array, self.data_config.spatial_dims, size)
        raise DataError(f"'{path}' has an extension this loader does not read")

    def __repr__(self) -> str:
        labelled = sum(1 for v in self.labels if v >= 0)
        return (f"FileDataset({self.layout} '{self.source}', {len(self)} samples, {labelled} labelled, "
                f"{len(self.classes)} classes, {self.data_config.describe()})")


def load_dataset(
    path: str,
    loaded_model: Optional[Union[LoadedModel, DataConfig]] = None,
    *,
    spatial_size: Optional[Union[int, Sequence[int]]] = None,
    section: Optional[str] = None,
    image_key: str = "image",
    label_key: str = "label",
    mask_key: str = "mask",
    check: bool = True,
) -> FileDataset:
    """The dataset at ``path`` (ImageFolder, folder, CSV or MONAI datalist), read the way
    ``loaded_model`` expects.

    Args:
        path: a folder, a ``.csv`` or a ``.json`` datalist.
        loaded_model: what :func:`~nnsim_hooks.integrations.load_model` returned (or
            just a :class:`DataConfig`); None reads 2-D RGB images without resizing.
        spatial_size: resize every sample to this size (overrides the model's).
        section: the datalist section (default ``training``, else the first present).
        image_key, label_key, mask_key: the datalist's keys (a ``label`` that is a file is
            taken as a mask).
        check: read the first sample now, so that a 2-D/3-D or channel mismatch is
            reported before anything runs.
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
    path = os.fspath(path)
    if not os.path.exists(path):
        raise DataError(f"data path '{path}' does not exist")
    masks = None
    if os.path.isdir(path):
        paths, labels, classes = _image_folder(path)
        layout = "imagefolder" if classes else "folder"
    elif path.lower().endswith(".csv"):
        paths, labels, classes = _csv(path)
        layout = "csv"
        _check_exist(paths, f"CSV '{path}'")
    elif path.lower().endswith(".json"):
        paths, labels, classes, masks = _datalist(path, section, image_key, label_key, mask_key)
        layout = "datalist"
        _check_exist(paths, f"datalist '{path}'")
        _check_exist([m for m in masks if m], f"datalist '{path}' (labels)")
    else:
        raise DataError(
            f"data path '{path}' is neither a folder (ImageFolder), a .csv of path,label nor a .json MONAI datalist"
        )
    if not paths:
        raise DataError(f"no samples found in '{path}'")
    dataset = FileDataset(paths, labels, config, classes=classes, masks=masks, loaded=loaded, layout=layout,
                          source=path)
    if check:
        dataset.check()
    logger.info("%r", dataset)
    return dataset
