"""``RecordDataset``: ``(tensor, label)`` pairs from samples a dataset library holds (a
Hugging Face dataset's rows, WebDataset's tar members) instead of files.

It is a :class:`~nnsim_hooks.integrations.FileDataset` whose ``paths`` are the samples'
names (a dataset index or id, ``shard.tar/key``) and whose reader is a function from the
sample's position to its decoded value: the labels, the shape checks, the audit's
unreadable-sample pass (``loader``), the thumbnails and the sample names all work as they
do for files. A decoded value is a PIL image (read by the image rules of :mod:`.images`),
encoded image bytes, or an array (a 2-D image or a volume, read as :mod:`.volumes` reads
``.npy`` files: resized by linear interpolation when a size is given).
"""

from __future__ import annotations

import io
from typing import Any, Callable, List, Optional, Sequence

import numpy as np
import torch

from nnsim_hooks.audit.thumbnails import DEFAULT_SIZE
from nnsim_hooks.errors import DataError, InputError

from .config import DataConfig, LoadedModel
from .file_dataset import FileDataset
from .file_pictures import array_picture, image_picture
from .images import HIGH_BIT_MODES, ImageReader, convert_image
from .volumes import array_tensor


def _is_image(value: Any) -> bool:
    from PIL import Image

    return isinstance(value, Image.Image)


def as_image_or_array(value: Any, name: str) -> Any:
    """A PIL image or a numpy array from what a dataset column or a tar member holds:
    a PIL image, encoded bytes (``{"bytes": ...}`` as ``datasets.Image(decode=False)``
    gives), an array, a tensor or nested lists."""
    if _is_image(value):
        return value
    if isinstance(value, dict) and value.get("bytes") is not None:
        value = value["bytes"]
    elif isinstance(value, dict) and value.get("path"):  # datasets.Image(decode=False) of a file on disk
        from .images import open_image

        return open_image(value["path"])
    if isinstance(value, (bytes, bytearray)):
        from PIL import Image

        image = Image.open(io.BytesIO(value))
        image.load()
        return image
    if torch.is_tensor(value):
        return value.detach().cpu().numpy()
    if isinstance(value, (np.ndarray, list, tuple)):
        array = np.asarray(value)
        if array.dtype == object or not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
            raise DataError(f"sample {name}: its values are not numbers (dtype {array.dtype})")
        return array
    raise DataError(f"sample {name} holds a {type(value).__name__}, not an image or an array; name the column "
                    "that holds the images (--image-column)")


def unique_names(names: Sequence[str]) -> List[str]:
    """``names`` with repeats told apart (``name#2``), so that each names one sample."""
    seen, out = {}, []
    for name in names:
        count = seen.get(name, 0) + 1
        seen[name] = count
        out.append(name if count == 1 else f"{name}#{count}")
    return out


class RecordDataset(FileDataset):
    """A :class:`FileDataset` of records: ``paths`` are sample names, ``fetch(position)``
    gives a sample's decoded value (see the module docstring).

    Attributes (besides FileDataset's):
        names_are_files: False: the audit shows the names as they are, not relative to a folder.
    """

    names_are_files = False

    def __init__(
        self,
        names: Sequence[str],
        labels: Sequence[int],
        data_config: DataConfig,
        fetch: Callable[[int], Any],
        *,
        classes: Sequence[str] = (),
        loaded: Optional[LoadedModel] = None,
        layout: str,
        source: str,
    ):
        if loaded is not None and loaded.info.get("preprocess") is not None:
            raise InputError(f"{loaded.spec} reads its data with the bundle's own preprocessing, which reads files; "
                             f"{layout} samples are not files: give the model without its bundle preprocessing")
        names = unique_names([str(n) for n in names])
        super().__init__(names, labels, data_config, classes=classes, loaded=loaded, layout=layout, source=source)
        self._fetch = fetch
        self._position = {name: i for i, name in enumerate(names)}

    def value(self, position: int) -> Any:
        """Sample ``position`` as a PIL image or an array (a DataError naming it when it
        cannot be read)."""
        name = self.paths[position]
        try:
            return as_image_or_array(self._fetch(position), name)
        except DataError:
            raise
        except Exception as exc:
            raise DataError(f"sample {position} '{name}' of {self.layout} '{self.source}' cannot be read: "
                            f"{type(exc).__name__}: {exc}") from exc

    def _read(self, name: str) -> torch.Tensor:
        value = self.value(self._position[name])
        config = self.data_config
        if not _is_image(value):
            return array_tensor(value, config)
        if config.spatial_dims != 2:  # read it anyway: the shape check explains the mismatch
            return torch.as_tensor(np.asarray(convert_image(value, 1), dtype=np.float32))[None]
        if self._images is None:
            self._images = ImageReader(config, self._loaded)
        return self._images.read_image(value)

    def loader(self, name: str):
        """The sample as people look at it (see :meth:`FileDataset.loader`)."""
        value = self.value(self._position[name])
        if _is_image(value):
            return image_picture(value, size=1 << 16) if value.mode in HIGH_BIT_MODES else value
        return array_picture(value, self.data_config.spatial_dims, size=1 << 16)

    def thumbnail(self, index: int, size: int = DEFAULT_SIZE) -> np.ndarray:
        value = self.value(index)
        if _is_image(value):
            return image_picture(value, size)
        return array_picture(value, self.data_config.spatial_dims, size)
