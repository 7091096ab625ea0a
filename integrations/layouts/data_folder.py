"""The folder layout: ``root/<class>/<file>`` (ImageFolder) or ``root/<file>`` (unlabelled)."""

from __future__ import annotations

import logging
import os
from typing import List, Optional, Sequence

from nnsim_hooks.errors import DataError

from ..files import IMAGE_EXTENSIONS, SHOW, VOLUME_EXTENSIONS, is_data_file
from ..listing import Layout, Listing
from ..walk import Walk

logger = logging.getLogger(__name__)


def _class_indices(class_dirs: List[str], classes: Optional[Sequence[str]], root: str) -> List[int]:
    """Sorted folder order, or the indices of ``classes`` when they are given."""
    if classes is None:
        return list(range(len(class_dirs)))
    index = {str(c): i for i, c in enumerate(classes)}
    unknown = [d for d in class_dirs if d not in index]
    if unknown:
        raise DataError(
            f"ImageFolder '{root}': class folders {unknown[:SHOW]} are not among the classes given "
            f"{list(classes)[:SHOW * 2]}; add them to the classes or move those folders out"
        )
    return [index[d] for d in class_dirs]


def read_folder(root: str, classes: Optional[Sequence[str]] = None) -> Listing:
    """ImageFolder when ``root`` holds class folders (labels: the folders' indices in
    sorted order, or in ``classes``), else the data files directly in ``root`` (label -1)."""
    entries = sorted(os.listdir(root))
    class_dirs = [e for e in entries if os.path.isdir(os.path.join(root, e)) and not e.startswith(".")]
    files = [e for e in entries if os.path.isfile(os.path.join(root, e)) and is_data_file(e)]
    if class_dirs:
        indices = _class_indices(class_dirs, classes, root)
        paths, labels, empty = [], [], []
        # shared by the class folders: a folder or file linked into two classes is listed once
        walk = Walk([root] + [os.path.join(root, name) for name in class_dirs])
        for name, index in zip(class_dirs, indices):
            found = walk.files_under(os.path.join(root, name), is_data_file)
            if not found:
                empty.append(name)
            paths += found
            labels += [index] * len(found)
        walk.warn(root)
        if empty:
            logger.warning("ImageFolder %s: class folders without image files: %s", root, empty[:SHOW])
        if files:
            logger.warning("ImageFolder %s: %d files directly in the root are ignored (not in a class folder)",
                           root, len(files))
        if not paths:
            raise DataError(
                f"ImageFolder '{root}' has class folders {class_dirs[:SHOW]} but no image or volume files in them "
                f"(extensions {IMAGE_EXTENSIONS + VOLUME_EXTENSIONS})"
            )
        names = list(classes) if classes is not None else class_dirs
        return Listing(paths, labels, [str(n) for n in names], layout="imagefolder")
    if files:
        return Listing([os.path.join(root, f) for f in files], [-1] * len(files),
                       [str(n) for n in classes] if classes is not None else [], layout="folder")
    raise DataError(
        f"folder '{root}' holds neither class folders nor image/volume files; expected root/<class>/<image> "
        "(ImageFolder), a CSV of path,label or a MONAI datalist JSON"
    )


LAYOUT = Layout(
    name="folder",
    recognises=os.path.isdir,
    what="a folder (one sub-folder of images per class, or the files themselves)",
    help="ImageFolder (one sub-folder per class), a folder of files",
    list_samples=read_folder,
)
