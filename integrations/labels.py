"""Class labels from a CSV column or a datalist entry: one rule, never a silent remap.

The labels of one list are, for every row, either

- **integers** (class indices): ``3``, ``"3"``, and integral floats ``3.0`` / ``"3.0"``
  (spreadsheets and pandas write integers that way); or
- **class names** (``"cat"``), mapped to indices in sorted order, as ImageFolder does
  with its folders; or
- **missing**: empty, ``None``/``null``, NaN (``"nan"``) or ``-1``. Such samples get no
  label-issue score.

A list that mixes integers and names, a non-integral number (``1.5``) or a negative
index other than -1 is a :class:`~nnsim_hooks.errors.DataError` listing the first odd
rows: a typo must not turn every label into a string-sorted class name ("10" before
"2"). With ``classes=[...]`` given, a label equal to a class name is that class, any
other integer is a class index below ``len(classes)``, and anything else is an error.
"""

from __future__ import annotations

import logging
import math
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np

from nnsim_hooks.errors import DataError

from .files import SHOW

logger = logging.getLogger(__name__)

MISSING = -1
_MISSING_WORDS = ("", "nan")


def _as_number(value: Any) -> Optional[float]:
    """The number a label value spells, or None when it is not a number."""
    if isinstance(value, (bool, np.bool_)):
        return None
    if isinstance(value, (int, float, np.integer, np.floating)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return None
    return None


def _kind(value: Any) -> Tuple[str, Any]:
    """``("missing", None)``, ``("int", i)``, ``("name", s)`` or ``("bad", why)``."""
    if value is None:
        return "missing", None
    if isinstance(value, str) and value.strip().lower() in _MISSING_WORDS:
        return "missing", None
    number = _as_number(value)
    if number is not None:
        if math.isnan(number):
            return "missing", None
        if not math.isfinite(number) or not number.is_integer():
            return "bad", "not an integer class index"
        if number == MISSING:
            return "missing", None
        if number < 0:
            return "bad", "a negative class index (-1 marks a missing label)"
        return "int", int(number)
    if isinstance(value, str):
        return "name", value.strip()
    return "bad", f"a {type(value).__name__}, not a class index or name"


def _rows(places: Sequence[str], raw: Sequence[Any], picks: Sequence[int]) -> str:
    shown = ", ".join(f"{places[i]}: {raw[i]!r}" for i in picks[:SHOW])
    more = f" and {len(picks) - SHOW} more" if len(picks) > SHOW else ""
    return shown + more


def parse_labels(
    raw: Sequence[Any],
    places: Sequence[str],
    where: str,
    classes: Optional[Sequence[str]] = None,
) -> Tuple[List[int], List[str]]:
    """``(labels, class_names)`` from raw label values (see the module docstring).

    Args:
        raw: one value per sample (strings from a CSV, JSON values from a datalist).
        places: where each value is, for error messages (``"line 7"``, ``"item 3"``).
        where: the list's name (``"CSV 'list.csv'"``).
        classes: explicit class names (index = class), or None to infer them.
    """
    kinds = [_kind(v) for v in raw]
    fix = ("correct them, leave them empty for a missing label, or name the classes explicitly "
           "(load_dataset(..., classes=[...]), --classes a,b,c)")
    bad = [i for i, (k, _) in enumerate(kinds) if k == "bad"]
    if bad:
        reason = kinds[bad[0]][1]
        raise DataError(f"{where}: {len(bad)} label(s) are not class indices or names ({reason}), at "
                        f"{_rows(places, raw, bad)}; {fix}")
    if classes is not None:
        return _with_classes(kinds, raw, places, where, list(classes)), list(classes)
    ints = [i for i, (k, _) in enumerate(kinds) if k == "int"]
    names = [i for i, (k, _) in enumerate(kinds) if k == "name"]
    if ints and names:
        odd, other = (names, "integers") if len(names) <= len(ints) else (ints, "class names")
        raise DataError(
            f"{where}: labels mix integers ({len(ints)} rows) and class names ({len(names)} rows); the odd "
            f"{len(odd)} among {other}: {_rows(places, raw, odd)}. Labels must be integers for every row or class "
            f"names for every row; {fix}"
        )
    if not names:
        return [v if k == "int" else MISSING for k, v in kinds], []
    found = sorted({v for k, v in kinds if k == "name"})
    index = {n: i for i, n in enumerate(found)}
    logger.info("%s: %d class names mapped to indices in sorted order", where, len(found))
    return [index[v] if k == "name" else MISSING for k, v in kinds], found


def _with_classes(kinds, raw, places, where: str, classes: List[str]) -> List[int]:
    if len(set(classes)) != len(classes) or any(not str(c) for c in classes):
        raise DataError(f"classes={classes}: class names must be distinct and not empty")
    index = {str(n): i for i, n in enumerate(classes)}
    labels, unknown = [], []
    for i, (k, v) in enumerate(kinds):
        text = str(raw[i]).strip() if raw[i] is not None else ""
        if k == "missing":
            labels.append(MISSING)
        elif text in index:  # a name first: classes=["1", "0"] maps "1" to class 0
            labels.append(index[text])
        elif k == "int" and v < len(classes):
            labels.append(v)
        else:
            labels.append(MISSING)
            unknown.append(i)
    if unknown:
        raise DataError(
            f"{where}: {len(unknown)} label(s) are neither among the {len(classes)} classes given "
            f"({classes[:SHOW]}{'...' if len(classes) > SHOW else ''}) nor an index below {len(classes)}: "
            f"{_rows(places, raw, unknown)}; correct them or add the names to the classes"
        )
    return labels
