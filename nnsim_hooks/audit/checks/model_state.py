"""Can this model audit this data? Checks on the model's state, read from its predictions
and the label vote, that say when the audit's numbers cannot be trusted.

- **near_chance**: the predictions agree with the given labels about as often as guessing
  (an untrained model, weights that did not load, a head for other classes);
- **class_not_predicted**: a class the labels use is (almost) never predicted;
- **memorised_no_flags**: the model predicts (nearly) every given label and the
  neighbours contradict (almost) none: how a network that memorised its training labels
  looks, wrong ones included, and also how a model that fits clean labels looks; the
  audit cannot tell them apart, so "0 label errors" is no evidence;
- **memorised**: the model predicts (nearly) every given label although the neighbours
  contradict some: the flags hold, the predictions and the denoising estimate do not;
- **no_labels**: no sample has a label, so no label error can be found;
- **unscored_labels**: many labelled samples got no label-issue score (no gradient
  direction, or no neighbour with a label and a positive similarity), so their labels were
  not checked.

Each becomes an :class:`~.check.AuditWarning` in ``summary.json``'s ``warnings``, a
banner at the top of the report and lines before the counts of ``nnsim audit``; the
label-issue card is green only when none fired. Measured on digits in
``benchmarks/results/label_issues_memorised.md`` (where the thresholds come from).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import numpy as np

from .check import WARNINGS, AuditWarning, Check, CheckInputs, ThresholdSpec

#: Fewer labelled samples (with a prediction) than this: too few to judge the model.
MIN_LABELLED = 10
#: A class with fewer labelled samples than this is too small to say it is never predicted.
MIN_CLASS_LABELS = 5

# What to do, shared by the warnings that mean "this model cannot show label errors";
# :func:`other_model_advice` leaves out what the audit already did.
_LAYERS_ADVICE = ("look at the samples through the first half of the layers, which memorise less: --neighbor-layers "
                  "first-half (audit(neighbor_layers='first_half'), no training)")
_CHECKPOINT_ADVICE = ("audit with a model that did not memorise these labels: an earlier checkpoint (before the training "
                      "accuracy reached 100%)")
_CROSS_FIT_ADVICE = ("cross-fitting: nnsim audit --train EPOCHS (or audit(train={'epochs': EPOCHS, 'folds': "
                     "'auto'})) trains 5 more models, each blind to a fifth of the data, and looks at every "
                     "sample through the one that never saw it (from scratch on a few hundred images, add --augment with "
                     "transforms that keep your labels, and tens of epochs, so that they learn the classes)")


def other_model_advice(neighbor_layers: Optional[str] = None, cross_fitted: int = 0) -> str:
    """What to try when the model memorised its labels, without what this audit already
    used (``neighbor_layers``: the summary's description, ``"all"`` or None for every
    layer; ``cross_fitted``: the number of fold models, 0 for none)."""
    steps = []
    if neighbor_layers in (None, "all"):
        steps.append(_LAYERS_ADVICE)
    if cross_fitted >= 2:
        steps.append("train the fold models with augmentation (--augment) or more data, so that they learn the "
                     "classes instead of the labels")
    else:
        steps.append(_CHECKPOINT_ADVICE + ", or " + _CROSS_FIT_ADVICE)
    return "; or ".join(steps)


def chance_agreement(labels: np.ndarray, num_classes: int) -> float:
    """The agreement guessing reaches: ``max(1 / C, the largest class's share of the labels)``."""
    labels = np.asarray(labels)
    labels = labels[labels >= 0]
    largest = np.bincount(labels).max() / len(labels) if len(labels) else 0.0
    return float(max(1.0 / max(num_classes, 1), largest))


def predicted_share_per_class(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """``[C]``: predictions of each class divided by the samples labelled with it (among the
    samples with both), NaN for a class with fewer than :data:`MIN_CLASS_LABELS` labels."""
    labels, predictions = np.asarray(labels), np.asarray(predictions)
    both = (labels >= 0) & (predictions >= 0)
    labelled = np.bincount(labels[both], minlength=num_classes)[:num_classes].astype(np.float64)
    predicted = np.bincount(predictions[both], minlength=num_classes)[:num_classes].astype(np.float64)
    return np.where(labelled >= MIN_CLASS_LABELS, predicted / np.maximum(labelled, 1), np.nan)


def model_state_warnings(
    labels: np.ndarray,
    predictions: np.ndarray,
    scores: np.ndarray,
    flagged: np.ndarray,
    num_classes: int,
    *,
    chance_margin: float,
    min_predicted_share: float,
    memorised_agreement: float,
    memorised_flag_rate: float,
    max_unscored_share: float = 0.1,
    hidden_disagreement: float = 0.1,
    neighbor_layers: Optional[str] = None,
    cross_fitted: int = 0,
) -> List[AuditWarning]:
    """The warnings of one audit, from its rows (readable samples): given ``labels`` and
    ``predictions`` (-1: none), the label-issue ``scores`` (NaN: not scored) and ``flagged``.

    ``neighbor_layers`` and ``cross_fitted`` say how the audit looked (see
    :func:`other_model_advice`): the advice leaves out what was already done, and with
    cross-fitting the predictions are out-of-fold, so a high agreement is a model that
    generalises, not one that memorised (no memorisation warning then), and agreement
    near chance means the fold models did not learn the classes."""
    advice = other_model_advice(neighbor_layers, cross_fitted)
    labels, predictions = np.asarray(labels, dtype=np.int64), np.asarray(predictions, dtype=np.int64)
    scores, flagged = np.asarray(scores, dtype=np.float64), np.asarray(flagged, dtype=bool)
    out: List[AuditWarning] = []
    if len(labels) >= 2 and not (labels >= 0).any():
        out.append(AuditWarning(
            "no_labels", "No sample has a label.",
            "Label errors cannot be found without labels: the label-issue count of 0 is not a result. Duplicates, "
            "rare samples and the denoising numbers do not need labels.",
            "Give the labels: the dataset's second item, audit(labels=...), or a labelled layout of --data.",
            {"samples": int(len(labels))}))
        return out
    labelled = labels >= 0
    unscored = float((labelled & ~np.isfinite(scores)).sum() / max(labelled.sum(), 1))
    if labelled.sum() >= MIN_LABELLED and unscored > max_unscored_share:
        out.append(AuditWarning(
            "unscored_labels",
            f"{unscored:.1%} of the labelled samples got no label-issue score (warned above {max_unscored_share:.0%}).",
            "Their labels were not checked: the count of suspected label errors covers only the others. A sample "
            "has no score when its gradient is zero (the table's valid column is False: an input the network maps "
            "to a constant, such as a blank image or one whose units are all inactive) or when none of its "
            "neighbours has a label and a positive similarity.",
            "Look at the rows with an empty label_issue_score in table.csv: check the inputs with valid = False "
            "(blank, constant or broken images); for unlabelled neighbours, label more samples or raise --k.",
            {"unscored_share": unscored, "max_unscored_share": max_unscored_share}))
    both = labelled & (predictions >= 0)
    if both.sum() < MIN_LABELLED:
        return out
    agree = float((labels[both] == predictions[both]).mean())
    chance = chance_agreement(labels[both], num_classes)
    near_chance_below = chance + chance_margin * (1.0 - chance)
    values = {"agreement": agree, "chance": chance, "warn_at_or_below": near_chance_below,
              "chance_margin": chance_margin}
    if agree <= near_chance_below and cross_fitted >= 2:
        out.append(AuditWarning(
            "near_chance",
            f"The {cross_fitted} cross-fitted models predict the samples they never saw in agreement with the given "
            f"labels on {agree:.1%} of them: about what guessing gets ({chance:.1%}, the largest class's share or 1/C).",
            "Trained without a sample, the model cannot tell its class: it learned the training labels by heart "
            "instead of the classes (too little data for the model, too few or too many epochs, no augmentation). "
            "Its similarity then compares raw input statistics, so the label-issue flags, high or low, are no "
            "evidence about the labels, and neither are the out-of-fold predictions and agreements.",
            "Give the fold models a chance to learn the classes: augmentation (--augment), a pretrained backbone "
            "(--checkpoint with pretrained weights, then --train to fine-tune), a smaller model, more epochs or more "
            "data; check that the classes can be told apart by eye in the report's pictures.",
            values))
    elif agree <= near_chance_below:
        out.append(AuditWarning(
            "near_chance",
            f"The model's predictions agree with the given labels on {agree:.1%} of the samples: about what guessing "
            f"gets ({chance:.1%}, the largest class's share or 1/C).",
            "This model has not learned the task (random weights, a checkpoint that did not load, a head for other "
            "classes, or another class order). Its predictions, the agreements and the denoising numbers (N_eff, "
            "consistency, the predicted agreement with clean labels) say nothing about the data. Its similarity "
            "compares raw input statistics rather than what a trained network sees: the label-issue flags may still "
            "group look-alike samples, but their count, high or low, is no evidence about the labels.",
            "Pass the trained weights (--checkpoint, or load them before audit()) and check that --num-classes and "
            "the class order match the training; if the model was trained, train it on this data.",
            values))
    shares = predicted_share_per_class(labels, predictions, num_classes)
    rare = np.flatnonzero(np.nan_to_num(shares, nan=np.inf) < min_predicted_share)
    if len(rare):
        listed = ", ".join(f"{int(c)} ({shares[c]:.0%})" for c in rare[:20]) + (" ..." if len(rare) > 20 else "")
        out.append(AuditWarning(
            "class_not_predicted",
            f"The model (almost) never predicts class{'es' if len(rare) > 1 else ''} {listed}: in brackets, its "
            f"predictions of the class as a share of the samples labelled with it (warned below "
            f"{min_predicted_share:.0%}).",
            "The model has not learned these classes (an early or broken checkpoint, a class missing from its "
            "training data, another class order, or a collapsed model). Its predictions and agreements for them say "
            "nothing about their labels, and samples that truly belong to them are judged by a model that cannot "
            "recognise them: label errors into or out of these classes may go unflagged.",
            "Audit with a model trained on every class (check --num-classes and the class order of the checkpoint); "
            "for rare classes, train with more of their samples or class weights.",
            {"classes": [int(c) for c in rare], "predicted_share": [float(shares[c]) for c in rare],
             "min_predicted_share": min_predicted_share}))
    scored = both & np.isfinite(scores)
    if agree >= memorised_agreement and scored.any() and cross_fitted < 2:
        flag_rate = float(flagged[scored].mean())
        disagreeing = float((scores[scored] > 0).mean())
        values = {"agreement": agree, "flag_rate": flag_rate, "samples_with_a_disagreeing_neighbour": disagreeing,
                  "memorised_agreement": memorised_agreement, "memorised_flag_rate": memorised_flag_rate}
        if flag_rate <= memorised_flag_rate:
            out.append(AuditWarning(
                "memorised_no_flags",
                f"The model predicts {agree:.1%} of the given labels and its neighbours contradict almost none "
                f"({flag_rate:.1%} of the labels flagged; {disagreeing:.1%} of the samples have any neighbour with "
                "another label).",
                "This is how a network that memorised its training labels looks, wrong ones included: it predicts "
                "them, and a similarity built on its predicted class groups each sample with others of the same "
                "label, so a wrong label hides. A model that fits clean labels looks the same, and the audit cannot "
                "tell them apart: the count of 0 (or nearly 0) suspected label errors is no evidence that the labels "
                "are clean, and neither are the agreements or the denoising numbers. (If these samples were held "
                "out from the model's training, the labels probably are clean.)",
                advice[0].upper() + advice[1:] + "; if this audit used --output contrast (the default "
                "above 16 classes), try --output full or --output sum: outputs that do not single out the predicted "
                "class kept finding memorised errors on digits (benchmarks/results/label_issues_memorised.md).",
                values))
        else:
            out.append(AuditWarning(
                "memorised",
                f"The model predicts {agree:.1%} of the given labels, although its neighbours contradict "
                f"{flag_rate:.1%} of them.",
                "If it was trained on these labels, it has memorised them, wrong ones included. The label-issue "
                "flags still hold (they "
                "come from the neighbours, not from the predictions), but may miss errors that were memorised "
                "together with their neighbours; the predictions, the agreements and the denoising estimate (a "
                "network that memorises does not average label noise away) say nothing about label quality.",
                "Read the flags; for the rest, " + advice + ".",
                values))
    elif scored.any() and 1.0 - agree >= hidden_disagreement:
        # Below memorisation: the predictions contradict many labels, the neighbours none. The similarity is
        # shaped by the given labels more than the predictions are: a network part-way to memorising them.
        flag_rate = float(flagged[scored].mean())
        if flag_rate <= memorised_flag_rate:
            out.append(AuditWarning(
                "neighbours_mirror_labels",
                f"The model's predictions contradict {1.0 - agree:.1%} of the given labels, but the neighbours it "
                f"sees as similar contradict almost none ({flag_rate:.1%} of the labels flagged).",
                "A network trained on these labels for many epochs looks like this: it has learned part of them by "
                "heart, wrong ones included, and sees each such sample as similar to others of the same label, so a "
                "wrong label hides among neighbours that carry it too. The count of 0 (or nearly 0) suspected label "
                "errors is no evidence that the labels are clean.",
                advice[0].upper() + advice[1:] + "; meanwhile the rows of table.csv where the "
                "prediction differs from the label are the ones to look at first.",
                {"agreement": agree, "flag_rate": flag_rate, "hidden_disagreement": hidden_disagreement,
                 "memorised_flag_rate": memorised_flag_rate}))
    return out


class ModelState(Check):
    name = "model_state"
    needs = ("label_issue_score", "is_label_issue")
    thresholds = (
        ThresholdSpec(
            "chance_margin", 0.1,
            "warn ``near_chance`` when the predictions agree with the given labels at most at ``chance + "
            "chance_margin * (1 - chance)``, where chance = max(1/C, the largest class's share of the labels): "
            "0.1 is a tenth of the way from guessing to perfect agreement.",
            "warn near_chance below this share of the way from guessing to perfect agreement",
            low=0.0, high=1.0,
        ),
        ThresholdSpec(
            "min_predicted_share", 0.1,
            "warn ``class_not_predicted`` when a class with at least 5 labelled samples is predicted for fewer than "
            "this share of the samples labelled with it.",
            "warn class_not_predicted when a class is predicted for fewer than this share of its labelled samples",
            low=0.0, high=1.0,
        ),
        ThresholdSpec(
            "max_unscored_share", 0.1,
            "warn ``unscored_labels`` when more than this share of the labelled samples has no label-issue score.",
            "warn unscored_labels above this share of labelled samples without a score",
            low=0.0, high=1.0,
        ),
        ThresholdSpec(
            "memorised_agreement", 0.99,
            "warn about memorisation when the predictions agree with the given labels on at least this share.",
            "warn memorised when the predictions agree with at least this share of the given labels",
            low=0.0, high=1.0,
        ),
        ThresholdSpec(
            "hidden_disagreement", 0.1,
            "below memorisation, warn ``neighbours_mirror_labels`` when the predictions contradict at least this "
            "share of the given labels while at most ``memorised_flag_rate`` of them is flagged.",
            "warn neighbours_mirror_labels when predictions contradict this share of labels and nothing is flagged",
            low=0.0, high=1.0,
        ),
        ThresholdSpec(
            "memorised_flag_rate", 0.01,
            "with such agreement, warn ``memorised_no_flags`` (the audit could not have found label errors) when "
            "at most this share of the labels is flagged, ``memorised`` (the flags hold, the rest does not) above.",
            "memorised_no_flags when at most this share of the labels is flagged",
            low=0.0, high=1.0,
        ),
    )

    def compute(self, inputs: CheckInputs) -> Dict[str, np.ndarray]:
        t = inputs.thresholds
        found = model_state_warnings(
            inputs.labels, inputs.predictions, inputs.columns["label_issue_score"], inputs.columns["is_label_issue"],
            max(inputs.num_classes, 1), chance_margin=t.chance_margin, min_predicted_share=t.min_predicted_share,
            memorised_agreement=t.memorised_agreement, memorised_flag_rate=t.memorised_flag_rate,
            max_unscored_share=t.max_unscored_share, hidden_disagreement=t.hidden_disagreement,
            neighbor_layers=inputs.context.get("neighbor_layers"), cross_fitted=inputs.context.get("cross_fitted", 0))
        inputs.info[WARNINGS] = [w.to_dict() for w in found]
        return {}

    def summary(self, table, info, num_classes) -> Dict[str, Any]:
        return {WARNINGS: list(info.get(WARNINGS, []))}

    def headline(self, summary) -> Optional[str]:
        return None  # repr(result) names the warnings itself


CHECK = ModelState()
