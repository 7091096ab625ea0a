"""Why does the neighbour vote miss planted label errors once a network has memorised them?

Issue 20, item 1, on the cheapest case: a subset of scikit-learn's digits with planted
label flips and the demo's small CNN, in five model states (random init, 1 epoch,
normally trained, trained until every noisy label is predicted, trained 300 epochs). For each state, the
label-issue AUROC of the planted flips for:

- ``full``: neighbours by the whitened gradients of all outputs, every layer (the
  audit's default up to 16 classes);
- ``contrast``: the predicted class's contrast, every layer;
- ``full, body`` / ``contrast, body``: the same outputs, gradients of the layers before the
  classifier only (the head's gradient is ``d output / d W = (output weights) x h``, which
  ties the kernel to the predicted class);
- ``full, convs`` / ``contrast, convs``: the two convolutions only (the layers furthest
  from the labels);
- ``sum``: the gradient of the sum of all outputs (label-free, one backward pass like contrast);
- ``1 - p(label)``: the model's own probability of the given label (what cleanlab ranks by);
- ``vote + (1 - p)``: the mean of the default vote and ``1 - p(label)``.

Besides the AUROC: the flags at the default threshold (recall, precision), the share of
samples whose k neighbours all carry their label ("same-label rows": the vote cannot
disagree there), the agreement of the predictions with the given labels and the least
predicted class's share of its labelled count (what :mod:`nnsim_hooks.audit.checks.model_state`
reads).

    OMP_NUM_THREADS=1 python benchmarks/bench_label_issues_memorised.py \
        --out benchmarks/results/label_issues_memorised.md
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

import nnsim_hooks
from nnsim_hooks.audit import demo
from nnsim_hooks.audit.checks.label_issues import neighbor_label_vote
from nnsim_hooks.audit.output_choice import contrast_predicted, full_outputs, sum_outputs

K = 10
NOTES = "<!-- notes: hand-written, kept when the benchmark is rerun -->"
HEAD = "8"  # the classifier of demo.small_cnn: the last nn.Linear of the Sequential


def train_state(state: str, data, seed: int):
    """A fresh CNN in one of the model states, trained on the noisy labels."""
    model = demo.small_cnn(width=8, seed=seed)
    history = {"epochs": 0}
    if state == "early":
        history = demo.train(model, data.images, data.noisy_labels, epochs=1, lr=3e-3, seed=seed)
    elif state == "normal":
        history = demo.train(model, data.images, data.noisy_labels, epochs=25, lr=3e-3, seed=seed)
    elif state == "memorised":
        history = demo.train(model, data.images, data.noisy_labels, lr=3e-3, until_memorised=True, max_epochs=400,
                             seed=seed)
    elif state == "overfit":  # long past memorisation: the late features move towards the given labels
        history = demo.train(model, data.images, data.noisy_labels, epochs=300, lr=3e-3, weight_decay=0.0, seed=seed)
    return model.eval(), history


def vote_score(model, data, output, sketch_dim: int, layers=None):
    """The audit's label-issue score and flags with neighbours from ``output`` over ``layers``."""
    ds = torch.utils.data.TensorDataset(data.images)
    with nnsim_hooks.attach(model, output=output, sketch_dim=sketch_dim, layers=layers, seed=0) as handle:
        index = handle.build_index(ds, progress=False)
    sims, ids = index.neighbors(K)
    vote = neighbor_label_vote(ids, sims.astype(np.float64), data.noisy_labels, 10)
    same_label_rows = float(np.nanmean(np.nan_to_num(vote.score, nan=1.0) == 0.0))
    return np.nan_to_num(vote.score, nan=0.0), vote.flagged, same_label_rows


def metrics(flipped, score, flags):
    from sklearn.metrics import roc_auc_score

    auroc = roc_auc_score(flipped, score) if 0 < flipped.sum() < len(flipped) else float("nan")
    if flags is None:  # a ranking without flags of its own
        return auroc, float("nan"), float("nan"), -1
    recall = float(flags[flipped].mean()) if flipped.any() else float("nan")
    precision = float(flipped[flags].mean()) if flags.any() else float("nan")
    return auroc, recall, precision, int(flags.sum())


def run_case(noise: float, state: str, seed: int, limit: int):
    data = demo.noisy_digits(noise, seed=seed, limit=limit)
    model, history = train_state(state, data, seed)
    body = lambda name, module: not name.startswith(HEAD)  # noqa: E731 - every layer but the classifier
    convs = ["0", "2"]  # the two convolutions: the layers furthest from the labels
    probs = demo.predict_proba(model, data.images)
    pred = probs.argmax(1)
    p_label = probs[np.arange(len(pred)), data.noisy_labels]
    counts = np.bincount(data.noisy_labels, minlength=10)
    predicted = np.bincount(pred, minlength=10)
    facts = {
        "noise": noise, "state": state, "seed": seed, "epochs": history.get("epochs", 0),
        "agreement": float((pred == data.noisy_labels).mean()),
        "true_agreement": float((pred == data.true_labels).mean()),
        "least_predicted": float((predicted / np.maximum(counts, 1)).min()),
    }
    rows = []
    timings = {}
    for name, output, dim, layers in [("full", full_outputs, 204, None), ("contrast", contrast_predicted, 1024, None),
                                      ("full, body", full_outputs, 204, body),
                                      ("contrast, body", contrast_predicted, 1024, body),
                                      ("full, convs", full_outputs, 204, convs),
                                      ("contrast, convs", contrast_predicted, 1024, convs),
                                      ("sum", sum_outputs, 1024, None)]:
        started = time.time()
        score, flags, same = vote_score(model, data, output, dim, layers)
        timings[name] = time.time() - started
        rows.append({**facts, "method": name, "same_label_rows": same, "seconds": timings[name],
                     **dict(zip(("auroc", "recall", "precision", "flagged"), metrics(data.flipped, score, flags)))})
        if name == "full":
            default_score = score
    rows.append({**facts, "method": "1 - p(label)", "same_label_rows": float("nan"), "seconds": 0.0,
                 **dict(zip(("auroc", "recall", "precision", "flagged"),
                            metrics(data.flipped, 1 - p_label, None)))})
    mixed = 0.5 * default_score + 0.5 * (1 - p_label)
    rows.append({**facts, "method": "vote + (1 - p)", "same_label_rows": float("nan"), "seconds": timings["full"],
                 **dict(zip(("auroc", "recall", "precision", "flagged"), metrics(data.flipped, mixed, mixed >= 0.5)))})
    return rows


def fmt(x, digits=3):
    return "–" if x is None or x != x else f"{x:.{digits}f}"


def table(rows) -> str:
    lines = ["| noise | state | agreement (given / true) | least predicted | method | AUROC | recall | precision | "
             "flagged | same-label rows | s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['noise']:.2f} | {r['state']} ({r['epochs']} ep) | {fmt(r['agreement'], 2)} / "
            f"{fmt(r['true_agreement'], 2)} | {fmt(r['least_predicted'], 2)} | {r['method']} | {fmt(r['auroc'])} | "
            f"{fmt(r['recall'], 2)} | {fmt(r['precision'], 2)} | {r['flagged'] if r['flagged'] >= 0 else '–'} | "
            f"{fmt(r['same_label_rows'], 2)} | {r['seconds']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=600, help="digits used (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--states", default="random,early,normal,memorised,overfit")
    parser.add_argument("--noise", type=float, nargs="+", default=[0.15])
    parser.add_argument("--states-low-noise", default="normal,memorised",
                        help="states run for the noise levels after the first (default %(default)s)")
    parser.add_argument("--out", default=None, help="write the table (markdown) here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    started = time.time()
    rows = []
    for position, noise in enumerate(args.noise):
        for state in (args.states if position == 0 else args.states_low_noise).split(","):
            rows.extend(run_case(noise, state, args.seed, args.limit))
            print(table(rows[-9:]), flush=True)
    text = table(rows)
    print(text)
    if args.out:
        script = "OMP_NUM_THREADS=1 python benchmarks/bench_label_issues_memorised.py"
        command = script + " " + " ".join(argv or sys.argv[1:])
        out = Path(args.out)
        # Hand-written reading of the results, below this marker, survives a rerun.
        notes = "\n" + NOTES + out.read_text().split(NOTES, 1)[1] if out.exists() and NOTES in out.read_text() else ""
        out.write_text(
            "# Label issues on a memorising network: which neighbours still disagree?\n\n"
            f"Command: `{command}`\n\n"
            f"scikit-learn digits, {args.limit} images (8x8), the given share of labels flipped to another class, "
            "the demo's small CNN (width 8) trained on the noisy labels with Adam (lr 3e-3): random init, 1 epoch "
            "(early), 25 epochs (normal), until every noisy label is predicted (memorised), or 300 epochs without "
            "weight decay (overfit: long past memorisation). k = 10 neighbours. "
            "AUROC ranks all samples by the score; recall/precision are those of the flags at the default threshold "
            "(vote >= 0.5 and another majority; for the mix: >= 0.5). Same-label rows: share of samples whose "
            "neighbours all carry the sample's own label. Least predicted: the smallest ratio, over classes, of "
            "predictions of a class to its labelled samples.\n\n"
            f"{text}\n\nEnvironment: Python {platform.python_version()}, torch {torch.__version__}, 1 thread; total "
            f"{time.time() - started:.0f} s.\n" + notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
