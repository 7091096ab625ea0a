"""The MONAI datalist layout, a JSON: ``{"training": [{"image": path, "label": ...}, ...]}``, paths
relative to the JSON's folder. A ``label`` that is a file is a segmentation mask."""

from __future__ import annotations

import json
import os
from typing import Any, Optional, Sequence

from nnsim_hooks.errors import DataError

from ..files import is_data_file
from ..labels import parse_labels
from ..listing import Layout, Listing, check_exist

SECTIONS = ("training", "validation", "test", "testing")


def _load(path: str) -> Any:
    try:
        with open(path, encoding="utf-8-sig") as f:
            return json.load(f)
    except UnicodeDecodeError as exc:
        raise DataError(f"datalist '{path}' is not a text JSON file (byte {exc.start} is not UTF-8); expected a "
                        "MONAI datalist {\"training\": [{\"image\": path, \"label\": ...}]} saved as UTF-8") from exc
    except json.JSONDecodeError as exc:
        raise DataError(f"datalist '{path}' is not valid JSON: {exc}") from exc


def _items(content: Any, path: str, section: Optional[str]) -> list:
    if isinstance(content, list):
        items = content
    elif isinstance(content, dict):
        if section is None:
            section = next((k for k in SECTIONS if k in content), None)
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
    return items


def _one_hot(label: list, path: str, i: int) -> Any:
    """``[0, 1, 0]`` -> 1; ``[x]`` -> x; soft or multi-label vectors are refused (an
    argmax would silently pick one class)."""
    if len(label) == 1:
        return label[0]
    ones = [j for j, v in enumerate(label) if v == 1]
    if len(ones) == 1 and all(v in (0, 1) and not isinstance(v, bool) for v in label):
        return ones[0]
    raise DataError(f"datalist '{path}' item {i}: the label {label[:8]} is not one-hot; the audit needs one class "
                    "per sample (multi-label and soft labels are not supported)")


def read_datalist(
    path: str,
    section: Optional[str] = None,
    image_key: str = "image",
    label_key: str = "label",
    mask_key: str = "mask",
    classes: Optional[Sequence[str]] = None,
) -> Listing:
    """The samples a datalist section lists (labels: see :mod:`nnsim_hooks.integrations.labels`)."""
    base = os.path.dirname(os.path.abspath(path))
    items = _items(_load(path), path, section)
    paths, raw, masks, places = [], [], [], []
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
        if isinstance(label, list):
            label = _one_hot(label, path, i)
        mask = item.get(mask_key)
        if isinstance(label, str) and is_data_file(label):
            mask, label = label, None
        masks.append(os.path.join(base, str(mask)) if isinstance(mask, str) else None)
        raw.append(label)
        places.append(f"item {i}")
    labels, names = parse_labels(raw, places, f"datalist '{path}'", classes)
    return Listing(paths, labels, names, layout="datalist", masks=masks)


def list_datalist(path: str, classes: Optional[Sequence[str]] = None, *, section: Optional[str] = None,
                  image_key: str = "image", label_key: str = "label", mask_key: str = "mask") -> Listing:
    """:func:`read_datalist`, its image and mask files checked to exist."""
    listing = read_datalist(path, section, image_key, label_key, mask_key, classes)
    check_exist(listing.paths, f"datalist '{path}'")
    check_exist([m for m in listing.masks if m], f"datalist '{path}' (labels)")
    return listing


LAYOUT = Layout(
    name="datalist",
    recognises=lambda path: path.lower().endswith(".json"),
    what="a .json MONAI datalist",
    help="a MONAI datalist JSON (.json)",
    list_samples=list_datalist,
    options=("section", "image_key", "label_key", "mask_key"),
    suffixes=(".json",),
)
