"""Histograms for the report (matplotlib, Agg backend), as inline PNG data URIs."""

from __future__ import annotations

import base64
import io
from typing import Iterable, Optional, Sequence, Tuple

import numpy as np

# (value, label, colour) of a vertical line drawn on a histogram.
Marker = Tuple[float, str, str]

FLAG_COLOUR = "#c0392b"
BAR_COLOUR = "#5b7db1"


def _pyplot():
    from ..optional import require

    matplotlib = require("matplotlib", "the audit report")
    matplotlib.use("Agg", force=False)  # no display needed; keeps a user's own backend if already chosen
    import matplotlib.pyplot as plt

    return plt


def histogram_figure(
    values: Iterable[float],
    title: str,
    xlabel: str,
    markers: Sequence[Marker] = (),
    *,
    bins: int = 50,
    log_x: bool = False,
    log_y: bool = False,
    note: Optional[str] = None,
):
    """The matplotlib figure of :func:`histogram` (None when there is nothing to draw);
    the caller closes it.

    The axis labels say "log scale" exactly when that axis is logarithmic (``log_x`` is
    dropped when the values span less than a decade), and ``note`` goes under the title,
    outside the plotting area, so that it never covers the bars."""
    v = np.asarray(list(values) if not isinstance(values, np.ndarray) else values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if log_x:
        v = v[v > 0]
    if v.size == 0:
        return None
    log_x = log_x and v.max() > 10 * v.min()  # a log axis only helps over more than a decade
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 3.1 if note else 2.9), dpi=110)
    try:
        if log_x:
            edges = np.geomspace(v.min(), v.max(), bins + 1)
            ax.set_xscale("log")
        else:
            lo, hi = float(v.min()), float(v.max())
            for value, _, _ in markers:
                if value is not None and np.isfinite(value):
                    lo, hi = min(lo, value), max(hi, value)
            if hi <= lo:
                lo, hi = lo - 0.5, hi + 0.5
            edges = np.linspace(lo, hi, bins + 1)
        ax.hist(v, bins=edges, color=BAR_COLOUR, edgecolor="white", linewidth=0.4)
        if log_y:
            from matplotlib.ticker import FuncFormatter, NullFormatter

            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
            ax.yaxis.set_minor_formatter(NullFormatter())
        for value, label, colour in markers:
            if value is not None and np.isfinite(value):
                ax.axvline(value, color=colour, linestyle="--", linewidth=1.6, label=label)
        if markers:
            ax.legend(fontsize=7.5, frameon=False, loc="best")
        ax.set_title(f"{title}\n{note}" if note else title, fontsize=9.5 if note else 10)
        ax.set_xlabel(f"{xlabel} (log scale)" if log_x else xlabel, fontsize=8.5)
        ax.set_ylabel("samples (log scale)" if log_y else "samples", fontsize=8.5)
        ax.tick_params(labelsize=7.5)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
        # fixed margins: tight_layout costs ~0.5 s per figure
        fig.subplots_adjust(left=0.12, right=0.97, bottom=0.17, top=0.84 if note else 0.89)
    except BaseException:
        plt.close(fig)
        raise
    return fig


def histogram(
    values: Iterable[float],
    title: str,
    xlabel: str,
    markers: Sequence[Marker] = (),
    *,
    bins: int = 50,
    log_x: bool = False,
    log_y: bool = False,
    note: Optional[str] = None,
) -> Optional[str]:
    """A histogram of the finite ``values`` with vertical lines at ``markers``, as a PNG
    data URI; None when there is nothing to draw. ``xlabel`` names the quantity only: the
    axis says "log scale" itself when it is one (see :func:`histogram_figure`)."""
    fig = histogram_figure(values, title, xlabel, markers, bins=bins, log_x=log_x, log_y=log_y, note=note)
    if fig is None:
        return None
    plt = _pyplot()
    try:
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
    finally:
        plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
