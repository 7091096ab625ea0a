"""Small pictures of samples: the report's inline thumbnails and the datasets' previews.

Two kinds of picture, both ``numpy.uint8`` arrays ``[H, W]`` (grey) or ``[H, W, 3]`` (RGB):

- **The report's thumbnails** (:func:`thumbnail`, inline as base64 PNG) come from a chain
  of *thumbnailers*: functions ``fn(obj) -> array | None`` that turn one raw sample (a
  tensor, an array, a PIL image, or whatever a dataset's file loader returns) into a
  picture, or return None when they do not handle it. Registered thumbnailers are tried
  first, newest first, then the default one, which handles:

  - PIL images;
  - 2-D arrays/tensors ``[H, W]``;
  - images ``[C, H, W]`` with C in 1, 3, 4 (channels first, as torchvision gives) or
    ``[H, W, C]`` with C in 3, 4 (channels last);
  - 3-D volumes ``[D, H, W]`` and ``[C, D, H, W]``: the central slice along D (first channel).

  Values are stretched between their minimum and maximum, per image, so normalised
  inputs display fine.

- **Previews of model inputs** (:func:`thumbnail_of`, :func:`from_channels_first`, used by
  :mod:`nnsim_hooks.integrations`' datasets): 2-D images as they are, 3-D volumes as their
  central slice, intensities stretched between percentiles (robust to outliers, as
  radiology viewers do), no larger than ``size`` on the longest side. Pictures of data
  files, which need the file readers, are in ``nnsim_hooks.integrations.file_pictures``
  (this module never imports the integrations).

Extend the report's chain for other data (another integration, say) with::

    from nnsim_hooks.audit import register_thumbnailer

    @register_thumbnailer
    def nifti(obj):
        if not isinstance(obj, nib.Nifti1Image):
            return None
        return default_thumbnailer(obj.get_fdata())
"""

from __future__ import annotations

import base64
import io
import logging
from typing import Any, Callable, List, Optional

import numpy as np
import torch

from .samples import split_item

logger = logging.getLogger(__name__)

Thumbnailer = Callable[[Any], Optional[np.ndarray]]

_REGISTERED: List[Thumbnailer] = []

#: Longest side of a report thumbnail in pixels.
THUMBNAIL_SIZE = 80
#: Longest side of a dataset preview (:func:`thumbnail_of`) in pixels.
DEFAULT_SIZE = 128


def register_thumbnailer(fn: Thumbnailer) -> Thumbnailer:
    """Add ``fn`` in front of the chain (usable as a decorator); returns ``fn``."""
    if not callable(fn):
        raise TypeError(f"a thumbnailer must be callable, got {type(fn).__name__}")
    _REGISTERED.insert(0, fn)
    return fn


def unregister_thumbnailer(fn: Thumbnailer) -> None:
    if fn in _REGISTERED:
        _REGISTERED.remove(fn)


def _stretch(a: np.ndarray) -> np.ndarray:
    """Report thumbnails: min-max to 0..255 (uint8 pictures kept as they are); previews
    use the percentile stretch :func:`to_uint8` instead."""
    if a.dtype == np.uint8:
        return a
    a = a.astype(np.float64)
    finite = np.isfinite(a)
    if not finite.any():
        return np.zeros(a.shape, dtype=np.uint8)
    lo, hi = a[finite].min(), a[finite].max()
    scaled = np.zeros_like(a) if hi <= lo else (np.where(finite, a, lo) - lo) / (hi - lo)
    return (scaled * 255 + 0.5).astype(np.uint8)


def default_thumbnailer(obj: Any) -> Optional[np.ndarray]:
    """The built-in cases listed in the module docstring."""
    if hasattr(obj, "convert") and hasattr(obj, "size") and hasattr(obj, "mode"):  # PIL image
        obj = np.asarray(obj.convert("RGB") if obj.mode not in ("L", "RGB") else obj)
    if torch.is_tensor(obj):
        obj = obj.detach().cpu().float().numpy()
    if not isinstance(obj, np.ndarray) or obj.dtype == object:
        return None
    a = obj
    while a.ndim > 2 and a.shape[0] == 1 and a.ndim != 3:  # drop leading singleton axes of volumes
        a = a[0]
    if a.ndim == 2:
        return _stretch(a)
    if a.ndim == 3:
        if a.shape[0] in (1, 3, 4) and a.shape[-1] not in (3, 4):
            a = np.moveaxis(a, 0, -1)
        elif a.shape[-1] not in (1, 3, 4):  # a volume [D, H, W]: central slice
            return _stretch(a[a.shape[0] // 2])
        if a.shape[-1] == 1:
            return _stretch(a[..., 0])
        return _stretch(a[..., :3])
    if a.ndim == 4:  # [C, D, H, W]: first channel, central slice
        return _stretch(a[0, a.shape[1] // 2])
    return None


def to_image(obj: Any) -> Optional[np.ndarray]:
    """The first thumbnailer's answer for ``obj`` (None when none handles it)."""
    for fn in list(_REGISTERED) + [default_thumbnailer]:
        try:
            image = fn(obj)
        except Exception as exc:  # noqa: BLE001 - a broken thumbnailer must not break the report
            logger.warning("thumbnailer %s failed on %s: %s", getattr(fn, "__name__", fn), type(obj).__name__, exc)
            continue
        if image is not None:
            return image
    return None


def png_data_uri(image: np.ndarray, size: int = THUMBNAIL_SIZE) -> str:
    """``data:image/png;base64,...`` of ``image`` scaled so its longest side is ``size``
    (nearest neighbour when enlarging, so that pixels stay sharp)."""
    from PIL import Image

    pil = Image.fromarray(image)
    scale = size / max(pil.size)
    new = (max(1, round(pil.size[0] * scale)), max(1, round(pil.size[1] * scale)))
    pil = pil.resize(new, Image.NEAREST if scale >= 1 else Image.LANCZOS)
    buf = io.BytesIO()
    pil.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def raw_sample(dataset: Any, position: int) -> Any:
    """What to draw for a sample: the original file for file-backed datasets (not the
    transformed crop), else the input the dataset returns."""
    from .samples import _file_list

    files = _file_list(dataset)
    if files is not None:
        paths, loader = files
        return loader(paths[position])
    x, _, _ = split_item(dataset[position])
    return x


def thumbnail(dataset: Any, position: int, fn: Optional[Thumbnailer] = None, size: int = THUMBNAIL_SIZE) -> Optional[str]:
    """A data URI for sample ``position`` of ``dataset``, or None (no picture possible)."""
    try:
        obj = raw_sample(dataset, position)
    except Exception as exc:  # noqa: BLE001 - unreadable samples have no thumbnail
        logger.debug("no thumbnail for sample %d: %s", position, exc)
        return None
    image = None
    if fn is not None:
        try:
            image = fn(obj)
        except Exception as exc:  # noqa: BLE001
            logger.warning("the thumbnail function failed on sample %d: %s", position, exc)
    if image is None:
        image = to_image(obj)
    if image is None:
        return None
    return png_data_uri(np.ascontiguousarray(image), size)


# -- previews of model inputs (percentile stretch) ------------------------------------------


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
