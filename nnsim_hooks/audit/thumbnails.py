"""Small pictures of samples for the report, inline as base64 PNG.

What is drawn comes from a chain of *thumbnailers*: functions ``fn(obj) -> array | None``
that turn one raw sample (a tensor, an array, a PIL image, or whatever a dataset's file
loader returns) into an ``uint8`` image ``[H, W]`` (grey) or ``[H, W, 3]`` (RGB), or return
None when they do not handle it. Registered thumbnailers are tried first, newest first,
then the default one, which handles:

- PIL images;
- 2-D arrays/tensors ``[H, W]``;
- images ``[C, H, W]`` with C in 1, 3, 4 (channels first, as torchvision gives) or
  ``[H, W, C]`` with C in 3, 4 (channels last);
- 3-D volumes ``[D, H, W]`` and ``[C, D, H, W]``: the central slice along D (first channel).

Values are stretched to 0..255 per image, so normalised inputs display fine.

Extend it for other data (another integration, say) with::

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

#: Longest side of a thumbnail in pixels.
THUMBNAIL_SIZE = 80


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
