"""Label-issue detection on digits with planted noise: nnsim_hooks.audit vs cleanlab.

    python benchmarks/bench_label_issues.py [--seeds 3] [--noise 0.15] [--out benchmarks/results/label_issues.md]

For each seed, 15% of scikit-learn's 1,797 digits get a wrong label (uniform over the
other classes), and a small CNN (nnsim_hooks.audit.demo.small_cnn) is trained on the
noisy labels in two regimes:

- normal: 30 epochs of Adam with weight decay (the demo's recipe; it does not fit the noise);
- memorised: no weight decay, trained until it predicts 100% of the training labels,
  noisy ones included.

Methods, each scoring every sample (AUROC against the planted flips) and flagging some
(precision, recall):

- nnsim (default: full): ``nnsim_hooks.audit(model, dataset)`` as shipped: the
  similarity-weighted vote of the k = 10 nearest neighbours' labels, neighbours by the
  whitened gradients of all 10 outputs (``output="full"``, the default up to 16 classes;
  no label is used); flags at score >= 0.5.
- nnsim, output=contrast: the same with the gradient of the predicted class's contrast
  (one backward pass instead of 10; the default above 16 classes).
- cleanlab, same model: ``cleanlab.rank.get_label_quality_scores`` (self-confidence) and
  ``cleanlab.filter.find_label_issues`` on the trained model's own predicted probabilities.
- cleanlab, 5-fold CV: the same on out-of-fold probabilities from 5 more models trained
  with the same recipe (cleanlab's recommended use; 5 extra trainings).

Prints a table and writes it, with the command and the environment, as Markdown (and
every seed's row as CSV next to it).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import nnsim_hooks  # noqa: E402
from nnsim_hooks.audit import demo  # noqa: E402


NOTES = "<!-- notes: hand-written, kept when the benchmark is rerun -->"


def train(images, labels, regime: str, seed: int):
    model = demo.small_cnn(seed=seed)
    if regime == "normal":
        history = demo.train(model, images, labels, epochs=demo.DEFAULT_EPOCHS, seed=seed)
    else:
        history = demo.train(model, images, labels, lr=3e-3, until_memorised=True, max_epochs=400, seed=seed)
    return model.eval(), history


def cross_validated_probabilities(images, labels, regime: str, seed: int, folds: int = 5):
    from sklearn.model_selection import StratifiedKFold

    probs = np.zeros((len(labels), 10))
    for k, (tr, te) in enumerate(StratifiedKFold(folds, shuffle=True, random_state=seed).split(labels, labels)):
        model, _ = train(images[tr], labels[tr], regime, seed * 100 + k)
        probs[te] = demo.predict_proba(model, images[te])
    return probs


def metrics(flipped, score, flags):
    from sklearn.metrics import roc_auc_score

    score = np.nan_to_num(np.asarray(score, dtype=np.float64), nan=0.0)
    flags = np.asarray(flags, dtype=bool)
    return {
        "auroc": roc_auc_score(flipped, score),
        "precision": float(flipped[flags].mean()) if flags.any() else float("nan"),
        "recall": float(flags[flipped].mean()),
        "flagged": int(flags.sum()),
    }


def cleanlab_metrics(flipped, labels, probs):
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    quality = get_label_quality_scores(labels, probs)  # higher = cleaner
    return metrics(flipped, -quality, find_label_issues(labels, probs))


def summary_lines(df) -> str:
    """The per-regime facts written above the table."""
    lines = []
    for regime in df["regime"].unique():
        sub = df[df["regime"] == regime].drop_duplicates("seed")
        lines.append(f"- {regime}: train accuracy on the noisy labels {sub['train_accuracy'].mean():.3f}, "
                     f"agreement with the true labels {sub['true_agreement'].mean():.3f}")
    return "\n".join(lines)


def run_seed(seed: int, noise: float, regimes, log):
    data = demo.noisy_digits(noise, seed=seed)
    labels, flipped = data.noisy_labels, data.flipped
    rows = []
    for regime in regimes:
        t0 = time.time()
        model, history = train(data.images, labels, regime, seed)
        t_train = time.time() - t0
        preds = demo.predict_proba(model, data.images).argmax(1)
        log(f"seed {seed} {regime}: {history['epochs']} epochs, train acc {history['train_accuracy']:.3f}, "
            f"true-label agreement {np.mean(preds == data.true_labels):.3f} ({t_train:.0f} s)")
        base = {"seed": seed, "regime": regime, "train_accuracy": history["train_accuracy"],
                "true_agreement": float(np.mean(preds == data.true_labels))}
        for name, output in (("nnsim (default: full)", None), ("nnsim, output=contrast", "contrast")):
            t0 = time.time()
            result = nnsim_hooks.audit(model, data.dataset(), output=output, progress=False)
            t = result.table
            rows.append({**base, "method": name, "seconds": time.time() - t0,
                         **metrics(flipped, t["label_issue_score"], t["is_label_issue"])})
        t0 = time.time()
        probs = demo.predict_proba(model, data.images)
        rows.append({**base, "method": "cleanlab, same model", "seconds": time.time() - t0,
                     **cleanlab_metrics(flipped, labels, probs)})
        t0 = time.time()
        cv = cross_validated_probabilities(data.images, labels, regime, seed)
        rows.append({**base, "method": "cleanlab, 5-fold CV", "seconds": time.time() - t0 + t_train,
                     **cleanlab_metrics(flipped, labels, cv)})
        for r in rows[-4:]:
            log(f"  {r['method']:22s} AUROC {r['auroc']:.4f}  precision {r['precision']:.3f}  "
                f"recall {r['recall']:.3f}  ({r['seconds']:.0f} s)")
    return rows


def table(rows) -> str:
    import pandas as pd

    df = pd.DataFrame(rows)
    lines = ["| regime | method | AUROC | precision | recall | flagged | seconds |", "|---|---|---|---|---|---|---|"]
    order = ["nnsim (default: full)", "nnsim, output=contrast", "cleanlab, same model", "cleanlab, 5-fold CV"]
    for regime in df["regime"].unique():
        for method in order:
            sub = df[(df["regime"] == regime) & (df["method"] == method)]
            if sub.empty:
                continue

            def ms(col, digits=3):
                v = sub[col].to_numpy(dtype=float)
                v = v[np.isfinite(v)]
                if len(v) == 0:
                    return "– (no flag)"
                return f"{v.mean():.{digits}f} ± {v.std():.{digits}f}" if len(v) > 1 else f"{v[0]:.{digits}f}"

            lines.append(f"| {regime} | {method} | {ms('auroc', 4)} | {ms('precision')} | {ms('recall')} | "
                         f"{sub['flagged'].mean():.0f} | {sub['seconds'].mean():.0f} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--noise", type=float, default=0.15)
    parser.add_argument("--regimes", default="normal,memorised")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "label_issues.md"))
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    started = time.time()
    rows = []
    for seed in range(args.seeds):
        rows += run_seed(seed, args.noise, args.regimes.split(","), lambda m: print(m, flush=True))
    md = table(rows)
    import cleanlab
    import pandas as pd

    Path(args.out).with_suffix(".csv").parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(Path(args.out).with_suffix(".csv"), index=False)  # every seed, for re-reading
    import sklearn

    text = f"""# Label issues: nnsim_hooks.audit vs cleanlab

Command: `python benchmarks/bench_label_issues.py --seeds {args.seeds} --noise {args.noise}`

scikit-learn digits (1,797 images, 8x8), {args.noise:.0%} of the labels flipped to a uniformly drawn other class,
a small CNN (about 38,000 parameters) trained on the noisy labels. Mean ± std over {args.seeds} seeds (noise,
initialisation and folds change with the seed). AUROC ranks all samples by each method's score; precision
and recall are those of each method's own flags (nnsim: `is_label_issue`, score >= 0.5; cleanlab:
`find_label_issues`). "seconds" is the method's own time after training; for 5-fold CV it includes the 5 extra
trainings and the first one.

{summary_lines(pd.DataFrame(rows))}

{md}

Environment: Python {platform.python_version()}, torch {torch.__version__}, cleanlab {cleanlab.__version__},
scikit-learn {sklearn.__version__}, {platform.machine()} CPU, {torch.get_num_threads()} threads; total
{time.time() - started:.0f} s.
"""
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Hand-written reading of the results, below this marker, survives a rerun.
    if out.exists() and NOTES in out.read_text():
        text += "\n" + NOTES + out.read_text().split(NOTES, 1)[1]
    out.write_text(text)
    print(md)
    print(f"written to {out}")


if __name__ == "__main__":
    main()
