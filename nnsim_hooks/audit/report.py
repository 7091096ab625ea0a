"""``report.html``: one self-contained page (pictures inline as base64 PNG, no script,
no network), readable offline in any browser."""

from __future__ import annotations

import datetime
import html
import math
from typing import Any, Dict, List, Optional

import numpy as np
import pandas as pd

from . import plots
from .thumbnails import thumbnail

#: How much each gallery shows (the table has everything).
MAX_LABEL_ISSUES = 36
MAX_NEIGHBOURS_SHOWN = 6
MAX_DUPLICATE_GROUPS = 20
MAX_GROUP_MEMBERS = 8
MAX_RARE = 24

CSS = """
:root { --ink:#1d2430; --muted:#5f6b7a; --line:#e3e7ee; --bg:#f6f8fb; --card:#fff; --bad:#c0392b; --good:#1e8449;
        --accent:#2f5d9e; --warn:#b9770e; }
* { box-sizing: border-box; }
body { margin:0; font: 14px/1.45 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       color:var(--ink); background:var(--bg); }
header { background:#1f2d44; color:#fff; padding:22px 32px 18px; }
header h1 { margin:0 0 4px; font-size:22px; font-weight:600; }
header .sub { color:#c9d3e3; font-size:13px; }
main { max-width:1200px; margin:0 auto; padding:18px 28px 40px; }
section { background:var(--card); border:1px solid var(--line); border-radius:10px; padding:16px 20px 18px;
          margin:16px 0; }
h2 { margin:0 0 6px; font-size:17px; }
p.lead { margin:2px 0 12px; color:var(--muted); max-width:900px; }
.cards { display:grid; grid-template-columns:repeat(auto-fit, minmax(150px, 1fr)); gap:12px; }
.card { border:1px solid var(--line); border-radius:8px; padding:10px 12px; background:#fbfcfe; }
.card .v { font-size:22px; font-weight:650; }
.card .l { color:var(--muted); font-size:12px; }
.card.bad .v { color:var(--bad); } .card.warn .v { color:var(--warn); } .card.good .v { color:var(--good); }
table.data { border-collapse:collapse; width:100%; font-size:12.5px; }
table.data th, table.data td { border-bottom:1px solid var(--line); padding:4px 8px; text-align:right; }
table.data th { background:#f0f3f8; font-weight:600; position:sticky; top:0; }
table.data td:first-child, table.data th:first-child { text-align:left; }
table.data tr.total td { font-weight:650; border-top:2px solid #c9d1dd; }
td.hot { color:var(--bad); font-weight:600; }
.headline { display:grid; grid-template-columns:repeat(auto-fit, minmax(200px, 1fr)); gap:12px; }
.headline .big { font-size:30px; font-weight:700; }
.gallery { display:grid; grid-template-columns:repeat(auto-fill, minmax(540px, 1fr)); gap:10px; }
.issue { display:flex; gap:14px; align-items:flex-start; border:1px solid var(--line); border-radius:8px;
         padding:8px 10px; background:#fcfdff; }
.issue .nbrs { display:flex; flex-wrap:wrap; gap:5px; align-items:flex-start; border-left:2px dashed var(--line);
               padding-left:12px; }
figure { margin:0; text-align:center; font-size:11.5px; color:var(--muted); flex:0 0 auto; }
figure.small { width:58px; } figure.main { width:112px; }
figure img, figure .noimg { display:block; margin:0 auto 2px; border-radius:4px; border:1px solid #d5dbe4;
             image-rendering:pixelated; background:#fff; }
figure.main img, figure.main .noimg { width:88px; height:88px; object-fit:contain; }
figure.small img, figure.small .noimg { width:54px; height:54px; object-fit:contain; }
figure .noimg { display:flex; align-items:center; justify-content:center; font-size:10px; color:#999; }
figure.keep img { border:3px solid var(--good); }
figure.main figcaption { color:var(--ink); }
.lab { font-weight:650; }
.lab.bad { color:var(--bad); } .lab.good { color:var(--good); } .lab.other { color:var(--muted); }
.groups { display:grid; grid-template-columns:repeat(auto-fill, minmax(330px, 1fr)); gap:10px; }
.group { border:1px solid var(--line); border-radius:8px; padding:8px 10px; }
.group .members { display:flex; flex-wrap:wrap; gap:6px; margin-top:6px; }
.rare { display:flex; flex-wrap:wrap; gap:10px; }
.plots { display:grid; grid-template-columns:repeat(auto-fit, minmax(420px, 1fr)); gap:10px; }
.plots img { width:100%; height:auto; border:1px solid var(--line); border-radius:6px; }
.muted { color:var(--muted); }
code { background:#eef1f6; padding:1px 4px; border-radius:3px; font-size:12px; }
footer { color:var(--muted); font-size:12px; text-align:center; margin-top:20px; }
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _pct(x: Optional[float], digits: int = 1) -> str:
    return "–" if x is None or not math.isfinite(x) else f"{100 * x:.{digits}f}%"


def _num(x: Any, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, (int, np.integer)):
        return f"{int(x):,}"
    x = float(x)
    if not math.isfinite(x):
        return "–"
    return f"{x:,.{digits}g}" if abs(x) >= 1000 else f"{x:.{digits}g}"


class _Pictures:
    """Thumbnails of one dataset, each made once."""

    def __init__(self, result):
        self.dataset = result.dataset
        self.fn = result.thumbnail
        self.cache: Dict[int, Optional[str]] = {}

    def uri(self, position: int) -> Optional[str]:
        if self.dataset is None:
            return None
        if position not in self.cache:
            self.cache[position] = thumbnail(self.dataset, int(position), self.fn)
        return self.cache[position]

    def figure(self, position: int, caption: str, size: str = "small", extra_class: str = "") -> str:
        uri = self.uri(position)
        img = (f'<img src="{uri}" alt="sample {int(position)}" loading="eager">' if uri
               else '<div class="noimg">no image</div>')
        return f'<figure class="{size} {extra_class}">{img}<figcaption>{caption}</figcaption></figure>'


class _Names:
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
            return _e(self.names[c])
        return str(c)


def _cards(s: Dict[str, Any]) -> str:
    den = s.get("denoising", {})
    items = [
        (f"{s['label_issues']:,}", f"suspected label errors ({_pct(s.get('label_issue_rate'))} of labels)",
         "bad" if s["label_issues"] else "good"),
        (f"{s['duplicate_groups']:,}", f"near-duplicate groups ({s['samples_in_duplicate_groups']:,} samples)",
         "warn" if s["duplicate_groups"] else "good"),
        (f"{s['outliers']:,}", "outliers / rare samples", "warn" if s["outliers"] else "good"),
        (_num(den.get("median_effective_neighbors")), "median effective neighbours N_eff", ""),
        (_num(den.get("median_denoising_factor")), "median noise-variance factor 1/N_eff (d = 1, cosine kernel)", ""),
        (_pct(s.get("agreement", {}).get("prediction_vs_label")), "predictions agreeing with labels", ""),
    ]
    if s.get("unreadable"):
        items.append((f"{s['unreadable']:,}", "unreadable files (skipped)", "bad"))
    if s.get("missing_labels"):
        items.append((f"{s['missing_labels']:,}", "samples without a label", "warn"))
    body = "".join(f'<div class="card {cls}"><div class="v">{v}</div><div class="l">{_e(l)}</div></div>'
                   for v, l, cls in items)
    return f'<div class="cards">{body}</div>'


def _headline(s: Dict[str, Any]) -> str:
    extra = s.get("extra") or {}
    if "agreement_with_true_labels" not in extra:
        if not extra:
            return ""
        rows = "".join(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in extra.items())
        return f'<section><h2>Run information</h2><table class="data">{rows}</table></section>'
    den = s.get("denoising", {})
    found = extra.get("label_issue_recall")
    prec = extra.get("label_issue_precision")
    return f"""
<section><h2>The paper's headline: the network averages label noise away</h2>
<p class="lead">The demo planted {_pct(extra.get('planted_noise_rate'))} wrong labels and trained the network on them.
The true labels are used only for the first two numbers; everything the audit computes ignores them.</p>
<div class="headline">
 <div class="card"><div class="big">{_pct(extra.get('agreement_with_noisy_labels'))}</div>
   <div class="l">agreement of the network with the noisy labels it was trained on</div></div>
 <div class="card good"><div class="big" style="color:var(--good)">{_pct(extra.get('agreement_with_true_labels'))}</div>
   <div class="l">agreement with the true labels (known because the noise was planted)</div></div>
 <div class="card"><div class="big">{_pct(den.get('predicted_agreement_with_clean_labels'))}</div>
   <div class="l">audit's label-free prediction of the agreement with clean labels, from N_eff and the estimated
   noise rate (the paper, §3)</div></div>
 <div class="card"><div class="big">{_num(den.get('median_effective_neighbors'))}</div>
   <div class="l">median N_eff: label-noise variance divided by this at a prediction (1/N_eff =
   {_num(den.get('median_denoising_factor'))})</div></div>
 <div class="card"><div class="big">{_pct(s.get('label_issue_rate'))}</div>
   <div class="l">labels flagged (planted: {_pct(extra.get('planted_noise_rate'))}); precision {_pct(prec)},
   recall {_pct(found)}</div></div>
</div></section>"""


def _class_table(result, names: _Names) -> str:
    pc = result.per_class
    head = ("<tr><th>class</th><th>samples</th><th>predicted as</th><th>agreement</th><th>label issues</th>"
            "<th>issue rate</th><th>outliers</th><th>in dup. groups</th><th>median N_eff</th>"
            "<th>median 1/N_eff</th><th>median consistency</th></tr>")
    rows = []
    overall = result.summary.get("label_issue_rate") or 0.0
    for r in pc.to_dict("records"):
        cls = r["class"]
        label = cls if isinstance(cls, str) and not str(cls).lstrip("-").isdigit() else names(int(cls))
        rate = r["label_issue_rate"]
        hot = ' class="hot"' if isinstance(rate, float) and math.isfinite(rate) and rate > max(2 * overall, 0.05) \
            and cls != "all" else ""
        rows.append(
            f'<tr class="{"total" if cls == "all" else ""}"><td>{label}</td><td>{_num(r["samples"])}</td>'
            f'<td>{"–" if pd.isna(r["predicted_as"]) else _num(int(r["predicted_as"]))}</td>'
            f'<td>{_pct(r["agreement"])}</td><td>{_num(r["label_issues"])}</td><td{hot}>{_pct(rate)}</td>'
            f'<td>{_num(r["outliers"])}</td><td>{_num(r["in_duplicate_groups"])}</td>'
            f'<td>{_num(r["median_effective_neighbors"])}</td><td>{_num(r["median_denoising_factor"])}</td>'
            f'<td>{_num(r["median_consistency"])}</td></tr>'
        )
    return (f'<section><h2>Health per class</h2><p class="lead">By given label. <b>agreement</b>: predictions equal to the '
            'label. <b>N_eff</b>: how many samples the network averages at each prediction, so label-noise variance is '
            'divided by N_eff there (the paper, §3; medians, as samples whose similarities cancel out have N_eff near 0). '
            'Shown: the scalar 1/N_eff of the cosine kernel of one differentiated value, the predicted class\'s '
            'contrast (d = 1, where the authors\' d×d matrix factor Σ_j A_ij A_ijᵀ reduces to 1/N_eff; the cosine '
            'kernel, so that large-gradient samples do not dominate); '
            '<b>consistency</b>: distance between a prediction and the kernel-weighted average of the others\' '
            f'predictions (0 = the averaging hypothesis holds exactly).</p><table class="data">{head}{"".join(rows)}'
            '</table></section>')


def _label_issue_gallery(result, pics: _Pictures, names: _Names) -> str:
    issues = result.label_issues()
    total = len(issues)
    if total == 0:
        body = '<p class="muted">No label is contradicted by the samples the network sees as similar.</p>'
    else:
        cards = []
        for pos, r in issues.head(MAX_LABEL_ISSUES).iterrows():
            own = r["label"]
            main = pics.figure(
                pos,
                f'#{pos} · label <span class="lab bad">{names(own)}</span> → '
                f'<span class="lab good">{names(r["suggested_label"])}</span><br>score {r["label_issue_score"]:.2f}'
                f' · predicted {names(r["prediction"])}',
                "main",
            )
            nbrs = []
            for j in range(1, min(result.k, MAX_NEIGHBOURS_SHOWN) + 1):
                nid = int(r.get(f"neighbor_{j}", -1))
                if nid < 0:
                    continue
                nlab = result.table.at[nid, "label"]
                known = nlab is not pd.NA and nlab == nlab
                cls = ("good" if known and nlab == r["suggested_label"] else
                       "bad" if known and nlab == own else "other")
                nbrs.append(pics.figure(nid, f'<span class="lab {cls}">{names(nlab)}</span> · '
                                              f'{r[f"similarity_{j}"]:.3f}'))
            cards.append(f'<div class="issue">{main}<div class="nbrs">{"".join(nbrs)}</div></div>')
        more = f'<p class="muted">… and {total - MAX_LABEL_ISSUES} more in table.csv.</p>' if total > MAX_LABEL_ISSUES else ""
        body = f'<div class="gallery">{"".join(cards)}</div>{more}'
    return (f'<section><h2>Suspected label errors ({total:,})</h2><p class="lead">Each sample (left) with its nearest '
            'neighbours as the network sees them (right: their label · similarity; green: the neighbours\' majority label, red: the '
            'sample\'s own label). The score is the share of the similarity-weighted neighbour labels that disagree '
            f'with the sample\'s label; the arrow shows their majority. Flagged at score ≥ {result.thresholds.label_issue:g}.</p>{body}</section>')


def _duplicate_gallery(result, pics: _Pictures, names: _Names) -> str:
    dups = result.duplicates()
    s = result.summary
    thr = s["thresholds"].get("duplicate_similarity_used")
    if len(dups) == 0:
        body = '<p class="muted">No pair of samples above the duplicate threshold.</p>'
    else:
        blocks = []
        for g, members in list(dups.groupby("duplicate_group", sort=True))[:MAX_DUPLICATE_GROUPS]:
            figs = []
            for pos, r in members.head(MAX_GROUP_MEMBERS).iterrows():
                keep = bool(r["duplicate_representative"])
                figs.append(pics.figure(pos, f'#{pos} · {names(r["label"])}{" · keep" if keep else ""}',
                                        "small", "keep" if keep else ""))
            labels = set(members["label"].dropna().tolist())
            note = ' · <span class="lab bad">labels differ</span>' if len(labels) > 1 else ""
            more = f" (+{len(members) - MAX_GROUP_MEMBERS} more)" if len(members) > MAX_GROUP_MEMBERS else ""
            blocks.append(f'<div class="group"><b>group {g}</b> · {len(members)} samples{more}{note}'
                          f'<div class="members">{"".join(figs)}</div></div>')
        n_groups = s["duplicate_groups"]
        more = (f'<p class="muted">… and {n_groups - MAX_DUPLICATE_GROUPS} more groups in table.csv '
                '(column duplicate_group).</p>') if n_groups > MAX_DUPLICATE_GROUPS else ""
        body = f'<div class="groups">{"".join(blocks)}</div>{more}'
    return (f'<section><h2>Near-duplicate groups ({s["duplicate_groups"]:,})</h2><p class="lead">Samples linked by a '
            f'similarity ≥ {_num(thr, 4)} (the network cannot change its output on one without the other). The '
            f'green-framed member is the suggested one to keep.</p>{body}</section>')


def _rare_gallery(result, pics: _Pictures, names: _Names) -> str:
    t = result.table
    rare = t[t["knn_similarity"].notna()].sort_values("knn_similarity").head(MAX_RARE)
    thr = result.summary["thresholds"].get("outlier_knn_similarity_used")
    figs = []
    for pos, r in rare.iterrows():
        flag = ' · <span class="lab bad">outlier</span>' if r["is_outlier"] else ""
        figs.append(pics.figure(pos, f'#{pos} · {names(r["label"])}<br>sim {r["knn_similarity"]:.3f}{flag}', "main"))
    body = f'<div class="rare">{"".join(figs)}</div>' if figs else '<p class="muted">No sample has neighbours.</p>'
    return (f'<section><h2>Rarest samples ({result.summary["outliers"]:,} flagged as outliers)</h2><p class="lead">'
            f'The {len(figs)} samples least similar to their {result.k} nearest neighbours (mean similarity). Flagged '
            f'below {_num(thr, 4)}.</p>{body}</section>')


def _plots(result) -> str:
    t = result.table
    s = result.summary
    thr = s["thresholds"]
    figs = [
        plots.histogram(t["label_issue_score"], "Label-issue score", "share of neighbour label mass on other labels",
                        [(result.thresholds.label_issue, f"flag ≥ {result.thresholds.label_issue:g}", plots.FLAG_COLOUR)],
                        log_y=True),
        plots.histogram(t["similarity_1"] if "similarity_1" in t else [], "Similarity to the nearest neighbour",
                        "cosine similarity of gradients",
                        [(thr.get("duplicate_similarity_used"), f"duplicate ≥ {_num(thr.get('duplicate_similarity_used'), 4)}",
                          plots.FLAG_COLOUR)], log_y=True),
        plots.histogram(t["knn_similarity"], f"Mean similarity to the {result.k} nearest neighbours",
                        "mean cosine similarity",
                        [(thr.get("outlier_knn_similarity_used"), f"outlier < {_num(thr.get('outlier_knn_similarity_used'), 4)}",
                          plots.FLAG_COLOUR)], log_y=True),
        plots.histogram(t["density"], "Density (soft neighbour count Σⱼ k(xᵢ, xⱼ))", "soft count"),
        plots.histogram(t["effective_neighbors"], "Effective neighbours N_eff", "N_eff (log scale)", log_x=True,
                        note="label-noise variance ÷ N_eff"),
        plots.histogram(t["consistency"], "Consistency check (label-free)", "‖p_i − kernel average of the p_j‖ (log scale)",
                        log_x=True, note="0: prediction = average of the others'"),
    ]
    imgs = "".join(f'<img src="{f}" alt="histogram">' for f in figs if f)
    return (f'<section><h2>Distributions and thresholds</h2><p class="lead">Dashed lines: the thresholds in use. '
            f'Change them with <code>thresholds={{...}}</code> (Python) or <code>--threshold name=value</code> '
            f'(command line) if they cut your data in the wrong place.</p><div class="plots">{imgs}</div></section>')


def _thresholds(result) -> str:
    thr = result.summary["thresholds"]
    rows = [
        ("label_issue", thr.get("label_issue"), "flag when this share of the neighbours' similarity-weighted labels "
         "is on other labels"),
        ("duplicate", thr.get("duplicate"), "absolute similarity for near-duplicates"),
        ("duplicate_quantile", thr.get("duplicate_quantile"), "if set: use this quantile of nearest-neighbour "
         "similarities instead"),
        ("outlier_z", thr.get("outlier_z"), "outliers: robust z-score of the mean neighbour similarity below the median"),
        ("outlier_min_gap", thr.get("outlier_min_gap"), "outliers must also lie this far below the median similarity"),
        ("outlier_quantile", thr.get("outlier_quantile"), "if set: flag this share of samples instead"),
    ]
    body = "".join(f"<tr><td><code>{_e(n)}</code></td><td>{_e('–' if v is None else v)}</td><td style='text-align:left'>"
                   f"{_e(d)}</td></tr>" for n, v, d in rows)
    return (f'<section><h2>Thresholds</h2><table class="data"><tr><th>name</th><th>value</th>'
            f'<th style="text-align:left">meaning</th></tr>{body}</table></section>')


def render(result) -> str:
    """The whole page for an :class:`~nnsim_hooks.audit.AuditResult`."""
    s = result.summary
    names = _Names(result.class_names)
    pics = _Pictures(result)
    when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    sub = (f"{s['samples']:,} samples · {s.get('num_classes') or '?'} classes · model {_e(s.get('model', '?'))} · "
           f"neighbours by {_e(s.get('output', '?'))} (sketch {_e(s.get('sketch_dim', '?'))} per output) · "
           f"density by {_e(s.get('denoising_output', s.get('output', '?')))} "
           f"({_e(s.get('density', 'sketched'))}) · k = {s['k']} · {when}")
    if s["samples"] < 2:
        note = ('<section><h2>One sample</h2><p class="lead">A dataset of one sample has no neighbours: every score is '
                'undefined and nothing is flagged.</p></section>')
    else:
        note = ""
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>nnsim audit · {s['samples']:,} samples</title><style>{CSS}</style></head><body>",
        f"<header><h1>Dataset audit through the network's eyes</h1><div class='sub'>{sub}</div></header><main>",
        f"<section><h2>Summary</h2><p class='lead'>Similarity = cosine between the network's label-free "
        f"gradients (Charpiat et al., NeurIPS 2019): two samples are similar when training on one moves the "
        f"network's output on the other.</p>{_cards(s)}</section>",
        note,
        _headline(s),
        _class_table(result, names),
        _label_issue_gallery(result, pics, names),
        _duplicate_gallery(result, pics, names),
        _rare_gallery(result, pics, names),
        _plots(result),
        _thresholds(result),
        "<footer>nnsim_hooks audit · files next to this page: table.csv / table.parquet (every sample), per_class.csv, "
        "summary.json, knn_graph.npz (cleanlab format), index/ (the gradient index)</footer>",
        "</main></body></html>",
    ]
    return "\n".join(p for p in parts if p)
