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


#: What each built-in output function differentiates, in words (``{c}``: the classes).
OUTPUT_WORDS = {
    "full_outputs": "the gradients of all {c} class outputs (each output whitened)",
    "contrast_predicted": "the gradients of the predicted class's output",
    "logit_predicted": "the gradients of the predicted class's logit",
    "sum_outputs": "the gradients of the sum of the outputs",
}


def similarity_in_words(output_name: Any, sketch_dim: Any, num_classes: Any = None, exact: bool = False) -> str:
    """E.g. "similarity of the gradients of the predicted class's output, sketched to 1024
    numbers": what a similarity of the audit was computed from, without internal names."""
    what = OUTPUT_WORDS.get(str(output_name))
    if what is None:
        what = f"the gradients of the output function {output_name}"
    what = what.format(c=num_classes if num_classes else "the")
    per = " per output" if str(output_name) == "full_outputs" else ""
    how = "computed exactly (no sketch)" if exact else f"sketched to {sketch_dim} numbers{per}"
    return f"similarity of {what}, {how}"


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
        # data-sample: the report's script opens this sample's neighbours on a click
        return (f'<figure class="{size} {extra_class}" data-sample="{int(position)}"{title}>{img}'
                f'<figcaption>{caption}</figcaption></figure>')


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


# -- warnings (summary.json's "warnings": see nnsim_hooks.audit.checks.model_state) ------------

#: The report's banner: above everything, in a colour no other part of the page uses.
WARNING_CSS = """
.warning-banner { background:#fff4e5; border:3px solid #d35400; border-radius:10px; padding:14px 20px 10px;
                  margin:18px 0; }
.warning-banner h2 { color:#a04000; font-size:19px; margin:0 0 8px; }
.warning-banner .warning { border-top:1px solid #f0c9a0; padding:8px 0 6px; }
.warning-banner .warning:first-of-type { border-top:none; }
.warning-banner .what { font-weight:650; }
.warning-banner code { background:#fde3c8; }
"""


def warning_banner(warnings: List[Dict[str, Any]]) -> str:
    """The report's banner of the audit's warnings ("" when there are none)."""
    if not warnings:
        return ""
    items = "".join(
        f'<div class="warning" id="warning-{escape(w.get("code", ""))}"><div class="what">'
        f'{escape(w.get("message", ""))} <code>{escape(w.get("code", ""))}</code></div>'
        f'<p><b>What the numbers can and cannot tell:</b> {escape(w.get("meaning", ""))}</p>'
        f'<p><b>What to do:</b> {escape(w.get("advice", ""))}</p></div>'
        for w in warnings)
    count = len(warnings)
    return (f'<section class="warning-banner" role="alert"><h2>⚠ Read this first: {count} warning'
            f'{"s" if count > 1 else ""} on what these numbers can tell</h2>{items}</section>')


def warning_lines(warnings: List[Dict[str, Any]]) -> List[str]:
    """The warnings as lines of the summary ``nnsim audit`` prints (none when there are none)."""
    lines: List[str] = []
    for w in warnings:
        lines += [f"WARNING [{w.get('code')}]: {w.get('message')}", f"  can and cannot tell: {w.get('meaning')}",
                  f"  what to do: {w.get('advice')}"]
    if lines:
        lines.append("The numbers below are not to be trusted as they stand (see the warnings above).")
    return lines
