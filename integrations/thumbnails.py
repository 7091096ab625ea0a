"""Small 8-bit pictures of samples for reports: 2-D images as they are, 3-D volumes as
their central slice.

Every function returns a ``numpy.uint8`` array ``[H, W]`` (grey) or ``[H, W, 3]`` (RGB)
no larger than ``size`` on its longest side, ready for PIL or matplotlib.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

DEFAULT_SIZE = 128


def to_uint8(array: np.ndarray, low: float = 1.0, high: float = 99.0) -> np.ndarray:
    """Scale intensities to 0-255 between the ``low`` and ``high`` percentiles (robust to
    outliers, as radiology viewers do); a constant image becomes mid-grey."""
    a = np.asarray(array, dtype=np.float64)
    finite = a[np.isfinite(a)]
    if finite.size == 0:
        return np.zeros(a.shape, dtype=np.uint8)
    lo, hi = np.percentile(finite, [low, high])
    if hi <= lo:
        lo, hi = float(finite.min()), float(finite.max())
    if hi <= lo:
        return np.full(a.shape, 128, dtype=np.uint8)
    a = np.nan_to_num((a - lo) / (hi - lo), nan=0.0)
    return (np.clip(a, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def central_slice(volume: np.ndarray, axis: int = -1) -> np.ndarray:
    """The middle slice of a ``[X, Y, Z]`` volume along ``axis`` (default the last axis:
    the axial plane of a NIfTI volume in its stored orientation), rotated so that the
    first array axis runs left-right on screen."""
    volume = np.asarray(volume)
    if volume.ndim != 3:
        raise ValueError(f"central_slice needs a 3-D volume, got shape {volume.shape}")
    index = volume.shape[axis] // 2
    plane = np.take(volume, index, axis=axis)
    return np.rot90(plane)


def fit(image: np.ndarray, size: int = DEFAULT_SIZE) -> np.ndarray:
    """Resize ``image`` (uint8 ``[H, W]`` or ``[H, W, 3]``) so that its longest side is at
    most ``size``, keeping the aspect ratio."""
    from PIL import Image

    h, w = image.shape[:2]
    if max(h, w) <= size:
        return np.ascontiguousarray(image)
    scale = size / max(h, w)
    pil = Image.fromarray(np.ascontiguousarray(image))
    pil = pil.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR)
    return np.asarray(pil)


def from_channels_first(array: np.ndarray, spatial_dims: Optional[int] = None, size: int = DEFAULT_SIZE) -> np.ndarray:
    """A thumbnail of a channels-first sample: ``[C, H, W]`` (2-D) or ``[C, D, H, W]`` (3-D,
    central slice along the last axis). Three channels are shown in colour, others as
    the first channel in grey."""
    a = np.asarray(array, dtype=np.float32)
    if spatial_dims is None:
        spatial_dims = a.ndim - 1
    if a.ndim == spatial_dims:  # no channel axis
        a = a[None]
    if a.ndim != spatial_dims + 1 or spatial_dims not in (2, 3):
        raise ValueError(f"cannot make a thumbnail of an array of shape {a.shape} with {spatial_dims} spatial dims")
    if spatial_dims == 3:
        planes = [central_slice(c) for c in a[:3]] if a.shape[0] == 3 else [central_slice(a[0])]
    else:
        planes = list(a[:3]) if a.shape[0] == 3 else [a[0]]
    if len(planes) == 3:
        image = to_uint8(np.stack(planes, axis=-1))
    else:
        image = to_uint8(planes[0])
    return fit(image, size)


def from_tensor(tensor: torch.Tensor, spatial_dims: Optional[int] = None, size: int = DEFAULT_SIZE) -> np.ndarray:
    """:func:`from_channels_first` for a model input tensor (normalisation is undone by
    the percentile scaling)."""
    return from_channels_first(tensor.detach().cpu().float().numpy(), spatial_dims, size)


def thumbnail_of(dataset, index: int, size: int = DEFAULT_SIZE) -> np.ndarray:
    """The thumbnail of sample ``index``: the dataset's own ``thumbnail(index, size)``
    when it has one (original file, central slice of volumes), else one made from the
    input tensor ``dataset[index][0]``."""
    own = getattr(dataset, "thumbnail", None)
    if callable(own):
        return own(index, size=size)
    item = dataset[index]
    tensor = item[0] if isinstance(item, (tuple, list)) else item
    return from_tensor(torch.as_tensor(tensor), size=size)


def image_picture(image, size: int = DEFAULT_SIZE) -> np.ndarray:
    """uint8 picture of a PIL image: 16-bit, 32-bit and float images stretched between
    percentiles (8 bits cannot hold them), others in grey or RGB, alpha dropped."""
    from .images import HIGH_BIT_MODES, convert_image

    if image.mode in HIGH_BIT_MODES:
        return fit(to_uint8(np.asarray(image)), size)
    grey = image.mode in ("1", "L", "LA")
    return fit(np.asarray(convert_image(image, 1 if grey else 3)), size)


def file_picture(path: str, kind: str, spatial_dims: int, size: int = DEFAULT_SIZE) -> np.ndarray:
    """The picture of a data file as people look at it, without the model's transform:
    the image itself (16-bit, 32-bit and float images stretched between percentiles,
    alpha dropped) or the central slice of a volume."""
    if kind == "image":
        from .images import open_image

        return image_picture(open_image(path), size)
    if kind == "volume":
        from .volumes import load_volume

        volume = load_volume(path)
        return from_channels_first(volume, volume.ndim - 1, size)
    if kind == "array":
        array = np.load(path, allow_pickle=False)
        if array.ndim == 3 and spatial_dims == 3:
            return fit(to_uint8(central_slice(array)), size)
        return from_channels_first(array, spatial_dims, size)
    from nnsim_hooks.errors import DataError

    from .files import unknown_extension

    raise DataError(unknown_extension(path))
