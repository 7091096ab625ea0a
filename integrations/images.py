"""2-D image files -> model inputs ``[C, H, W]``, with one documented rule per PIL mode.

================================  ============================================================
PIL mode of the file              what the model gets (before its resize and normalisation)
================================  ============================================================
``L``, ``RGB`` (8-bit)            value / 255, as torchvision's ``ToTensor``
``1`` (bilevel)                   0 or 1
``I;16``, ``I;16B``, ``I;16L``    value / 65535 (16-bit grey: the full range, not clipped to 8 bits)
``I`` (32-bit signed integer)     value / (2**31 - 1) (torchvision's ``convert_image_dtype`` rule)
``F`` (32-bit float)              the values as they are (assumed already in [0, 1])
``P`` (palette, transparency)     the palette's colours; alpha dropped
``RGBA``, ``LA``, ``PA``          alpha dropped: the colour (or grey) channels as they are, the
                                  way ``PIL.Image.convert("RGB")`` in torchvision's and timm's
                                  loaders gives them, so the audit sees what training saw
``CMYK``, ``YCbCr``, ...          PIL's conversion to RGB (CMYK: ``255 (1 - c)(1 - k)``)
16-bit RGB PNG (48-bit)           PIL opens it as 8-bit ``RGB`` (the high byte): range kept,
                                  the low 8 bits lost
================================  ============================================================

A 1-channel model gets the grey value (RGB via PIL's ITU-R 601-2 luma); a 3-channel model
gets grey images repeated on the three channels. 8-bit images go through the model's
transform as they are (timm's own for timm models, or resize / centre crop / ToTensor /
Normalize, or min-max scaling per image for ``intensity="scale"``, MONAI's convention);
16-bit, 32-bit and float images go through the same resize and crop in 32-bit float
(PIL mode ``F``), then the same normalisation.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple, Union

import numpy as np
import torch

from nnsim_hooks.errors import DataError

from .config import DataConfig, LoadedModel

#: modes read as numbers in float, and the value that becomes 1.0
HIGH_BIT_MODES = {"I;16": 65535.0, "I;16B": 65535.0, "I;16L": 65535.0, "I;16N": 65535.0,
                  "I": float(2 ** 31 - 1), "F": 1.0}
_GREY_MODES = ("1", "L", "LA")
_TO_TENSOR = ("ToTensor", "MaybeToTensor", "PILToTensor")


def open_image(path: str):
    """The decoded PIL image of ``path`` (the file is closed again)."""
    from PIL import Image

    with Image.open(path) as image:
        image.load()
    return image


def _rgb(image):
    """8-bit RGB, alpha and palette transparency dropped."""
    if image.mode in ("P", "PA") and (image.mode == "PA" or "transparency" in image.info):
        image = image.convert("RGBA")  # PIL warns when a palette with transparency goes straight to RGB
    return image.convert("RGB")


def convert_image(image, channels: int) -> Union["object", np.ndarray]:
    """``image`` by the rule of the module docstring: a PIL image of mode ``L`` (1 channel)
    or ``RGB`` (3 channels) for 8-bit files, else a float32 ``[H, W]`` grey array."""
    if channels not in (1, 3):
        raise DataError(f"2-D image files give 1 or 3 channels; the model expects {channels}")
    if image.mode in HIGH_BIT_MODES:
        return np.asarray(image).astype(np.float32) / np.float32(HIGH_BIT_MODES[image.mode])
    if channels == 1:
        return image.convert("L") if image.mode in _GREY_MODES else _rgb(image).convert("L")
    return image.convert("L").convert("RGB") if image.mode in _GREY_MODES else _rgb(image)


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
    elif config.intensity == "scale":
        steps.append(ScaleIntensity())
    return T.Compose(steps)


class ScaleIntensity:
    """Min-max to [0, 1] per sample, as MONAI's ``ScaleIntensity`` (what ``intensity="scale"``
    means for volumes too); a constant image becomes zeros, as MONAI's does. The minimum
    and maximum are those of the finite values: one NaN or Inf voxel stays where it is
    (audits skip such files) instead of making every other value NaN."""

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        finite = tensor[torch.isfinite(tensor)]
        if finite.numel() == 0:  # empty, or nothing finite: nothing to scale by
            return tensor.clone()
        low, high = finite.min(), finite.max()
        if high <= low:
            return torch.where(torch.isfinite(tensor), torch.zeros_like(tensor), tensor)
        return (tensor - low) / (high - low)

    def __repr__(self) -> str:
        return "ScaleIntensity()"


def split_transform(transform: Callable) -> Tuple[Callable, Callable]:
    """``(geometry, tensor steps)``: the steps before and after the to-tensor step of a
    torchvision ``Compose``, so that float images take the same resize, crop and
    normalisation as 8-bit ones."""
    from torchvision import transforms as T

    steps = list(getattr(transform, "transforms", []))
    at = next((i for i, step in enumerate(steps) if type(step).__name__ in _TO_TENSOR), None)
    if at is None:
        raise DataError(f"the image transform {transform} has no ToTensor step; 16-bit and float images cannot "
                        "go through it: convert the files to 8 bits, or pass a DataConfig without the library's "
                        "own transform")
    return T.Compose(steps[:at]), T.Compose(steps[at + 1:])


class ImageReader:
    """``reader(path) -> tensor [C, H, W]`` for one data config (see the module docstring)."""

    def __init__(self, config: DataConfig, loaded: Optional[LoadedModel] = None):
        self.channels = config.channels
        self.transform = image_transform(config, loaded)
        self._split: Optional[Tuple[Callable, Callable]] = None

    def __call__(self, path: str) -> torch.Tensor:
        return self.read_image(open_image(path))

    def read_image(self, image) -> torch.Tensor:
        """A decoded PIL image (from a file, a dataset's column, a tar member) as the model's input."""
        converted = convert_image(image, self.channels)
        if not isinstance(converted, np.ndarray):
            return self.transform(converted).float()
        from PIL import Image

        if self._split is None:
            self._split = split_transform(self.transform)
        geometry, after = self._split
        band = np.asarray(geometry(Image.fromarray(converted)), dtype=np.float32)
        tensor = torch.from_numpy(band.copy())[None].expand(self.channels, *band.shape).contiguous()
        return after(tensor).float()


def read_grey(path: str) -> torch.Tensor:
    """The image as a ``[1, H, W]`` float tensor without the model's transform (to explain
    a 2-D/3-D mismatch with the real shape)."""
    converted = convert_image(open_image(path), 1)
    return torch.as_tensor(np.asarray(converted, dtype=np.float32))[None]
