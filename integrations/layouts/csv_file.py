"""The CSV layout: ``path,label`` rows, header optional, paths relative to the CSV's folder."""

from __future__ import annotations

import csv
import os
from typing import List, Optional, Sequence

from nnsim_hooks.errors import DataError

from ..files import is_data_file
from ..labels import parse_labels
from ..listing import Layout, Listing, check_exist

PATH_COLUMNS = ("path", "image", "file", "filename", "filepath", "img")
LABEL_COLUMNS = ("label", "target", "class", "y", "category")


def _read_rows(path: str) -> List[tuple]:
    """``(line number, cells)`` of the non-blank rows; a file that is not UTF-8 text is
    refused by name (a renamed image or spreadsheet would otherwise raise a bare
    UnicodeDecodeError)."""
    not_text = (f"CSV '{path}' is not a text CSV: expected UTF-8 text with one path,label row per line. "
                "If it is a spreadsheet (.xlsx) or another encoding (UTF-16, Latin-1), export or save it as "
                "CSV UTF-8")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            text = f.read()
    except UnicodeDecodeError as exc:
        raise DataError(f"{not_text} (byte {exc.start} is {exc.object[exc.start:exc.start + 1]!r})") from exc
    if "\x00" in text:
        raise DataError(f"{not_text} (it holds NUL bytes, so it is a binary file)")
    reader = csv.reader(text.splitlines(keepends=True))
    rows = []
    try:
        for cells in reader:
            if cells and any(c.strip() for c in cells):
                rows.append((reader.line_num, cells))
    except csv.Error as exc:
        raise DataError(f"CSV '{path}' line {reader.line_num}: {exc}") from exc
    return rows


def read_csv(path: str, classes: Optional[Sequence[str]] = None) -> Listing:
    """The samples a CSV lists (see :mod:`nnsim_hooks.integrations.labels` for labels)."""
    base = os.path.dirname(os.path.abspath(path))
    rows = _read_rows(path)
    if not rows:
        raise DataError(f"CSV '{path}' is empty; expected rows of path,label")
    first = rows[0][1]
    header = [c.strip().lower() for c in first]
    path_col, label_col = 0, 1 if len(first) > 1 else None
    if any(h in PATH_COLUMNS for h in header):
        path_col, label_col = _header_columns(path, first, header)
        rows = rows[1:]
    elif not is_data_file(first[0].strip()) and not os.path.exists(os.path.join(base, first[0].strip())):
        raise DataError(
            f"CSV '{path}': the first row {first} is neither a header with a column among {list(PATH_COLUMNS)} "
            "nor a data row whose first column is an image path"
        )
    paths, raw, places = [], [], []
    for line, row in rows:
        if path_col >= len(row) or not row[path_col].strip():
            raise DataError(f"CSV '{path}' line {line}: {row} has no path in column {path_col + 1}")
        paths.append(os.path.join(base, row[path_col].strip()))
        raw.append(row[label_col].strip() if label_col is not None and label_col < len(row) else None)
        places.append(f"line {line}")
    labels, names = parse_labels(raw, places, f"CSV '{path}'", classes)
    return Listing(paths, labels, names, layout="csv")


def _header_columns(path: str, first: List[str], header: List[str]) -> tuple:
    """The path and label columns a header names; two candidates for either is ambiguous
    (``path,path,label`` would otherwise silently use the first)."""
    found = []
    for names, what in ((PATH_COLUMNS, "path"), (LABEL_COLUMNS, "label")):
        columns = [i for i, h in enumerate(header) if h in names]
        if len(columns) > 1:
            named = ", ".join(f"'{first[i].strip()}' (column {i + 1})" for i in columns)
            raise DataError(f"CSV '{path}': the header {first} has {len(columns)} {what} columns: {named}. Keep one "
                            f"(or rename the others), so that it is clear which one holds the {what}s")
        found.append(columns[0] if columns else None)
    return found[0], found[1]


def list_csv(path: str, classes: Optional[Sequence[str]] = None) -> Listing:
    """:func:`read_csv`, its files checked to exist."""
    listing = read_csv(path, classes)
    check_exist(listing.paths, f"CSV '{path}'")
    return listing


LAYOUT = Layout(
    name="csv",
    recognises=lambda path: path.lower().endswith(".csv"),
    what="a .csv of path,label",
    help="a CSV of path,label (.csv)",
    list_samples=list_csv,
    suffixes=(".csv",),
)
