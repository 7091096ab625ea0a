"""``report.html``: one self-contained page (pictures inline as base64 PNG, the table of
every sample as embedded JSON with an inline script, :mod:`.explorer`; nothing fetched from
the network), readable offline in any browser. The summary cards, the per-class table,
the galleries, the histograms and the threshold table come from the checks of
:data:`nnsim_hooks.audit.checks.CHECKS`, in order."""

from __future__ import annotations

import datetime
from typing import Any, Dict

import pandas as pd

from . import checks, explorer
from .checks.check import warnings_of
from .presentation import (
    WARNING_CSS,
    ClassNames,
    Pictures,
    escape as _e,
    num as _num,
    pct as _pct,
    similarity_in_words,
    warning_banner,
)

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
.path { font-family:ui-monospace, Menlo, Consolas, monospace; font-size:11px; overflow-wrap:anywhere; }
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
""" + explorer.CSS


def _cards(s: Dict[str, Any]) -> str:
    items = [card for check in checks.CHECKS for card in check.cards(s)]
    items.append((_pct(s.get("agreement", {}).get("prediction_vs_label")), "predictions agreeing with labels", ""))
    if s.get("unreadable"):
        items.append((f"{s['unreadable']:,}", "unreadable files (skipped)", "bad"))
    if s.get("non_finite"):
        items.append((f"{s['non_finite']:,}", "samples with NaN or Inf values, in input or gradient (skipped)", "bad"))
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


def _class_table(result, names: ClassNames) -> str:
    s = result.summary
    headers = ["class", "samples", "predicted as", "agreement"] + [h for c in checks.CHECKS for h in c.class_headers]
    head = "<tr>" + "".join(f"<th>{h}</th>" for h in headers) + "</tr>"
    rows = []
    for r in result.per_class.to_dict("records"):
        cls = r["class"]
        label = cls if isinstance(cls, str) and not str(cls).lstrip("-").isdigit() else names(int(cls))
        cells = "".join(cell for check in checks.CHECKS for cell in check.class_cells(r, s))
        rows.append(
            f'<tr class="{"total" if cls == "all" else ""}"><td>{label}</td><td>{_num(r["samples"])}</td>'
            f'<td>{"–" if pd.isna(r["predicted_as"]) else _num(int(r["predicted_as"]))}</td>'
            f'<td>{_pct(r["agreement"])}</td>{cells}</tr>'
        )
    notes = " ".join(["By given label. <b>agreement</b>: predictions equal to the label."]
                     + [check.class_note for check in checks.CHECKS if check.class_note])
    return (f'<section><h2>Health per class</h2><p class="lead">{notes}</p><table class="data">{head}{"".join(rows)}'
            '</table></section>')


def _plots(result) -> str:
    figs = [fig for check in checks.CHECKS for fig in check.plots(result)]
    imgs = "".join(f'<img src="{f}" alt="histogram">' for f in figs if f)
    return (f'<section><h2>Distributions and thresholds</h2><p class="lead">Dashed lines: the thresholds in use. '
            f'Change them with <code>thresholds={{...}}</code> (Python) or <code>--threshold name=value</code> '
            f'(command line) if they cut your data in the wrong place.</p><div class="plots">{imgs}</div></section>')


def _thresholds(result) -> str:
    thr = result.summary["thresholds"]
    rows = [(spec.name, thr.get(spec.name), spec.meaning) for check in checks.CHECKS for spec in check.thresholds]
    body = "".join(f"<tr><td><code>{_e(n)}</code></td><td>{_e('–' if v is None else v)}</td><td style='text-align:left'>"
                   f"{_e(d)}</td></tr>" for n, v, d in rows)
    return (f'<section><h2>Thresholds</h2><table class="data"><tr><th>name</th><th>value</th>'
            f'<th style="text-align:left">meaning</th></tr>{body}</table></section>')


def _header_line(s: Dict[str, Any], when: str) -> str:
    """The header's lines, in plain words: what was audited and how similarity was measured."""
    c = s.get("num_classes")
    neighbours = similarity_in_words(s.get("output", "?"), s.get("sketch_dim", "?"), c)
    exact = s.get("density") == "exact"
    paper = similarity_in_words(s.get("denoising_output", s.get("output", "?")),
                                s.get("denoising_sketch_dim", s.get("sketch_dim", "?")), c, exact=exact)
    decided = s.get("decisions")
    decisions = (f" · your decisions applied: {decided['removed']:,} removed, {decided['relabelled']:,} relabelled"
                 if decided else "")
    layers = s.get("neighbor_layers")
    if isinstance(layers, str) and layers != "all":
        neighbours += f", through the layers {layers.replace('first_half', 'of the first half')}"
    plan = s.get("neighbors") or {}
    if plan.get("method") == "cross-fitted":
        neighbours += (f", each sample seen through the one of {plan.get('folds')} cross-fitted models that never "
                       "trained on it (its prediction too)")
    training = s.get("training") or {}
    recipe = training.get("recipe") or {}
    epochs = recipe.get("epochs")
    trained = (f" · trained here: {epochs} epoch{'' if epochs == 1 else 's'}"
               + (f", augmented ({recipe['augment']})" if recipe.get("augment", "none") != "none" else "")
               if recipe else "")
    return (f"{s['samples']:,} samples · {c or '?'} classes · model {_e(s.get('model', '?'))}{_e(trained)}{decisions}"
            f" · {when}<br>"
            f"Neighbours: the {s['k']} most similar samples by {_e(neighbours)}.<br>"
            f"Density and effective neighbours (N_eff): by {_e(paper)}.")


def _neighbors(plan) -> str:
    """How the neighbour lists were searched, with the recall measured."""
    if not plan:
        return ""
    if plan.get("method") == "partition":
        return (f"Neighbours were searched approximately (nprobe {_e(plan.get('nprobe'))} of {_e(plan.get('nlist'))} "
                f"lists): recall@{_e(plan.get('k'))} {_e(plan.get('recall_measured'))}, measured on "
                f"{_e(plan.get('recall_sample'))} held-out exact queries (target {_e(plan.get('recall_target'))}).")
    return "Neighbours were searched exactly."


def render(result) -> str:
    """The whole page for an :class:`~nnsim_hooks.audit.AuditResult`."""
    s = result.summary
    names = ClassNames(result.class_names)
    pics = Pictures(result)
    when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    sub = _header_line(s, when)
    if s["samples"] < 2:
        note = ('<section><h2>One sample</h2><p class="lead">A dataset of one sample has no neighbours: every score is '
                'undefined and nothing is flagged.</p></section>')
    else:
        note = ""
    galleries = [check.section(result, pics, names) for check in checks.CHECKS]
    every_sample = explorer.section(result, pics, names)  # after the galleries: it embeds their pictures too
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>nnsim audit · {s['samples']:,} samples</title><style>{CSS}{WARNING_CSS}</style></head><body>",
        f"<header><h1>Dataset audit through the network's eyes</h1><div class='sub'>{sub}</div></header><main>",
        warning_banner(warnings_of(s)),
        f"<section><h2>Summary</h2><p class='lead'>Similarity = cosine between the network's label-free "
        f"gradients (Charpiat et al., NeurIPS 2019): two samples are similar when training on one moves the "
        f"network's output on the other. {_neighbors(s.get('neighbors'))}</p>{_cards(s)}</section>",
        note,
        _headline(s),
        _class_table(result, names),
        *galleries,
        every_sample,
        _plots(result),
        _thresholds(result),
        "<footer>nnsim_hooks audit · files next to this page: table.csv / table.parquet (every sample), per_class.csv, "
        "summary.json, knn_graph.npz (cleanlab format), index/ (the gradient index)</footer>",
        "</main></body></html>",
    ]
    return "\n".join(p for p in parts if p)
