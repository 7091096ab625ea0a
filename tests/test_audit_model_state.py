"""The audit says when it cannot: the model-state warnings (near chance, a class never
predicted, memorised labels, no labels) from hand-made arrays, through the summary, the
report, the printed summary and the saved folder, and on real CNNs on digits."""

import json

import numpy as np
import pytest
import torch

import nnsim_hooks
from audit_fixtures import clustered_features, trained_digits
from nnsim_hooks.audit import AuditResult, Thresholds, analyse, demo
from nnsim_hooks.audit.checks.model_state import (
    MIN_CLASS_LABELS,
    chance_agreement,
    model_state_warnings,
    predicted_share_per_class,
)
from nnsim_hooks.cli import commands
from nnsim_hooks.errors import InputError
from nnsim_hooks.index import GradientIndex

DEFAULTS = dict(chance_margin=0.1, min_predicted_share=0.1, memorised_agreement=0.99, memorised_flag_rate=0.01,
                max_unscored_share=0.1, hidden_disagreement=0.1)


def codes(labels, predictions, scores=None, flagged=None, num_classes=None, **thresholds):
    labels, predictions = np.asarray(labels), np.asarray(predictions)
    n = len(labels)
    scores = np.full(n, 0.0) if scores is None else np.asarray(scores, dtype=float)
    flagged = np.zeros(n, bool) if flagged is None else np.asarray(flagged, bool)
    c = num_classes or int(max(labels.max(), predictions.max()) + 1)
    return [w.code for w in model_state_warnings(labels, predictions, scores, flagged, c, **{**DEFAULTS, **thresholds})]


# -- the pure functions, against numbers worked out by hand ----------------------------


def test_chance_is_the_largest_class_share_or_one_over_c():
    assert chance_agreement(np.array([0, 0, 0, 1, -1]), 4) == 0.75
    assert chance_agreement(np.array([0, 1, 2, 3]), 4) == 0.25
    assert chance_agreement(np.array([0, 1]), 10) == 0.5


def test_near_chance_fires_at_and_below_chance_plus_margin_of_the_headroom():
    labels = np.repeat([0, 1], 50)  # balanced: chance 0.5, warned at or below 0.5 + 0.1 * 0.5 = 0.55
    for right, fires in [(55, True), (56, False), (30, True), (100, False)]:
        pred = labels.copy()
        pred[right:] = 1 - pred[right:]  # exactly `right` of the 100 agree
        assert ("near_chance" in codes(labels, pred)) is fires, right
    # a larger margin warns more
    pred = labels.copy()
    pred[70:] = 1 - pred[70:]
    assert "near_chance" not in codes(labels, pred)
    assert "near_chance" in codes(labels, pred, chance_margin=0.5)  # 0.5 + 0.25 = 0.75 >= 0.70


def test_a_class_never_or_rarely_predicted():
    labels = np.repeat([0, 1, 2], [20, 20, 10])
    pred = labels.copy()
    pred[40:] = 0  # class 2 (10 labelled) never predicted
    found = model_state_warnings(labels, pred, np.zeros(50), np.zeros(50, bool), 3, **DEFAULTS)
    warning = next(w for w in found if w.code == "class_not_predicted")
    assert warning.values["classes"] == [2] and warning.values["predicted_share"] == [0.0]
    assert "class 2 (0%)" in warning.message
    np.testing.assert_allclose(predicted_share_per_class(labels, pred, 3), [30 / 20, 1.0, 0.0])
    pred[40] = 2  # predicted once for 10 labels: 10%, not below 10%
    assert "class_not_predicted" not in codes(labels, pred)
    assert "class_not_predicted" in codes(labels, pred, min_predicted_share=0.11)
    # a class with too few labels to judge is not warned about
    small = np.r_[np.repeat([0, 1], 20), np.full(MIN_CLASS_LABELS - 1, 2)]
    assert "class_not_predicted" not in codes(small, np.r_[np.repeat([0, 1], 20), np.zeros(MIN_CLASS_LABELS - 1, int)])


def test_memorised_without_flags_and_with_flags():
    labels = np.tile(np.arange(4), 50)  # 200 samples
    pred = labels.copy()
    assert codes(labels, pred) == ["memorised_no_flags"]  # predicts every label, nothing flagged
    flagged = np.zeros(200, bool)
    flagged[:2] = True  # 1%: still "no flags"
    assert codes(labels, pred, flagged=flagged) == ["memorised_no_flags"]
    flagged[:10] = True  # 5% flagged: the flags hold, the rest does not
    found = model_state_warnings(labels, pred, flagged.astype(float), flagged, 4, **DEFAULTS)
    assert [w.code for w in found] == ["memorised"]
    assert found[0].values["flag_rate"] == 0.05 and found[0].values["samples_with_a_disagreeing_neighbour"] == 0.05
    pred[:3] = (pred[:3] + 1) % 4  # 98.5% agreement: below 0.99, no memorisation warning
    assert codes(labels, pred) == []
    assert codes(labels, pred, memorised_agreement=0.98) == ["memorised_no_flags"]


def test_predictions_disagree_while_the_neighbours_do_not():
    """Issue 20's trained resnet18: 73% agreement, the neighbours contradicting no label:
    no green zero, a warning that says why."""
    labels = np.tile(np.arange(3), 100)
    pred = labels.copy()
    pred[:81] = (pred[:81] + 1) % 3  # 73% agreement
    found = model_state_warnings(labels, pred, np.zeros(300), np.zeros(300, bool), 3, **DEFAULTS)
    assert [w.code for w in found] == ["neighbours_mirror_labels"]
    assert "27.0% of the given labels" in found[0].message and "--train" in found[0].advice
    flagged = np.zeros(300, bool)
    flagged[:30] = True  # the neighbours do contradict 10%: the flags are evidence, no warning
    assert codes(labels, pred, flagged=flagged) == []
    pred[:81] = labels[:81]
    pred[:27] = (pred[:27] + 1) % 3  # 9% disagreement: below hidden_disagreement
    assert codes(labels, pred) == []
    assert codes(labels, pred, hidden_disagreement=0.08) == ["neighbours_mirror_labels"]


def test_the_advice_leaves_out_what_the_audit_already_did():
    """A memorised model audited through the first half of the layers is not told to use
    them; one audited through cross-fitted models is not told to cross-fit."""
    labels = np.tile(np.arange(4), 50)
    flagged = np.zeros(200, bool)
    flagged[:10] = True

    def advice(**context):
        found = model_state_warnings(labels, labels.copy(), flagged.astype(float), flagged, 4, **DEFAULTS, **context)
        return [w.code for w in found], " ".join(w.advice for w in found)

    found, text = advice()
    assert found == ["memorised"] and "--neighbor-layers" in text and "--train" in text
    found, text = advice(neighbor_layers="first_half (31 of 62 modules, 'conv1' to 'layer2.1.bn2')")
    assert found == ["memorised"] and "--neighbor-layers" not in text and "--train" in text
    found, text = advice(neighbor_layers="all")
    assert "--neighbor-layers" in text


def test_cross_fitted_predictions_are_out_of_fold():
    """With cross-fitting the predictions come from models that never saw the sample: 100%
    agreement is generalisation, not memorisation (no warning), and agreement at chance
    means the fold models did not learn the classes (a warning that says so)."""
    labels = np.tile(np.arange(3), 100)
    assert codes(labels, labels.copy()) == ["memorised_no_flags"]
    assert codes(labels, labels.copy(), cross_fitted=2) == []
    guessing = np.roll(labels, 1)  # agrees on none: at chance
    found = model_state_warnings(labels, guessing, np.zeros(300), np.zeros(300, bool), 3, **DEFAULTS, cross_fitted=5)
    assert found[0].code == "near_chance"
    assert "5 cross-fitted models" in found[0].message and "--augment" in found[0].advice
    plain = model_state_warnings(labels, guessing, np.zeros(300), np.zeros(300, bool), 3, **DEFAULTS)
    assert "cross-fitted" not in plain[0].message and "--checkpoint" in plain[0].advice


def test_no_labels_and_too_few_samples():
    assert codes(np.full(30, -1), np.zeros(30, int), num_classes=3) == ["no_labels"]
    assert codes(np.array([0, 1, 0]), np.array([1, 1, 1])) == []  # fewer than 10 labelled: too few to judge
    assert codes(np.full(1, -1), np.zeros(1, int), num_classes=3) == []  # one sample: nothing to compare


def test_unscored_labels():
    labels = np.tile(np.arange(4), 25)  # 100 labelled samples
    pred = np.roll(labels, 1)  # 0% agreement... keep the other warnings out of the way:
    pred[:60] = labels[:60]  # 60% agreement: neither chance nor memorised
    scores = np.zeros(100)
    scores[:11] = np.nan  # 11% unscored: above 10%
    quiet = {**DEFAULTS, "hidden_disagreement": 1.0}  # 40% disagreement without flags warns on its own
    found = model_state_warnings(labels, pred, scores, np.zeros(100, bool), 4, **quiet)
    assert [w.code for w in found] == ["unscored_labels"] and found[0].values["unscored_share"] == 0.11
    scores[10] = 0.0  # 10%: not above
    assert codes(labels, pred, scores=scores, hidden_disagreement=1.0) == []
    assert codes(labels, pred, scores=scores, max_unscored_share=0.05, hidden_disagreement=1.0) == ["unscored_labels"]
    # unlabelled samples without a score do not count
    more_labels, more_pred = np.r_[labels, np.full(50, -1)], np.r_[pred, np.zeros(50, int)]
    assert codes(more_labels, more_pred, scores=np.r_[scores, np.full(50, np.nan)], hidden_disagreement=1.0) == []


def test_thresholds_are_declared_and_validated():
    limits = Thresholds()
    assert (limits.chance_margin, limits.min_predicted_share, limits.memorised_agreement,
            limits.memorised_flag_rate) == (0.1, 0.1, 0.99, 0.01)
    with pytest.raises(InputError, match=r"Thresholds.memorised_agreement must lie in \[0.0, 1.0\], got 1.5"):
        Thresholds(memorised_agreement=1.5)


# -- through the summary, the report, the printed summary and the saved folder ---------


def perfect_fit_result(**kwargs):
    """Clean clusters whose labels are all predicted: exactly what a memorising model shows."""
    feats, labels = clustered_features(n_per_class=15, classes=3, seed=3)
    return analyse(GradientIndex.from_features(feats, labels=labels, predictions=labels), k=5, **kwargs)


@pytest.mark.slow  # saves the folder and renders the report twice
def test_a_warning_reaches_every_output(tmp_path):
    result = perfect_fit_result()
    s = result.summary
    assert s["label_issues"] == 0
    assert [w["code"] for w in s["warnings"]] == ["memorised_no_flags"]
    w = s["warnings"][0]
    assert set(w) == {"code", "message", "meaning", "advice", "values"} and w["values"]["agreement"] == 1.0
    assert "earlier checkpoint" in w["advice"] and "cross-fitting" in w["advice"]
    assert "(1 warning: memorised_no_flags)" in repr(result)
    # the report: a banner above the summary, no green zero
    page = result.report_html()
    assert 'class="warning-banner"' in page and page.index("warning-banner\"") < page.index("<h2>Summary</h2>")
    assert 'id="warning-memorised_no_flags"' in page
    assert '<div class="card good"><div class="v">0</div><div class="l">suspected label errors' not in page
    assert '<div class="card warn"><div class="v">0</div><div class="l">suspected label errors' in page
    assert "No label is contradicted" not in page and "no evidence that the labels are clean" in page
    # the printed summary: the warning before the counts
    text = commands.format_summary(result, tmp_path)
    assert text.index("WARNING [memorised_no_flags]") < text.index("  label issues")
    assert "what to do:" in text
    # saved and loaded back
    out = result.save(tmp_path / "saved")
    assert json.loads((out / "summary.json").read_text())["warnings"][0]["code"] == "memorised_no_flags"
    again = AuditResult.load(out)
    assert 'class="warning-banner"' in again.report_html() and "WARNING [" in commands.format_summary(again, out)


def test_no_warning_keeps_the_green_zero(tmp_path):
    """Clean labels and a model that gets 3 in 45 wrong: nothing flagged, and that zero is green
    (at 10% wrong or more, neighbours_mirror_labels says the zero is no evidence)."""
    feats, labels = clustered_features(n_per_class=15, classes=3, seed=3)
    pred = labels.copy()
    pred[::15] = (pred[::15] + 1) % 3
    result = analyse(GradientIndex.from_features(feats, labels=labels, predictions=pred), k=5)
    s = result.summary
    assert s["warnings"] == [] and s["label_issues"] == 0
    page = result.report_html()
    assert 'class="warning-banner"' not in page
    assert '<div class="card good"><div class="v">0</div><div class="l">suspected label errors' in page
    assert "No label is contradicted" in page
    assert "WARNING" not in commands.format_summary(result, tmp_path) and "warning" not in repr(result)


def test_warning_thresholds_can_be_changed():
    result = perfect_fit_result(thresholds=Thresholds(memorised_flag_rate=0.0))
    assert [w["code"] for w in result.summary["warnings"]] == ["memorised_no_flags"]  # 0 flags <= 0
    feats, labels = clustered_features(n_per_class=15, classes=3, seed=3)
    pred = labels.copy()
    pred[0] = 1  # 44/45 = 97.8%
    idx = GradientIndex.from_features(feats, labels=labels, predictions=pred)
    assert analyse(idx, k=5).summary["warnings"] == []
    loose = analyse(idx, k=5, thresholds=Thresholds(memorised_agreement=0.95)).summary
    assert [w["code"] for w in loose["warnings"]] == ["memorised_no_flags"]
    assert loose["thresholds"]["memorised_agreement"] == 0.95


# -- real models on digits ---------------------------------------------------------------


def digits_dataset(data):
    return torch.utils.data.TensorDataset(data.images, torch.as_tensor(data.noisy_labels))


@pytest.mark.slow
def test_a_random_init_model_warns_near_chance_and_never_predicted_classes():
    data = demo.noisy_digits(0.15, seed=0, limit=300)
    model = demo.small_cnn(width=8, seed=0).eval()  # never trained
    # (these warnings read the predictions only: the cheaper output gives the same)
    result = nnsim_hooks.audit(model, digits_dataset(data), output="contrast", progress=False, k=10)
    found = {w["code"]: w for w in result.summary["warnings"]}
    pred = demo.predict_proba(model, data.images).argmax(1)
    assert "near_chance" in found and found["near_chance"]["values"]["agreement"] == pytest.approx(
        (pred == data.noisy_labels).mean())
    never = sorted(set(range(10)) - set(pred.tolist()))
    assert never and set(never) <= set(found["class_not_predicted"]["values"]["classes"])
    assert 'class="warning-banner"' in result.report_html()


@pytest.fixture(scope="module")
def memorised():
    """The demo's CNN trained on digits with 15% planted flips until it predicts every one."""
    data = demo.noisy_digits(0.15, seed=0, limit=300)
    model = demo.small_cnn(width=8, seed=0)
    history = demo.train(model, data.images, data.noisy_labels, lr=3e-3, until_memorised=True, max_epochs=400, seed=0)
    assert history["train_accuracy"] == 1.0  # it did memorise the flips
    return model.eval(), data


@pytest.mark.slow
def test_a_memorising_model_warns_instead_of_a_green_zero(memorised, tmp_path):
    """With the predicted class's contrast (the default above 16 classes) every neighbour
    shares the memorised label: nothing is flagged, and the audit says it could not tell."""
    model, data = memorised
    result = nnsim_hooks.audit(model, digits_dataset(data), output="contrast", progress=False, k=10)
    s = result.summary
    assert s["label_issues"] <= 0.01 * len(data)  # the planted 15% are hidden...
    codes = [w["code"] for w in s["warnings"]]
    # a memorising network does not average its labels either: the denoising premise check may fail too
    assert codes[-1] == "memorised_no_flags" and set(codes) <= {"memorised_no_flags", "denoising_premise_fails"}  # ...and the audit says so
    page = result.report_html()
    assert 'class="warning-banner"' in page and "No label is contradicted" not in page
    assert 'class="card good"><div class="v">0</div><div class="l">suspected label errors' not in page
    assert commands.format_summary(result, tmp_path).startswith("nnsim audit:")
    assert "WARNING [memorised_no_flags]" in commands.format_summary(result, tmp_path)


@pytest.mark.slow
def test_a_memorising_model_with_the_default_output_finds_the_flips_and_warns_about_the_rest(memorised):
    model, data = memorised
    result = nnsim_hooks.audit(model, digits_dataset(data), progress=False, k=10)
    flagged = result.table["is_label_issue"].to_numpy()
    assert flagged[data.flipped].mean() > 0.8  # the whitened all-outputs kernel still finds them
    codes = [w["code"] for w in result.summary["warnings"]]
    # a memorising network does not average its labels either: the denoising premise check may fail too
    assert codes[-1] == "memorised" and set(codes) <= {"memorised", "denoising_premise_fails"}


@pytest.mark.slow
def test_the_sum_output_also_survives_memorisation(memorised):
    """The label-agnostic sum of the outputs (one backward pass, like contrast) still finds
    the memorised flips (benchmarks/results/label_issues_memorised.md)."""
    model, data = memorised
    result = nnsim_hooks.audit(model, digits_dataset(data), output="sum", progress=False, k=10)
    from sklearn.metrics import roc_auc_score

    score = np.nan_to_num(result.table["label_issue_score"].to_numpy())
    assert roc_auc_score(data.flipped, score) > 0.95
    assert result.table["is_label_issue"].to_numpy()[data.flipped].mean() > 0.8
    codes = [w["code"] for w in result.summary["warnings"]]
    # a memorising network does not average its labels either: the denoising premise check may fail too
    assert codes[-1] == "memorised" and set(codes) <= {"memorised", "denoising_premise_fails"}


@pytest.mark.slow
def test_a_well_trained_model_on_clean_ish_digits_does_not_warn():
    model, data = trained_digits(noise=0.05)
    result = nnsim_hooks.audit(model, digits_dataset(data), output="contrast", progress=False, k=10)
    agreement = result.summary["agreement"]["prediction_vs_label"]
    assert 0.8 < agreement < 0.99  # trained, not memorised
    assert result.summary["warnings"] == []


@pytest.mark.slow
def test_an_audit_through_the_first_half_does_not_advise_the_first_half(memorised, tmp_path):
    """The advice of the memorised warnings leaves out what the audit already used, also
    when the stored audit is analysed again from its folder."""
    from nnsim_hooks.audit.stored import audit_index

    model, data = memorised
    result = nnsim_hooks.audit(model, digits_dataset(data), output="contrast", progress=False, k=10,
                               neighbor_layers="first_half", out_dir=tmp_path / "a")
    warned = [w for w in result.summary["warnings"] if w["code"].startswith("memorised")]
    assert warned, result.summary["warnings"]  # still memorised: the warning stays...
    assert all("--neighbor-layers" not in w["advice"] and "--train" in w["advice"] for w in warned)  # ...new advice
    again = audit_index(tmp_path / "a", out_dir=tmp_path / "b", progress=False, k=10)
    warned = [w for w in again.summary["warnings"] if w["code"].startswith("memorised")]
    assert warned and all("--neighbor-layers" not in w["advice"] for w in warned)
    assert again.summary["neighbor_layers"] == result.summary["neighbor_layers"]
    assert "through the layers of the first half" in again.report_html().split("</header>")[0]
