"""Pictures of data files as people look at them, without the model's transform: the
image itself or the central slice of a volume (the file readers' side of
:mod:`nnsim_hooks.audit.thumbnails`, which makes every other picture)."""

from __future__ import annotations

import numpy as np

from nnsim_hooks.audit.thumbnails import DEFAULT_SIZE, central_slice, fit, from_channels_first, to_uint8
from nnsim_hooks.errors import DataError, NonFiniteInputError

from .files import unknown_extension


def refuse_nonfinite(array: np.ndarray, path: str) -> np.ndarray:
    """``array``, unless it holds NaN or Inf values: then a :class:`NonFiniteInputError`
    naming the file (a model's gradient of it would be NaN; audits skip and count it)."""
    if np.asarray(array).dtype.kind in "fc":
        bad = int(np.count_nonzero(~np.isfinite(array)))
        if bad:
            raise NonFiniteInputError(f"'{path}' holds {bad:,} NaN or Inf values (of {np.size(array):,}): a model's "
                                      "gradient of it is undefined. Fix the file, or leave it out")
    return array


def image_picture(image, size: int = DEFAULT_SIZE, path: str = "the image") -> np.ndarray:
    """uint8 picture of a PIL image: 16-bit, 32-bit and float images stretched between
    percentiles (8 bits cannot hold them), others in grey or RGB, alpha dropped. A float
    image with NaN or Inf values is a :class:`NonFiniteInputError`."""
    from .images import HIGH_BIT_MODES, convert_image

    if image.mode in HIGH_BIT_MODES:
        return fit(to_uint8(refuse_nonfinite(np.asarray(image), path)), size)
    grey = image.mode in ("1", "L", "LA")
    return fit(np.asarray(convert_image(image, 1 if grey else 3)), size)


def file_picture(path: str, kind: str, spatial_dims: int, size: int = DEFAULT_SIZE) -> np.ndarray:
    """The picture of a data file as people look at it, without the model's transform:
    the image itself (16-bit, 32-bit and float images stretched between percentiles,
    alpha dropped) or the central slice of a volume. A file with NaN or Inf values is a
    :class:`NonFiniteInputError`."""
    if kind == "image":
        from .images import open_image

        return image_picture(open_image(path), size, path)
    if kind == "volume":
        from .volumes import load_volume

        volume = refuse_nonfinite(load_volume(path), path)
        return from_channels_first(volume, volume.ndim - 1, size)
    if kind == "array":
        return array_picture(refuse_nonfinite(np.load(path, allow_pickle=False), path), spatial_dims, size)
    raise DataError(unknown_extension(path))


def array_picture(array: np.ndarray, spatial_dims: int, size: int = DEFAULT_SIZE) -> np.ndarray:
    """uint8 picture of an array (``.npy``, a dataset column): the image, or the central
    slice of a volume with or without its channel axis."""
    array = np.asarray(array)
    if array.ndim == 3 and spatial_dims == 3:
        return fit(to_uint8(central_slice(array)), size)
    return from_channels_first(array, spatial_dims, size)
