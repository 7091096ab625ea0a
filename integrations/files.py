"""What kind of file a path is, by its extension: ``image``, ``volume``, ``array``."""

from __future__ import annotations

import os

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm")
VOLUME_EXTENSIONS = (".nii", ".nii.gz", ".mha", ".mhd", ".nrrd", ".nhdr", ".dcm")
ARRAY_EXTENSIONS = (".npy",)
SHOW = 5  # how many paths or rows an error lists


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


def is_data_file(name: str) -> bool:
    """A file this package reads (hidden files excluded)."""
    return kind_of(name) != "unknown" and not os.path.basename(name).startswith(".")


def unknown_extension(path: str) -> str:
    """The error message for a file of an extension nothing here reads."""
    return (f"'{path}' has an extension this loader does not read; images: {IMAGE_EXTENSIONS}, volumes: "
            f"{VOLUME_EXTENSIONS}, arrays: {ARRAY_EXTENSIONS}")
