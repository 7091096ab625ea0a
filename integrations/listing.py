"""What a data layout yields: the files, their labels and class names, in dataset order."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Optional, Sequence

from nnsim_hooks.errors import DataError

from .files import SHOW


@dataclass
class Listing:
    """The samples of one layout.

    Attributes:
        paths: the files, in dataset order.
        labels: integer labels (-1 when missing).
        classes: class names by index, or [] when the labels are bare integers.
        layout: ``imagefolder``, ``folder``, ``csv`` or ``datalist``.
        masks: segmentation mask files (datalists), None where absent.
    """

    paths: List[str]
    labels: List[int]
    classes: List[str]
    layout: str
    masks: Optional[List[Optional[str]]] = None


def check_exist(paths: Sequence[str], source: str) -> None:
    """Listed files that do not exist are an error naming the first few."""
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        raise DataError(
            f"{len(missing)} of the {len(paths)} files listed in {source} do not exist, for example: "
            + ", ".join(missing[:SHOW])
            + ". Paths are read relative to the list's own folder."
        )
