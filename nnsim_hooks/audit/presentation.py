"""How the audit shows numbers and samples: in the report (HTML) and in the summary
``nnsim audit`` prints. Shared by :mod:`.report` and the checks' own sections and lines."""

from __future__ import annotations

import html
import math
from typing import Any, Dict, List, Optional

import numpy as np


def escape(value: Any) -> str:
    return html.escape(str(value), quote=True)


def pct(x: Optional[float], digits: int = 1) -> str:
    """A share as a percentage for the report ("–" when unknown)."""
    return "–" if x is None or not math.isfinite(x) else f"{100 * x:.{digits}f}%"


def num(x: Any, digits: int = 3) -> str:
    """A number for the report ("–" when unknown; thousands separated)."""
    if x is None:
        return "–"
    if isinstance(x, (int, np.integer)):
        return f"{int(x):,}"
    x = float(x)
    if not math.isfinite(x):
        return "–"
    return f"{x:,.{digits}g}" if abs(x) >= 1000 else f"{x:.{digits}g}"


def plain_pct(x: Optional[float]) -> str:
    """A share as a percentage for the terminal ("n/a" when unknown)."""
    return "n/a" if x is None or x != x else f"{100 * x:.1f}%"


def plain_num(x: Optional[float]) -> str:
    """A number for the terminal ("n/a" when unknown)."""
    return "n/a" if x is None or x != x else f"{x:.3g}"


class Pictures:
    """Thumbnails of one audited dataset for the report, each made once."""

    def __init__(self, result):
        self.dataset = result.dataset
        self.fn = result.thumbnail
        self.cache: Dict[int, Optional[str]] = {}
        paths = result.table["path"].dropna() if "path" in result.table else None
        #: dataset position -> file path, for the samples that have one
        self.paths: Dict[int, str] = {} if paths is None else {int(pos): str(p) for pos, p in paths.items()}

    def name(self, position: int) -> str:
        """The sample's file name (its path relative to the dataset's root on hover), or
        ``#position`` when it has no file; HTML."""
        from .sample_names import display_name

        path = self.paths.get(int(position))
        if path is None:
            return f"#{int(position)}"
        shown = escape(display_name(path, position))
        return f'<span class="path" title="{escape(path)} (sample #{int(position)})">{shown}</span>'

    def uri(self, position: int) -> Optional[str]:
        from .thumbnails import thumbnail

        if self.dataset is None:
            return None
        if position not in self.cache:
            self.cache[position] = thumbnail(self.dataset, int(position), self.fn)
        return self.cache[position]

    def figure(self, position: int, caption: str, size: str = "small", extra_class: str = "") -> str:
        """``<figure>`` of sample ``position`` (``size``: "small" or "main")."""
        uri = self.uri(position)
        img = (f'<img src="{uri}" alt="sample {int(position)}" loading="eager">' if uri
               else '<div class="noimg">no image</div>')
        path = self.paths.get(int(position))
        title = "" if path is None else f' title="{escape(path)}"'
        return f'<figure class="{size} {extra_class}"{title}>{img}<figcaption>{caption}</figcaption></figure>'


class ClassNames:
    """``names(c)``: the HTML-escaped name of class ``c`` ("?" when missing)."""

    def __init__(self, names: Optional[List[str]]):
        self.names = names

    def __call__(self, c) -> str:
        if c is None or (isinstance(c, float) and math.isnan(c)):
            return "?"
        try:
            c = int(c)
        except (TypeError, ValueError):
            return "?"
        if c < 0:
            return "?"
        if self.names is not None and c < len(self.names):
            return escape(self.names[c])
        return str(c)
