"""``FileDataset``: ``(tensor, label)`` pairs from a list of files, read the way a model
expects, with the shape checked against the model's data config."""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from nnsim_hooks.audit.thumbnails import DEFAULT_SIZE
from nnsim_hooks.errors import DataError

from .config import DataConfig, LoadedModel
from .files import SHOW, kind_of, unknown_extension
from .images import HIGH_BIT_MODES, ImageReader, open_image, read_grey
from .file_pictures import file_picture, image_picture
from .volumes import VolumeReader, read_array

_SHAPES = {2: "[C, H, W]", 3: "[C, D, H, W]", 1: "[C, L]"}


class FileDataset(Dataset):
    """``(tensor, label)`` pairs from a list of files; see :mod:`nnsim_hooks.integrations.datasets`.

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
        self._images: Optional[ImageReader] = None
        self._volumes: Optional[VolumeReader] = None
        self._model_spec = loaded.spec if loaded is not None else "the model"
        self._first_size: Optional[Tuple[int, ...]] = None

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
        ``loader`` convention; audits call it to find unreadable files, reports draw it):
        a decoded PIL image for 8-bit 2-D images, a uint8 picture of 16-bit, 32-bit and
        float ones (stretched: a report's 8-bit conversion would clip them), the uint8
        central slice of a volume. A file holding NaN or Inf values is a
        :class:`~nnsim_hooks.errors.NonFiniteInputError` (audits skip and count it)."""
        kind = kind_of(path)
        if kind == "image":
            image = open_image(path)
            return image_picture(image, size=1 << 16, path=path) if image.mode in HIGH_BIT_MODES else image
        if kind in ("volume", "array"):
            return file_picture(path, kind, self.data_config.spatial_dims, size=1 << 16)
        raise DataError(unknown_extension(path))

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
                return read_grey(path)  # read it anyway: the shape check explains the mismatch
            if self._images is None:
                self._images = ImageReader(config, self._loaded)
            return self._images(path)
        if kind == "volume":
            if self._volumes is None:
                self._volumes = VolumeReader(config)
            return self._volumes(path)
        if kind == "array":
            return read_array(path, config)
        raise DataError(unknown_extension(path))

    def _check_shape(self, tensor: torch.Tensor, path: str, index: int) -> None:
        config = self.data_config
        dims = tensor.dim() - 1
        if dims != config.spatial_dims:
            if config.spatial_dims == 3 and dims == 2:
                fix = "give it 3-D volumes (NIfTI .nii/.nii.gz), or build a 2-D model (MONAI: spatial_dims=2)"
            elif config.spatial_dims == 2 and dims == 3:
                fix = ("give it 2-D images, or use a 3-D model (MONAI networks with spatial_dims=3); "
                       "timm and torchvision image models are 2-D")
            else:
                fix = "check the data against the model"
            raise DataError(
                f"{self._model_spec} is a {config.spatial_dims}-D model (inputs {_SHAPES.get(config.spatial_dims)}) "
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
            if self._first_size is None:
                self._first_size = tuple(tensor.shape[1:])
            elif tuple(tensor.shape[1:]) != self._first_size:
                raise DataError(
                    f"sample {index} '{path}' has spatial size {tuple(tensor.shape[1:])} but earlier samples have "
                    f"{self._first_size}; pass spatial_size=... to load_dataset to resize every sample to one size"
                )

    def check(self) -> int:
        """Read the first readable sample, wherever it sorts, so that a model/data mismatch
        (2-D vs 3-D, channels) is reported now; unreadable files before it are left to the
        caller (audits skip and count them). Returns its index; a DataError when no file
        can be read."""
        errors = []
        for index, path in enumerate(self.paths):
            try:
                tensor = self._read(path)
            except Exception as exc:  # noqa: BLE001 - an unreadable file: try the next one
                errors.append(f"sample {index} '{path}': {type(exc).__name__}: {exc}")
                continue
            self._check_shape(tensor, path, index)
            return index
        raise DataError(f"none of the {len(self)} files of {self.layout} '{self.source}' can be read, for example "
                        + "; ".join(errors[:SHOW]))

    def thumbnail(self, index: int, size: int = DEFAULT_SIZE) -> np.ndarray:
        """A uint8 picture of sample ``index`` from its file: the image itself (2-D) or the
        central slice of the volume (3-D), at most ``size`` pixels on its longest side."""
        path = self.paths[index]
        try:
            return file_picture(path, kind_of(path), self.data_config.spatial_dims, size)
        except DataError:
            raise
        except Exception as exc:
            raise DataError(f"cannot make a thumbnail of sample {index} '{path}': {exc}") from exc

    def __repr__(self) -> str:
        labelled = sum(1 for v in self.labels if v >= 0)
        return (f"{type(self).__name__}({self.layout} '{self.source}', {len(self)} samples, {labelled} labelled, "
                f"{len(self.classes)} classes, {self.data_config.describe()})")

