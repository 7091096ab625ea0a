"""The report's table of every sample ("All samples"): the table's columns, the neighbour
lists and the thumbnails embedded as JSON in the page, shown by a little vanilla
JavaScript (``explorer.js``, inlined: no file, no library, no network). Paged, sortable
by any column, filterable by class, check and score range; a click on any sample shows
its neighbours; a relabel / remove / keep choice per sample is exported as the CSV that
:mod:`nnsim_hooks.audit.decisions` reads on the next audit."""

from __future__ import annotations

import json
import math
import uuid
from importlib import resources
from typing import Any, Dict, List

import numpy as np
import pandas as pd

from . import checks
from .checks.check import CLASS, FLAG, FLOAT, GROUP
from .presentation import escape
from .ranking import suspicion_order

#: Rows per page of the table.
PAGE_SIZE = 50
#: Thumbnails embedded for the table and the neighbour panel, the most suspicious samples
#: first (each is ~2-4 kB of base64): beyond, rows show "–" instead of a picture.
MAX_TABLE_THUMBNAILS = 600
#: Rows the page embeds at most: beyond, the page would not open (a browser parsing
#: hundreds of MB of JSON) and building it would hold GBs. Flagged samples come first,
#: then the most suspicious others; every row stays in table.csv / table.parquet.
MAX_EXPLORER_ROWS = 20_000
#: The filters by check: (name shown, column, kind); those whose column the table lacks are left out.
CHECK_FILTERS = (("label issue", "is_label_issue", FLAG), ("duplicate", "duplicate_group", GROUP),
                 ("rare", "is_outlier", FLAG))
#: The score filtered by range unless the user picks another.
DEFAULT_SCORE = "label_issue_score"
#: Meanings of the columns the analysis itself writes (the checks declare their own).
CORE_MEANINGS = {
    "readable": "the sample could be read (and its values are finite)",
    "finite": "the sample's values and gradient are finite (NaN or Inf: skipped)",
    "valid": "the sample has a gradient direction",
    "label": "the given label",
    "prediction": "the model's predicted class",
    "label_probability": "the model's probability of the given label",
    "confidence": "the model's probability of its predicted class",
    "gradient_norm": "norm of the sample's gradient",
}


def _kinds(table) -> Dict[str, str]:
    """How each shown column is displayed: class, flag, group, float, int or text."""
    declared = {c.name: c.kind for check in checks.CHECKS for c in check.columns}
    kinds = {}
    for name in table.columns:
        dtype = table[name].dtype
        if name in ("label", "prediction") or declared.get(name) == CLASS:
            kinds[name] = CLASS
        elif declared.get(name) in (FLAG, GROUP, FLOAT):
            kinds[name] = declared[name]
        elif pd.api.types.is_bool_dtype(dtype):
            kinds[name] = FLAG
        elif pd.api.types.is_integer_dtype(dtype):
            kinds[name] = "int"
        elif pd.api.types.is_float_dtype(dtype):
            kinds[name] = FLOAT
        else:
            kinds[name] = "text"
    return kinds


def _json_value(v: Any) -> Any:
    if v is None or v is pd.NA:
        return None
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return float(v) if math.isfinite(v) else None
    return str(v)


def shown_columns(table) -> List[str]:
    """The table's columns shown in the page: all but the neighbour lists (those open in
    the neighbour panel)."""
    return [c for c in table.columns if not c.startswith(("neighbor_", "similarity_"))]


def sample_keys(table) -> List[str]:
    """How the decisions CSV names each row: its ``path`` when the table has one, else its
    dataset position."""
    paths = table["path"].tolist() if "path" in table else [None] * len(table)
    return [str(p) if isinstance(p, str) and p else str(int(i)) for p, i in zip(paths, table.index)]


def flagged_rows(table) -> np.ndarray:
    """Whether each row is flagged by any check of :data:`CHECK_FILTERS`."""
    flagged = np.zeros(len(table), dtype=bool)
    for _, column, kind in CHECK_FILTERS:
        if column in table:
            values = table[column]
            hit = values.fillna(-1).astype(np.int64) >= 0 if kind == GROUP else values.fillna(False).astype(bool)
            flagged |= hit.to_numpy()
    return flagged


def embedded_rows(table, order: np.ndarray, limit: int = MAX_EXPLORER_ROWS) -> np.ndarray:
    """Row numbers the page embeds (``order``: the rows most suspicious first): all of them
    up to ``limit``, else the flagged ones first, then the most suspicious others."""
    if len(order) <= limit:
        return order
    flagged = flagged_rows(table)[order]
    return np.concatenate([order[flagged], order[~flagged]])[:limit]


def payload(result, pictures) -> Dict[str, Any]:
    """Everything the page's script reads (JSON-able)."""
    full = result.table
    order = suspicion_order(full)
    rank = np.empty(len(full), dtype=np.int64)
    rank[order] = np.arange(len(full))
    rows = np.sort(embedded_rows(full, order, MAX_EXPLORER_ROWS))  # in table order
    t = full.iloc[rows]
    rank = rank[rows]
    ids = [int(i) for i in t.index]
    order = np.argsort(rank, kind="stable")  # the embedded rows, most suspicious first
    shown = shown_columns(t)
    kinds = _kinds(t)
    meanings = dict(CORE_MEANINGS)
    meanings.update({c.name: c.meaning for check in checks.CHECKS for c in check.columns})
    neighbour_ids, neighbour_sims = result.neighbor_arrays()
    neighbors = [[[int(j), _json_value(s)] for j, s in zip(row_ids, row_sims) if j >= 0]
                 for row_ids, row_sims in zip(neighbour_ids[rows], neighbour_sims[rows])]
    thumbs = {}
    if pictures is not None:
        for row in order[:MAX_TABLE_THUMBNAILS]:
            uri = pictures.uri(ids[row])
            if uri:
                thumbs[str(ids[row])] = uri
        thumbs.update({str(i): uri for i, uri in pictures.cache.items() if uri})  # those the galleries show
    num_classes = result.summary.get("num_classes") or 0
    names = list(result.class_names) if result.class_names else None
    scores = [c for c in shown if kinds[c] == FLOAT]
    return {
        "ids": ids,
        "keys": sample_keys(t),
        "rank": rank.tolist(),
        "columns": [{"name": c, "kind": kinds[c], "meaning": meanings.get(c, "")} for c in shown],
        "shown": shown,
        "values": {c: [_json_value(v) for v in t[c].tolist()] for c in shown},
        "neighbors": neighbors,
        "classes": names,
        "numClasses": int(num_classes or (len(names) if names else 0)),
        "thumbs": thumbs,
        "checks": [{"name": name, "column": col, "kind": kind} for name, col, kind in CHECK_FILTERS if col in t],
        "scoreColumn": DEFAULT_SCORE if DEFAULT_SCORE in scores else (scores[0] if scores else ""),
        "pageSize": PAGE_SIZE,
        "total": len(full),
        # names this page's decisions in the browser's storage: one per rendering
        "reportId": uuid.uuid4().hex,
    }


def embed_json(data: Dict[str, Any]) -> str:
    """JSON safe inside ``<script>``: no ``</script>`` or ``<!--`` can end it early."""
    text = json.dumps(data, separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def script() -> str:
    return resources.files("nnsim_hooks.audit").joinpath("explorer.js").read_text(encoding="utf-8")


def section(result, pictures, names) -> str:
    """The "All samples" section: controls, the table, the neighbour panel, the script."""
    data = payload(result, pictures)
    kinds = {c["name"]: c for c in data["columns"]}
    labels = sorted({v for v in data["values"].get("label", []) if v is not None and v >= 0})
    class_options = "".join(f'<option value="{c}">{names(c)}</option>' for c in labels)
    check_options = "".join(f'<option value="{escape(c["name"])}">{escape(c["name"])}</option>' for c in data["checks"])
    score_options = "".join(
        f'<option value="{escape(c)}"{" selected" if c == data["scoreColumn"] else ""}>{escape(c)}</option>'
        for c in data["shown"] if kinds[c]["kind"] == FLOAT)
    heads = "".join(f'<th data-col="{escape(c)}" title="{escape(kinds[c]["meaning"])}">{escape(c)}</th>'
                    for c in data["shown"])
    thumbs_note = (f" Pictures are embedded for the {MAX_TABLE_THUMBNAILS} most suspicious samples and those in the "
                   "galleries." if len(result.table) > MAX_TABLE_THUMBNAILS else "")
    shown_rows, total = len(data["ids"]), data["total"]
    if shown_rows < total:
        title = f"The {shown_rows:,} most suspicious of {total:,} samples"
        what = (f"The {shown_rows:,} samples this page holds (every flagged one first, then the most suspicious others; "
                "all of them are in <code>table.csv</code>), most suspicious first")
    else:
        title, what = f"All samples ({total:,})", "Every sample, most suspicious first"
    return f"""<section id="explorer"><h2>{title}</h2>
<p class="lead">{what}: by the label-issue score, ties broken by whether the model's
prediction also contradicts the label, then by the model's probability of the label (low first), then by how close the
voting neighbours are (column <b>rank</b>). Click a column to sort by it (again: reverse), hover it for its meaning.
Click a sample's number, or any picture of this page, for its nearest neighbours. Choose <b>keep</b>, <b>relabel</b> or
<b>remove</b> for the samples you checked and download the decisions as a CSV: <code>nnsim audit --decisions
decisions.csv</code> (or <code>audit(..., decisions="decisions.csv")</code>) applies them on the next audit. The
browser keeps the choices of this page when it lets pages opened from disk store data; the download is what the next
audit reads.{thumbs_note}</p>
<div class="controls">
 <label>class <select id="f-class"><option value="">all</option>{class_options}</select></label>
 <label>check <select id="f-check"><option value="">all samples</option><option value="any">flagged by any check</option>
 {check_options}<option value="none">flagged by none</option></select></label>
 <label>score <select id="f-score">{score_options}</select></label>
 <label>from <input id="f-min" type="number" step="any" size="6"></label>
 <label>to <input id="f-max" type="number" step="any" size="6"></label>
 <button type="button" id="prev">‹ previous</button><button type="button" id="next">next ›</button>
 <span id="status" class="muted"></span>
 <button type="button" id="download">Download decisions (0)</button>
</div>
<div class="scroll"><table class="data explore"><thead><tr><th data-col="rank" title="order of suspicion">rank</th>
<th data-col="sample" title="position in the dataset">sample</th><th>decision</th>{heads}</tr></thead>
<tbody></tbody></table></div>
<div id="nbr-panel" hidden></div>
<script type="application/json" id="nnsim-data">{embed_json(data)}</script>
<script>{script()}</script>
</section>"""


CSS = """
.controls { display:flex; flex-wrap:wrap; gap:8px 14px; align-items:center; margin:6px 0 10px; font-size:12.5px; }
.controls input { width:80px; }
.scroll { overflow-x:auto; }
table.explore th[data-col] { cursor:pointer; white-space:nowrap; }
table.explore th[data-sorted="asc"]::after { content:" ▲"; } table.explore th[data-sorted="desc"]::after { content:" ▼"; }
table.explore td { white-space:nowrap; }
table.explore td.who { display:flex; gap:6px; align-items:center; }
table.explore td.who img, table.explore td.who .noimg { border-radius:3px; border:1px solid #d5dbe4; image-rendering:pixelated; }
button.nbr { font:inherit; color:var(--accent); background:none; border:none; cursor:pointer; padding:0; text-decoration:underline; }
#nbr-panel { position:fixed; right:16px; bottom:16px; max-width:640px; max-height:60vh; overflow:auto; z-index:10;
             background:#fff; border:1px solid #b8c2d1; border-radius:10px; padding:10px 12px;
             box-shadow:0 6px 24px rgba(0,0,0,.18); }
#nbr-panel .nbr-head { display:flex; gap:8px; align-items:baseline; margin-bottom:6px; }
#nbr-panel .close { margin-left:auto; }
#nbr-panel .nbr-list { display:flex; flex-wrap:wrap; gap:6px; align-items:flex-start; }
figure[data-sample] { cursor:pointer; }
"""
