"""The report's words and plots: the plain-language header, plot axes that say "log
scale" only when they are, notes outside the bars, the explained density, the robust
denoising statistics, the table data embedded safely (and a ``path`` column used)."""

import html
import json
import re

import numpy as np
import pandas as pd
import pytest

from nnsim_hooks.audit import explorer, plots
from nnsim_hooks.audit.checks.denoising import below_one_share
from nnsim_hooks.audit.presentation import similarity_in_words


def test_header_words_name_no_internal_function():
    words = similarity_in_words("contrast_predicted", 1024)
    assert words == "similarity of the gradients of the predicted class's output, sketched to 1024 numbers"
    full = similarity_in_words("full_outputs", 204, 10)
    assert full == ("similarity of the gradients of all 10 class outputs (each output whitened), sketched to 204 "
                    "numbers per output")
    assert "computed exactly" in similarity_in_words("contrast_predicted", 1024, exact=True)
    assert "my_fn" in similarity_in_words("my_fn", 64)


def _figure(values, **kw):
    pytest.importorskip("matplotlib")
    fig = plots.histogram_figure(values, "Title", "quantity", **kw)
    import matplotlib.pyplot as plt

    try:
        ax = fig.axes[0]
        fig.canvas.draw()
        return ax.get_xscale(), ax.get_xlabel(), ax.get_ylabel(), ax.get_title(), list(ax.texts)
    finally:
        plt.close(fig)


def test_log_scale_is_said_only_on_a_log_axis():
    narrow = np.linspace(2.0, 9.0, 50)  # less than a decade: the axis stays linear
    scale, xlabel, ylabel, _, _ = _figure(narrow, log_x=True)
    assert scale == "linear" and "log" not in xlabel and "log" not in ylabel
    wide = np.geomspace(0.01, 100.0, 50)
    scale, xlabel, _, _, _ = _figure(wide, log_x=True)
    assert scale == "log" and xlabel == "quantity (log scale)"
    _, _, ylabel, _, _ = _figure(wide, log_y=True)
    assert ylabel == "samples (log scale)"


def test_a_note_is_under_the_title_not_over_the_bars():
    _, _, _, title, texts = _figure(np.random.default_rng(0).normal(size=200), note="a note")
    assert title == "Title\na note" and texts == []


def test_the_density_title_and_note_fit_in_the_figure():
    import matplotlib.pyplot as plt

    from nnsim_hooks.audit.checks.rare_samples import DENSITY_NOTE

    fig = plots.histogram_figure(np.linspace(-40, 100, 300), "Density: soft count of similar samples, Σⱼ k(xᵢ, xⱼ)",
                                 "soft count", [(0.0, "0", "#777777")], note=DENSITY_NOTE)
    try:
        fig.canvas.draw()
        box = fig.axes[0].title.get_window_extent(fig.canvas.get_renderer())
        frame = fig.bbox
        assert frame.x0 <= box.x0 and box.x1 <= frame.x1 and box.y1 <= frame.y1
    finally:
        plt.close(fig)


def test_share_below_one_effective_neighbour():
    assert below_one_share([0.5, 2.0, np.nan, 0.99, 10.0]) == pytest.approx(2 / 4)
    assert np.isnan(below_one_share([np.nan]))


def test_embedded_json_cannot_end_the_script():
    text = explorer.embed_json({"path": "a</script><script>alert(1)</script>&<!--"})
    assert "</" not in text and "<!--" not in text and "&" not in text
    assert json.loads(text)["path"] == "a</script><script>alert(1)</script>&<!--"


def test_decisions_name_rows_by_path_when_the_table_has_one():
    t = pd.DataFrame({"path": ["a/x.png", None, "b/y,z.png"]}, index=pd.Index([0, 1, 2], name="sample"))
    assert explorer.sample_keys(t) == ["a/x.png", "1", "b/y,z.png"]
    assert explorer.sample_keys(t.drop(columns="path")) == ["0", "1", "2"]


@pytest.fixture(scope="module")
def result():
    import torch

    import nnsim_hooks

    torch.manual_seed(0)
    x = torch.randn(40, 6)
    y = torch.arange(40) % 4
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    return nnsim_hooks.audit(model, torch.utils.data.TensorDataset(x, y), progress=False, sketch_dim=32, k=4,
                             class_names=["ant", "bee", "cat", "dog"])


def test_report_header_summary_and_table_data(result):
    page = result.report_html()
    header = html.unescape(re.search(r"<header>(.*?)</header>", page, re.S).group(1))
    assert "full_outputs" not in header and "contrast_predicted" not in header
    assert "similarity of the gradients of all 4 class outputs" in header
    assert "predicted class's output, sketched to 1024 numbers" in header
    den = result.summary["denoising"]
    assert "mean_denoising_factor" not in den
    factors = result.table["denoising_factor"].dropna()
    assert den["median_denoising_factor"] == pytest.approx(factors.median())
    assert den["denoising_factor_quartiles"] == pytest.approx([factors.quantile(0.25), factors.quantile(0.75)])
    data = json.loads(re.search(r'<script type="application/json" id="nnsim-data">(.*?)</script>', page,
                                re.S).group(1))
    assert data["ids"] == result.table.index.tolist() and data["classes"] == ["ant", "bee", "cat", "dog"]
    assert data["values"]["label"] == result.table["label"].tolist()
    assert not any(c.startswith("neighbor_") for c in data["shown"])
    ids, sims = result.neighbor_arrays()
    assert [[j for j, _ in row] for row in data["neighbors"]] == [[int(j) for j in r if j >= 0] for r in ids]
    # a table with the paths of the files: shown as a column, and naming rows in the export
    result.table["path"] = [f"data/{i}.png" for i in range(len(result.table))]
    try:
        data = explorer.payload(result, None)
        assert "path" in data["shown"] and data["keys"][3] == "data/3.png"
        assert data["columns"][data["shown"].index("path")]["kind"] == "text"
    finally:
        del result.table["path"]


def test_a_large_table_embeds_the_flagged_rows_first_then_the_most_suspicious(result, monkeypatch):
    """Past MAX_EXPLORER_ROWS the page holds the flagged rows, then the most suspicious
    others; every embedded row keeps its own values, global rank and neighbours."""
    from nnsim_hooks.audit.ranking import suspicion_order

    t = result.table
    flagged = explorer.flagged_rows(t)
    limit = int(flagged.sum()) + 3
    assert 0 < flagged.sum() and limit < len(t), "the fixture must flag some rows and not all"
    monkeypatch.setattr(explorer, "MAX_EXPLORER_ROWS", limit)
    data = explorer.payload(result, None)
    order = suspicion_order(t)
    unflagged_first = [int(t.index[r]) for r in order if not flagged[r]][:3]
    expected = sorted([int(i) for i in t.index[flagged]] + unflagged_first)
    assert data["ids"] == expected and data["total"] == len(t)
    rank = {int(t.index[r]): pos for pos, r in enumerate(order)}
    assert data["rank"] == [rank[i] for i in data["ids"]]
    assert data["values"]["label"] == t.loc[data["ids"], "label"].tolist()
    ids, _ = result.neighbor_arrays()
    where = {int(i): r for r, i in enumerate(t.index)}
    assert [[j for j, _ in row] for row in data["neighbors"]] == [
        [int(j) for j in ids[where[i]] if j >= 0] for i in data["ids"]]
    page = result.report_html()
    assert f"The {limit:,} most suspicious of {len(t):,} samples" in page
