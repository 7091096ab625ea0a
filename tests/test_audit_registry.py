"""The audit's checks registry: a check declared in one module and registered with one
line reaches the table, the thresholds, summary.json, per_class.csv, the report, the
printed summary and the command line; a registry that clashes is refused."""

import json

import numpy as np
import pytest

from audit_fixtures import brute_force_knn, clustered_features
from nnsim_hooks.audit import Thresholds, analyse
from nnsim_hooks.audit.checks import CHECKS
from nnsim_hooks.audit.checks.check import FLAG, FLOAT, Check, Column, ThresholdSpec, check_registry
from nnsim_hooks.cli import commands
from nnsim_hooks.errors import InputError
from nnsim_hooks.index import GradientIndex


class Isolated(Check):
    """A sample whose nearest neighbour is far: what issue 20's checks look like."""

    name = "isolated"
    columns = (Column("top_similarity", FLOAT, "similarity to the nearest neighbour"),
               Column("is_isolated", FLAG, "the nearest neighbour is below isolated_below"))
    thresholds = (ThresholdSpec("isolated_below", 0.5, "flag samples whose nearest neighbour is less similar",
                                "isolated: nearest-neighbour similarity below this", low=-1.0, high=1.0),)
    class_headers = ("isolated",)

    def compute(self, inputs):
        top = inputs.sims[:, 0]
        if inputs.dataset is not None:  # checks may read the samples: here, their own copy of the similarity
            top = np.array([inputs.dataset[int(p)] for p in inputs.positions], dtype=np.float64)
        return {"top_similarity": top, "is_isolated": np.isfinite(top) & (top < inputs.thresholds.isolated_below)}

    def summary(self, table, info, num_classes):
        return {"isolated": int(table["is_isolated"].sum()), "thresholds": {"isolated_count_check": True}}

    def per_class(self, rows):
        return {"isolated": int(rows["is_isolated"].sum())}

    def headline(self, summary):
        return f"{summary['isolated']} isolated"

    def summary_lines(self, summary):
        return [f"  isolated          {summary['isolated']:,}"]

    def cards(self, summary):
        return [(str(summary["isolated"]), "isolated samples", "warn")]

    def class_cells(self, row, summary):
        return [f"<td>{row['isolated']}</td>"]

    def section(self, result, pictures, names):
        return f"<section><h2>Isolated samples ({result.summary['isolated']})</h2></section>"

    def add_cli_arguments(self, group):
        group.add_argument("--isolated-below", type=float, default=None, help="isolated_below threshold")

    def thresholds_from_cli(self, args):
        return {} if args.isolated_below is None else {"isolated_below": args.isolated_below}


@pytest.fixture
def isolated():
    check = Isolated()
    CHECKS.append(check)  # the one registry line
    yield check
    CHECKS.remove(check)


def test_a_registered_check_reaches_every_output(isolated, tmp_path):
    feats, labels = clustered_features(n_per_class=10, classes=3, seed=6)
    feats[4] = -feats[5]  # far from everything else in its class
    idx = GradientIndex.from_features(feats, labels=labels, predictions=labels)
    limits = Thresholds(isolated_below=0.6)
    result = analyse(idx, k=3, thresholds=limits)
    t = result.table
    # the table: its columns after the built-in checks' ones, values from a brute-force k-NN
    sims, _ = brute_force_knn(feats, 3)
    np.testing.assert_allclose(t["top_similarity"], sims[:, 0], atol=1e-5)
    assert t["is_isolated"].tolist() == (sims[:, 0] < 0.6).tolist() and t["is_isolated"].any()
    cols = list(t.columns)
    assert cols.index("consistency") < cols.index("top_similarity") < cols.index("is_isolated") < cols.index("gradient_norm")
    # summary.json, per_class.csv, repr, printed summary
    s = result.summary
    assert s["isolated"] == int((sims[:, 0] < 0.6).sum()) and s["thresholds"]["isolated_below"] == 0.6
    assert s["thresholds"]["isolated_count_check"] and "duplicate_similarity_used" in s["thresholds"]
    assert result.per_class["isolated"].iloc[-1] == s["isolated"]
    assert repr(result).endswith(f"{s['outliers']} outliers, {s['isolated']} isolated>")
    assert f"  isolated          {s['isolated']}" in commands.format_summary(result, tmp_path)
    # the report: card, per-class column, section, threshold row
    page = result.report_html()
    assert "isolated samples" in page and "<th>isolated</th>" in page
    assert f"<h2>Isolated samples ({s['isolated']})</h2>" in page and "<code>isolated_below</code>" in page
    assert page.index("Rarest samples") < page.index("Isolated samples (") < page.index("Distributions")
    # the saved folder
    out = result.save(tmp_path / "saved")
    assert json.loads((out / "summary.json").read_text())["isolated"] == s["isolated"]
    assert "top_similarity" in (out / "table.csv").read_text().splitlines()[0]
    # a check that reads the samples gets them by dataset position (here: the unreadable first two are skipped)
    samples = np.r_[np.nan, np.nan, np.linspace(-1, 1, len(labels))]
    result = analyse(idx, k=3, thresholds=limits, positions=np.arange(len(labels)) + 2, n_total=len(labels) + 2,
                     dataset=samples)
    np.testing.assert_array_equal(result.table["top_similarity"].to_numpy()[2:], samples[2:])
    assert result.table["top_similarity"].isna().tolist()[:3] == [True, True, False]
    assert result.table["is_isolated"].sum() == int((samples[2:] < 0.6).sum())


def test_a_registered_check_gets_its_thresholds_and_flags(isolated):
    assert Thresholds().isolated_below == 0.5
    with pytest.raises(InputError, match=r"Thresholds.isolated_below must lie in \[-1.0, 1.0\], got 2"):
        Thresholds(isolated_below=2)
    parser = commands.build_parser()
    audit_parser = next(a for a in parser._subparsers._group_actions[0].choices.values() if a.prog.endswith("audit"))
    assert "isolated_below" in audit_parser.format_help() and "--isolated-below" in audit_parser.format_help()
    args = parser.parse_args(["audit", "--isolated-below", "0.3", "--threshold", "duplicate=0.9"])
    assert commands._thresholds(args.threshold, args) == {"isolated_below": 0.3, "duplicate": 0.9}
    args = parser.parse_args(["audit", "--isolated-below", "0.3", "--threshold", "isolated_below=0.4"])
    with pytest.raises(commands.CliError, match="contradicts isolated_below=0.3"):
        commands._thresholds(args.threshold, args)
    args = parser.parse_args(["audit", "--threshold", "isolated_below=7"])
    with pytest.raises(InputError, match="isolated_below"):
        commands._thresholds(args.threshold, args)


def test_the_built_in_registry_and_its_outputs_order():
    assert [c.name for c in CHECKS] == ["label_issues", "near_duplicates", "rare_samples", "denoising", "model_state",
                                          "image_quality"]
    assert list(Thresholds().to_dict()) == ["label_issue", "duplicate", "duplicate_quantile", "outlier_z",
                                            "outlier_min_gap", "outlier_quantile", "chance_margin",
                                            "min_predicted_share", "max_unscored_share", "memorised_agreement",
                                            "hidden_disagreement", "memorised_flag_rate", "image_quality"]


class Named(Check):
    def __init__(self, name, columns=(), needs=(), thresholds=()):
        self.name, self.columns, self.needs, self.thresholds = name, columns, needs, thresholds


@pytest.mark.parametrize("registry, message", [
    ([Named("a"), Named("a")], "name is empty or taken"),
    ([Named("")], "name is empty or taken"),
    (CHECKS + [Named("a", columns=(Column("density", FLOAT, ""),))], "column 'density' is already computed"),
    ([Named("a", columns=(Column("x", FLOAT, ""),)), Named("b", columns=(Column("x", FLOAT, ""),))],
     "column 'x' is already computed"),
    ([Named("a", columns=(Column("label", FLOAT, ""),))], "column 'label' is already computed"),
    ([Named("a", needs=("b_col",)), Named("b", columns=(Column("b_col", FLOAT, ""),))], "register it after"),
    ([Named("a", thresholds=(ThresholdSpec("t", 1.0, "", ""),)), Named("b", thresholds=(ThresholdSpec("t", 1.0, "", ""),))],
     "threshold 't' is already declared"),
    ([Named("a", thresholds=(ThresholdSpec("t", 2.0, "", "", low=0, high=1),))], r"must lie in \[0, 1\]"),
])
def test_a_clashing_registry_is_refused(registry, message):
    with pytest.raises((ValueError, InputError), match=message):
        check_registry(registry)
    check_registry([Named("b", columns=(Column("b_col", FLOAT, ""),)), Named("a", needs=("b_col",))])  # in order: fine


def test_a_check_that_forgets_a_column_is_named(tmp_path):
    class Forgetful(Isolated):
        name = "forgetful"

        def compute(self, inputs):
            return {"top_similarity": inputs.sims[:, 0]}

    check = Forgetful()
    CHECKS.append(check)
    try:
        feats, labels = clustered_features(n_per_class=4, classes=2)
        with pytest.raises(ValueError, match=r"'forgetful' did not compute its columns \['is_isolated'\]"):
            analyse(GradientIndex.from_features(feats, labels=labels, predictions=labels), k=2)
    finally:
        CHECKS.remove(check)
    with pytest.raises(ValueError, match="kind 'text'"):
        Column("x", "text", "")
