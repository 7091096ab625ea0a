"""The report's table of every sample, driven in a real headless Chromium: paging, sorting,
filtering, the neighbour panel (from the table, from the panel itself and from a gallery),
and the decisions' export through the download button, each against the audit's own table;
the exported CSV is then read back by the next audit's decisions. Skipped when Chromium is
missing, unless NNSIM_REQUIRE_CHROMIUM=1 (CI)."""

import html
import json
import re

import numpy as np
import pytest
import torch

import nnsim_hooks
from audit_fixtures import digits_with_every_finding
from nnsim_hooks.audit.decisions import apply_decisions
from nnsim_hooks.audit.explorer import PAGE_SIZE
from nnsim_hooks.audit.ranking import suspicion_order
from test_report_chromium import browse, chromium

pytestmark = pytest.mark.slow  # an audit, then Chromium: about 30 s on 2 cores

CLASSES = [f"digit {i}" for i in range(10)]

# Runs once the page has loaded: every interaction goes through the page's own controls
# (clicks, <select> changes); the results are written into <pre id="results">.
DRIVER = """<script>
window.__errors = [];
window.addEventListener("error", function (e) { window.__errors.push(String(e.message)); });
window.addEventListener("load", async function () {
  var out = {};
  var q = function (s) { return document.querySelector(s); };
  var X = window.nnsimExplorer;
  function set(sel, v) { var e = q(sel); e.value = v; e.dispatchEvent(new Event("change")); }
  function everyPage() {
    while (!q("#prev").disabled) q("#prev").click();
    var ids = X.visible();
    while (!q("#next").disabled) { q("#next").click(); ids = ids.concat(X.visible()); }
    return ids;
  }
  function panel() {
    return {sample: Number(q("#nbr-panel").getAttribute("data-sample")), hidden: q("#nbr-panel").hidden,
            neighbours: Array.prototype.map.call(document.querySelectorAll("#nbr-panel .nbr-item"),
              function (f) { return [Number(f.getAttribute("data-sample")), Number(f.getAttribute("data-similarity"))]; })};
  }
  function decide(tr, decision, label) {
    var pick = tr.querySelector("select.decision"), lab = tr.querySelector("select.new-label");
    pick.value = decision; pick.dispatchEvent(new Event("change"));
    if (label !== undefined) { lab.value = label; lab.dispatchEvent(new Event("change")); }
  }
  try {
    out.page1 = X.visible(); out.status = q("#status").textContent; out.prevDisabled = q("#prev").disabled;
    q("#next").click(); out.page2 = X.visible();
    out.all = everyPage(); out.nextDisabled = q("#next").disabled;
    q('th[data-col="knn_similarity"]').click(); out.sortAsc = everyPage();
    q('th[data-col="knn_similarity"]').click(); out.sortDesc = everyPage();
    out.sortedMark = q('th[data-col="knn_similarity"]').getAttribute("data-sorted");
    q('th[data-col="label"]').click(); out.sortLabel = everyPage();  // many ties: broken by rank
    q('th[data-col="rank"]').click();
    set("#f-class", "3"); out.class3 = everyPage(); set("#f-class", "");
    set("#f-check", "label issue"); out.labelIssue = everyPage();
    set("#f-check", "duplicate"); out.duplicate = everyPage();
    set("#f-check", "rare"); out.rare = everyPage();
    set("#f-check", "any"); out.any = everyPage();
    set("#f-check", "");
    set("#f-score", "label_issue_score"); set("#f-min", "0.2"); set("#f-max", "0.8"); out.range = everyPage();
    set("#f-score", "knn_similarity"); set("#f-min", ""); set("#f-max", "0.9"); out.rangeKnn = everyPage();
    set("#f-max", ""); set("#f-score", "label_issue_score");
    while (!q("#prev").disabled) q("#prev").click();

    q("tbody button.nbr").click(); out.fromTable = panel();
    document.querySelectorAll("#nbr-panel .nbr-item")[1].querySelector("img, .noimg").click(); out.fromPanel = panel();
    var fig = document.querySelector("main > section:not(#explorer) figure[data-sample]");
    fig.querySelector("img, .noimg").click(); out.gallery = Number(fig.getAttribute("data-sample"));
    out.fromGallery = panel();

    var rows = document.querySelectorAll("#explorer tbody tr");
    decide(rows[0], "relabel", "5"); decide(rows[1], "remove"); decide(rows[2], "keep");
    decide(rows[3], "remove"); decide(rows[3], "");
    out.decided = [0, 1, 2].map(function (i) { return Number(rows[i].getAttribute("data-sample")); });
    q("#next").click(); q("#prev").click();
    out.kept = q("#explorer tbody tr select.decision").value;
    out.button = q("#download").textContent;
    out.stored = JSON.parse(window.localStorage.getItem(X.storeKey));
    var blobs = [], downloads = [];
    URL.createObjectURL = function (b) { blobs.push(b); return "about:blank"; };
    HTMLAnchorElement.prototype.click = function () { downloads.push(this.getAttribute("download")); };
    q("#download").click();
    out.downloads = downloads;
    out.csv = await blobs[0].text();
  } catch (e) { out.exception = String(e) + "\\n" + e.stack; }
  out.errors = window.__errors;
  var pre = document.createElement("pre"); pre.id = "results"; pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script></body>"""


@pytest.fixture(scope="module")
def audited(tmp_path_factory):
    """A real audit with something in every check, and class names."""
    model, ds = digits_with_every_finding()
    out = tmp_path_factory.mktemp("explorer") / "audit"
    result = nnsim_hooks.audit(model, ds, progress=False, sketch_dim=128, k=6, out_dir=out, class_names=CLASSES)
    t = result.table
    assert len(t) > 3 * PAGE_SIZE and t["is_label_issue"].any() and (t["duplicate_group"] >= 0).any()
    assert t["is_outlier"].any()
    return result, ds, out / "report.html"


@pytest.fixture(scope="module")
def driven(audited, tmp_path_factory):
    binary = chromium()
    result, _, report = audited
    tmp = tmp_path_factory.mktemp("chromium")
    page = tmp / "driven.html"
    page.write_text(report.read_text().replace("</body>", DRIVER))
    dom = browse(binary, tmp, "--virtual-time-budget=20000", "--dump-dom", page.as_uri())
    found = re.search(r'<pre id="results">(.*?)</pre>', dom, re.S)
    assert found, "the driver did not run: " + dom[-500:]
    out = json.loads(html.unescape(found.group(1)))
    assert "exception" not in out, out["exception"]
    assert out["errors"] == []
    return out


def _ranked(t):
    return t.index[suspicion_order(t)].tolist()


def _sorted(t, column, descending):
    rank = np.empty(len(t), dtype=np.int64)
    rank[suspicion_order(t)] = np.arange(len(t))
    v = t[column].astype("Float64").to_numpy(dtype=np.float64, na_value=np.nan)
    keys = [(np.isnan(x), (-x if descending else x) if not np.isnan(x) else 0.0, r) for x, r in zip(v, rank)]
    return [int(t.index[i]) for i in sorted(range(len(t)), key=lambda i: keys[i])]


def test_paging(audited, driven):
    t = audited[0].table
    ranked = _ranked(t)
    assert driven["page1"] == ranked[:PAGE_SIZE] and driven["page2"] == ranked[PAGE_SIZE:2 * PAGE_SIZE]
    assert driven["all"] == ranked  # every sample reachable, each once
    assert driven["prevDisabled"] and driven["nextDisabled"]
    pages = -(-len(t) // PAGE_SIZE)
    assert driven["status"] == f"samples 1–{PAGE_SIZE} of {len(t)} · page 1 of {pages}"


def test_sorting(audited, driven):
    t = audited[0].table
    assert driven["sortAsc"] == _sorted(t, "knn_similarity", descending=False)
    assert driven["sortDesc"] == _sorted(t, "knn_similarity", descending=True)
    assert driven["sortedMark"] == "desc"
    assert driven["sortLabel"] == _sorted(t, "label", descending=False)  # ties in the order of suspicion


def test_filters(audited, driven):
    t = audited[0].table
    ranked = _ranked(t)

    def where(mask):
        chosen = set(t.index[np.asarray(mask, dtype=bool)])
        return [i for i in ranked if i in chosen]

    assert driven["class3"] == where(t["label"].fillna(-1) == 3) and driven["class3"]
    assert driven["labelIssue"] == where(t["is_label_issue"])
    assert driven["duplicate"] == where(t["duplicate_group"] >= 0)
    assert driven["rare"] == where(t["is_outlier"])
    assert driven["any"] == where(t["is_label_issue"] | (t["duplicate_group"] >= 0) | t["is_outlier"])
    score = t["label_issue_score"]
    assert driven["range"] == where((score >= 0.2) & (score <= 0.8)) and driven["range"]
    assert driven["rangeKnn"] == where(t["knn_similarity"] <= 0.9)


def _neighbours(t, sample):
    row = t.loc[sample]
    k = len([c for c in t.columns if c.startswith("neighbor_")])
    return [(int(row[f"neighbor_{j}"]), float(row[f"similarity_{j}"])) for j in range(1, k + 1)
            if row[f"neighbor_{j}"] >= 0]


def test_neighbour_clicks(audited, driven):
    t = audited[0].table
    first = _ranked(t)[0]
    for view, sample in (("fromTable", first), ("fromPanel", _neighbours(t, first)[1][0]),
                         ("fromGallery", driven["gallery"])):
        shown = driven[view]
        assert shown["sample"] == sample and not shown["hidden"]
        expected = _neighbours(t, sample)
        assert [j for j, _ in shown["neighbours"]] == [j for j, _ in expected]
        assert np.allclose([s for _, s in shown["neighbours"]], [s for _, s in expected], atol=1e-6)


def test_export_and_read_back(audited, driven, tmp_path):
    result, ds, _ = audited
    relabelled, removed, kept = driven["decided"]
    assert driven["kept"] == "relabel"  # the choice survives paging away and back
    assert driven["button"] == "Download decisions (3)" and driven["downloads"] == ["decisions.csv"]
    rows_of = {int(i): r for r, i in enumerate(result.table.index)}  # kept in the browser, by table row
    assert driven["stored"] == {str(rows_of[relabelled]): {"decision": "relabel", "label": 5},
                                str(rows_of[removed]): {"decision": "remove"},
                                str(rows_of[kept]): {"decision": "keep"}}
    rows = {relabelled: f"{relabelled},relabel,digit 5", removed: f"{removed},remove,", kept: f"{kept},keep,"}
    assert driven["csv"] == "path_or_index,decision,new_label\n" + "".join(rows[i] + "\n" for i in sorted(rows))
    path = tmp_path / "decisions.csv"
    path.write_text(driven["csv"])
    new, _, record = apply_decisions(ds, path, class_names=CLASSES)
    assert len(new) == len(ds) - 1 and record["removed_samples"] == [str(removed)]
    position = relabelled - (relabelled > removed)
    assert int(new[position][1]) == 5 and torch.equal(new[position][0], ds[relabelled][0])


def test_report_has_no_external_resource(audited):
    text = audited[2].read_text()
    assert not re.search(r"<script[^>]*\bsrc=", text)
    assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}/", text.split("<script>")[-1])  # the script fetches nothing
    assert "fetch(" not in text and "XMLHttpRequest" not in text


# Decides on the first row, reloads the page, and reports what the reloaded page shows.
RELOAD = """<script>
window.addEventListener("load", function () {
  var q = function (s) { return document.querySelector(s); };
  if (!sessionStorage.getItem("phase")) {
    sessionStorage.setItem("phase", "1");
    var pick = q("#explorer tbody tr select.decision");
    pick.value = "remove"; pick.dispatchEvent(new Event("change"));
    location.reload();
    return;
  }
  var pre = document.createElement("pre"); pre.id = "results";
  pre.textContent = JSON.stringify({first: Number(q("#explorer tbody tr").getAttribute("data-sample")),
                                    shown: q("#explorer tbody tr select.decision").value,
                                    csv: window.nnsimExplorer.csv()});
  document.body.appendChild(pre);
});
</script></body>"""


def test_decisions_survive_a_reload(audited, tmp_path):
    binary = chromium()
    page = tmp_path / "reload.html"
    page.write_text(audited[2].read_text().replace("</body>", RELOAD))
    dom = browse(binary, tmp_path, "--virtual-time-budget=20000", "--dump-dom", page.as_uri())
    found = re.search(r'<pre id="results">(.*?)</pre>', dom, re.S)
    assert found, "the page did not reload: " + dom[-300:]
    out = json.loads(html.unescape(found.group(1)))
    assert out["shown"] == "remove"
    assert out["csv"] == f"path_or_index,decision,new_label\n{out['first']},remove,\n"
