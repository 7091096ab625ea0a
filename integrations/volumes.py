"""Volumes (NIfTI, MHA, NRRD through MONAI's ``LoadImage``) and ``.npy`` arrays -> model
inputs ``[C, *spatial]``: MONAI's ``ScaleIntensity`` or ``NormalizeIntensity`` and
``Resize`` for volumes, arrays as they are (resized when the model fixes a size)."""

from __future__ import annotations

from typing import Callable, Tuple

import numpy as np
import torch

from nnsim_hooks.optional import require
from .config import DataConfig


def monai_transforms():
    """``monai.transforms``, with the extra to install named when it is missing."""
    require("monai", "reading medical volumes (NIfTI, MHA, NRRD)")
    require("nibabel", "reading NIfTI volumes")
    from monai import transforms as MT

    return MT


def load_volume(path: str) -> np.ndarray:
    """The raw volume ``[C, *spatial]`` as stored (no intensity or size change)."""
    MT = monai_transforms()
    return np.asarray(MT.LoadImage(image_only=True, ensure_channel_first=True)(path))


class VolumeReader:
    """``reader(path) -> tensor [C, *spatial]`` for one data config. A volume of another
    dimensionality than the model's comes back unresized, for the shape check to explain."""

    def __init__(self, config: DataConfig):
        self.config = config
        self._load, self._post = self._make()

    def _make(self) -> Tuple[Callable, Callable]:
        MT = monai_transforms()
        config = self.config
        steps = []
        if config.intensity == "scale":
            from .images import ScaleIntensity  # MONAI's min-max, over the finite voxels only

            steps.append(ScaleIntensity())
        elif config.intensity == "normalize" and config.mean is not None:
            steps.append(MT.NormalizeIntensity(subtrahend=config.mean, divisor=config.std, channel_wise=True))
        if config.spatial_size is not None:
            mode = config.interpolation if config.interpolation in ("trilinear", "bilinear", "nearest", "area") else "area"
            steps.append(MT.Resize(spatial_size=tuple(config.spatial_size), mode=mode))
        steps.append(MT.EnsureType(data_type="tensor", track_meta=False))
        return MT.LoadImage(image_only=True, ensure_channel_first=True), MT.Compose(steps)

    def __call__(self, path: str) -> torch.Tensor:
        volume = self._load(path)
        if volume.dim() - 1 != self.config.spatial_dims:
            return torch.as_tensor(np.asarray(volume)).float()
        return torch.as_tensor(np.asarray(self._post(volume))).float()


def read_array(path: str, config: DataConfig) -> torch.Tensor:
    """A ``.npy`` array as it is (a channel axis added when it has none), resized when
    the model fixes a size."""
    return array_tensor(np.load(path, allow_pickle=False), config)


def array_tensor(array, config: DataConfig) -> torch.Tensor:
    """An array (a ``.npy`` file's, a dataset column's) as it is, a channel axis added
    when it has none, resized (linear interpolation) when the model fixes a size: this is
    how ``--spatial-size`` brings small volumes up to what a 3-D network needs."""
    tensor = torch.as_tensor(np.asarray(array, dtype=np.float32))
    if tensor.dim() == config.spatial_dims:
        tensor = tensor[None]
    size = config.spatial_size
    if size is None or tuple(tensor.shape[1:]) == tuple(size) or tensor.dim() - 1 != len(size):
        return tensor
    mode = "trilinear" if len(size) == 3 else "bilinear"
    return torch.nn.functional.interpolate(tensor[None], size=tuple(size), mode=mode, align_corners=False)[0]
