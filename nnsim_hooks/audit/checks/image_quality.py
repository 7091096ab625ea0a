"""Image quality: blurry, dark, light, low-information, odd-sized, odd-shaped and grey
image files, found by `cleanvision <https://github.com/cleanlab/cleanvision>`_ on the files
themselves (not on what the network sees), beside the network's view.

Optional: it runs when cleanvision is installed (``pip install nnsim_hooks[quality]``) and
the audited samples are image files (an ImageFolder, a folder or list of PNG/JPEG files).
Otherwise its columns are NaN and the summary says why: tensors, volumes and data without
files have nothing for cleanvision to read. Unreadable files are skipped (and counted) by the
audit before any check runs, so they never reach cleanvision. ``--no-image-quality`` (or
``Thresholds(image_quality=0)``) skips it. Exact and near duplicates are left to the
gradient check :mod:`.near_duplicates`.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .check import FLOAT, Check, CheckInputs, Column, ThresholdSpec

logger = logging.getLogger(__name__)

#: cleanvision's issue types that this check runs, with what each means.
ISSUES: Tuple[Tuple[str, str], ...] = (
    ("blurry", "blurry (little fine detail)"),
    ("dark", "dark (under-exposed)"),
    ("light", "light (over-exposed)"),
    ("low_information", "low information (little variety of pixel values)"),
    ("odd_size", "an odd size for this dataset"),
    ("odd_aspect_ratio", "an odd aspect ratio"),
    ("grayscale", "grey (no colour)"),
)

#: File endings cleanvision reads as images.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".jp2", ".ppm", ".pgm")

#: Thumbnails per issue type in the report (the table has every row).
MAX_PER_ISSUE = 8

INSTALL_HINT = "pip install 'nnsim_hooks[quality]' (cleanvision) to check it"


def column_name(issue: str) -> str:
    return f"is_{issue}"


def image_files(dataset: Any, positions: Sequence[int]) -> Tuple[Optional[List[str]], Optional[str]]:
    """The image file of each index row (``dataset`` position ``positions[i]``), or
    ``(None, why not)`` when the samples are not image files."""
    from ..sample_names import dataset_paths

    if dataset is None:
        return None, "the audit was given no dataset (an index analysed on its own)"
    paths = dataset_paths(dataset)
    if paths is None:
        return None, "the samples are not files (tensors or arrays in memory)"
    rows = [paths[int(p)] for p in positions]
    not_images = [p for p in rows if not str(p).lower().endswith(IMAGE_SUFFIXES)]
    if not_images:
        return None, (f"{len(not_images)} of {len(rows)} samples are not image files (e.g. "
                      f"{os.path.basename(not_images[0])}); cleanvision reads PNG, JPEG, TIFF and the like")
    missing = [p for p in rows if not os.path.isfile(p)]
    if missing:
        return None, f"{len(missing)} sample files are not on disk (e.g. {missing[0]})"
    return [os.path.abspath(p) for p in rows], None


def cleanvision_flags(files: Sequence[str]) -> Dict[str, np.ndarray]:
    """``{issue: [N] bool}`` from cleanvision's Imagelab over ``files`` (repeats allowed)."""
    from cleanvision import Imagelab

    unique = sorted(set(files))
    lab = Imagelab(filepaths=unique, verbose=False)
    chatter = io.StringIO()
    with contextlib.redirect_stderr(chatter):  # its progress bar ignores verbose=False
        lab.find_issues({issue: {} for issue, _ in ISSUES}, n_jobs=1, verbose=False)
    logger.debug("cleanvision: %s", chatter.getvalue().strip())
    issues = lab.issues
    return {issue: issues.loc[list(files), f"is_{issue}_issue"].to_numpy(dtype=bool) for issue, _ in ISSUES}


def _library() -> Tuple[Optional[str], Optional[str]]:
    """``(version, None)`` when cleanvision imports, else ``(None, why not)``."""
    try:
        import cleanvision
    except ImportError:
        return None, f"cleanvision is not installed ({INSTALL_HINT})"
    return getattr(cleanvision, "__version__", "?"), None


class ImageQuality(Check):
    name = "image_quality"
    columns = tuple(Column(column_name(issue), FLOAT, f"1 if cleanvision finds the image {meaning}, 0 if not, "
                           "NaN where not checked (no cleanvision, not an image file, or turned off)")
                    for issue, meaning in ISSUES)
    thresholds = (
        ThresholdSpec(
            "image_quality", 1.0,
            "1 runs cleanvision's image-quality checks on image files when cleanvision is installed; 0 skips them "
            "(``nnsim audit --no-image-quality``).",
            "1: check image quality with cleanvision; 0: skip",
            low=0.0, high=1.0,
        ),
    )

    def compute(self, inputs: CheckInputs) -> Dict[str, np.ndarray]:
        n = len(inputs.positions)
        nan = {column_name(issue): np.full(n, np.nan) for issue, _ in ISSUES}
        info: Dict[str, Any] = {"checked": False, "reason": None, "library": None}
        inputs.info["image_quality"] = info
        if not inputs.thresholds.image_quality:
            info["reason"] = "turned off (--no-image-quality)"
            return nan
        version, info["reason"] = _library()
        if version is None:
            return nan
        info["library"] = f"cleanvision {version}"
        files, info["reason"] = image_files(inputs.dataset, inputs.positions)
        if files is None:
            return nan
        if n == 0:
            info["reason"] = "no readable sample"
            return nan
        try:
            flags = cleanvision_flags(files)
        except Exception as exc:  # noqa: BLE001 - an optional check must not end the audit
            logger.warning("cleanvision failed, image quality not checked: %s", exc)
            info["reason"] = f"cleanvision failed: {type(exc).__name__}: {exc}"
            return nan
        info["checked"] = True
        return {column_name(issue): flags[issue].astype(np.float64) for issue, _ in ISSUES}

    def summary(self, table, info, num_classes) -> Dict[str, Any]:
        state = dict(info.get("image_quality") or {"checked": False, "reason": "not run"})
        if state.get("checked"):
            counts = {issue: int(np.nansum(table[column_name(issue)].to_numpy(dtype=np.float64)))
                      for issue, _ in ISSUES}
            flagged = np.zeros(len(table), dtype=bool)
            for issue, _ in ISSUES:
                flagged |= table[column_name(issue)].to_numpy(dtype=np.float64) == 1.0
            state.update(counts=counts, images_flagged=int(flagged.sum()),
                         images_checked=int(table[column_name(ISSUES[0][0])].notna().sum()))
        return {"image_quality": state}

    def headline(self, summary) -> Optional[str]:
        state = summary.get("image_quality") or {}
        return f"{state['images_flagged']} low-quality images" if state.get("checked") else None

    def summary_lines(self, summary) -> List[str]:
        state = summary.get("image_quality") or {}
        if not state.get("checked"):
            return [f"  image quality     not checked: {state.get('reason')}"]
        found = ", ".join(f"{issue} {count}" for issue, count in state["counts"].items() if count)
        return [f"  image quality     {state['images_flagged']:,} of {state['images_checked']:,} images flagged"
                + (f" ({found})" if found else "") + f" by {state['library']}"]

    def cards(self, summary):
        state = summary.get("image_quality") or {}
        if not state.get("checked"):
            return [("–", f"image quality not checked: {state.get('reason')}", "")]
        count = state["images_flagged"]
        return [(f"{count:,}", f"images flagged for quality ({state['library']})", "warn" if count else "good")]

    def section(self, result, pictures, names) -> str:
        from html import escape

        state = result.summary.get("image_quality") or {}
        head = "<section><h2>Image quality</h2>"
        if not state.get("checked"):
            return f'{head}<p class="muted">Not checked: {escape(str(state.get("reason")))}.</p></section>'
        t = result.table
        blocks = []
        for issue, meaning in ISSUES:
            rows = t[t[column_name(issue)] == 1.0]
            if not len(rows):
                continue
            figs = [pictures.figure(pos, f'{pictures.name(pos)} · {names(r["label"])}', "small")
                    for pos, r in rows.head(MAX_PER_ISSUE).iterrows()]
            more = f" (+{len(rows) - MAX_PER_ISSUE} more in the table)" if len(rows) > MAX_PER_ISSUE else ""
            blocks.append(f'<div class="group"><b>{escape(issue)}</b> · {len(rows)} images {escape(meaning)}{more}'
                          f'<div class="members">{"".join(figs)}</div></div>')
        body = (f'<div class="groups">{"".join(blocks)}</div>' if blocks
                else '<p class="muted">No image flagged.</p>')
        return (f'{head}<p class="lead">{state["images_flagged"]:,} of {state["images_checked"]:,} image files '
                f'flagged by {escape(state["library"])} on the files themselves (not on what the network sees); '
                f'columns is_blurry, is_dark, … of table.csv.</p>{body}</section>')

    def add_cli_arguments(self, group) -> None:
        group.add_argument("--no-image-quality", action="store_true",
                           help="skip the image-quality check (cleanvision on image files; about 1.5 s to start and 3.5 ms an image)")

    def thresholds_from_cli(self, args) -> Dict[str, Any]:
        return {"image_quality": 0.0} if getattr(args, "no_image_quality", False) else {}


CHECK = ImageQuality()
