"""Planted label errors, four data sets x three model states: nnsim_hooks.audit vs cleanlab.

    python benchmarks/bench_label_issues.py [--datasets digits,shapes,textures,volumes] [--seeds 1]
        [--cv-folds 5] [--out benchmarks/results/label_issues.md]

Data sets (each with planted wrong labels, uniform over the other classes):

- digits: scikit-learn's 8x8 digits (1,797; 15% flipped), the demo's small CNN;
- shapes: 305 generated 64x64 colour images of circles, squares and triangles on noisy
  backgrounds (30 flipped, 5 exact duplicates; :func:`nnsim_hooks.integrations.synthetic.make_shapes`),
  timm ``resnet18`` (random init, 11 M parameters) at 64 px: the case of issue 20;
- textures: a CIFAR-like generated set, 600 32x32 colour images of four texture classes
  (horizontal and vertical stripes, checkerboards, rings; random frequency, phase,
  colours and noise; 15% flipped), timm ``resnet10t``;
- volumes: 3-D, 180 16^3 volumes with a blob whose position gives the class (three
  classes; 15% flipped), MONAI's DenseNet121 (3-D, reduced width).

Model states, all on one training run per seed on the *noisy* labels (Adam, no weight
decay, until every given label is predicted):

- random: the initial weights;
- early: after the first epochs (listed in the table);
- memorised: the first epoch with 100% training accuracy on the given labels (or the
  last epoch, with its accuracy in the table).

Methods, each scoring every sample (AUROC against the planted flips) and flagging some:

- nnsim, given model: ``nnsim_hooks.audit(model, dataset)`` as shipped (the neighbour
  vote; neighbours by the whitened gradients of all outputs, no label used);
- nnsim, given model, first half of layers: the same with ``neighbor_layers="first_half"``
  (``--neighbor-layers first-half``): neighbours from the gradients of the first half of the
  modules that hold parameters, which memorise less (:mod:`nnsim_hooks.audit.neighbor_layers`);
- cleanlab, given model: ``cleanlab.rank.get_label_quality_scores`` and
  ``cleanlab.filter.find_label_issues`` on the model's predicted probabilities;
- nnsim, cross-fitted (``audit(train={"folds": 2})``, ``nnsim audit --train``): two models
  trained with the same memorising recipe, each on half the data; every sample's
  neighbours from the model that never saw it (:mod:`nnsim_hooks.audit.cross_fit`). It
  retrains, so it does not depend on the given model's state (one row per data set);
- cleanlab, 2-fold CV: cleanlab on the out-of-fold probabilities of the same two models;
- cleanlab, K-fold CV (``--cv-folds K``, default 5; 0 skips it): cleanlab's recommended use,
  K more trainings with the same recipe;
- nnsim, shipped recipe (``--recipe-datasets``, ``--recipe-folds K``, default 5): what
  ``nnsim audit --train E --folds K --augment A`` does, the fold models trained by :func:`nnsim_hooks.audit.fitting.fit_classifier`
  (AdamW, lr 1e-3 with a cosine decay, weight decay 1e-4, batches of 64 or N/16, E epochs, the data set's label-keeping
  transforms A: flip, shift and channels for shapes and textures, shift for digits, none for
  volumes, whose class is a position), then the cross-fitted vote; and cleanlab on the same
  out-of-fold probabilities. (The model on all the data that ``--train`` also fits changes
  neither number and is not trained here.)

Writes the table, with the command and the environment, as Markdown (and every row as CSV
beside it).
"""

from __future__ import annotations

import argparse
import copy
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import nnsim_hooks  # noqa: E402
from nnsim_hooks.audit import demo  # noqa: E402
from nnsim_hooks.audit.checks.label_issues import neighbor_label_vote  # noqa: E402
from nnsim_hooks.audit.cross_fit import cross_fitted_neighbors  # noqa: E402
from nnsim_hooks.audit.fitting import TrainedModels, TrainingRecipe, fold_of_rows  # noqa: E402
from nnsim_hooks.audit.output_choice import full_outputs  # noqa: E402
from nnsim_hooks.audit.samples import AuditView  # noqa: E402

NOTES = "<!-- notes: hand-written, kept when the benchmark is rerun -->"


@dataclass
class Case:
    name: str
    inputs: torch.Tensor  # [N, ...] float
    labels: np.ndarray  # given (noisy)
    flipped: np.ndarray
    make_model: Callable[[int], torch.nn.Module]
    lr: float
    batch_size: int
    early_epochs: int
    max_epochs: int
    description: str
    recipe_epochs: int = 40  # the shipped recipe's row: --train E --folds 5 --augment <augment>
    augment: str = "none"


def flip_labels(true: np.ndarray, share: float, classes: int, rng) -> np.ndarray:
    given = true.copy()
    flip = rng.choice(len(true), int(round(share * len(true))), replace=False)
    given[flip] = (true[flip] + rng.integers(1, classes, len(flip))) % classes
    return given


def digits_case(seed: int) -> Case:
    data = demo.noisy_digits(0.15, seed=seed)
    return Case("digits", data.images, np.asarray(data.noisy_labels), np.asarray(data.flipped),
                lambda s: demo.small_cnn(seed=s), 3e-3, 64, 1, 300, "1,797 8x8, small CNN (38 k parameters)",
                augment="shift")


def shapes_case(seed: int) -> Case:
    from nnsim_hooks.integrations.synthetic import make_shapes

    shapes = make_shapes(seed=seed)
    x = torch.tensor(shapes["images"], dtype=torch.float32).permute(0, 3, 1, 2) / 255.0

    def model(s):
        import timm

        torch.manual_seed(s)
        return timm.create_model("resnet18", pretrained=False, num_classes=3)

    return Case("shapes", x, shapes["labels"], shapes["flipped"], model, 1e-3, 16, 2, 40,
                "305 64x64 colour, timm resnet18 (11 M parameters)", recipe_epochs=80, augment="flip,shift,channels")


def textures_case(seed: int) -> Case:
    rng = np.random.default_rng(seed)
    n, size, classes = 600, 32, 4
    yy, xx = np.mgrid[:size, :size].astype(np.float64)
    true = np.arange(n) % classes
    images = np.zeros((n, 3, size, size), np.float32)
    for i, c in enumerate(true):
        f, phase = rng.uniform(0.25, 0.8), rng.uniform(0, 2 * np.pi)
        cy, cx = rng.uniform(8, 24, 2)
        wave = {0: np.sin(f * yy + phase), 1: np.sin(f * xx + phase),
                2: np.sign(np.sin(f * yy + phase) * np.sin(f * xx + phase)),
                3: np.sin(f * np.hypot(yy - cy, xx - cx) + phase)}[int(c)]
        a, b = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
        img = a[:, None, None] + (b - a)[:, None, None] * (wave[None] + 1) / 2 + rng.normal(0, 0.15, (3, size, size))
        images[i] = np.clip(img, 0, 1)
    given = flip_labels(true, 0.15, classes, rng)

    def model(s):
        import timm

        torch.manual_seed(s)
        return timm.create_model("resnet10t", pretrained=False, num_classes=classes)

    return Case("textures", torch.tensor(images), given, given != true, model, 1e-3, 32, 1, 60,
                "600 32x32 colour (CIFAR-like), timm resnet10t (4.9 M parameters)", augment="flip,shift,channels")


def volumes_case(seed: int) -> Case:
    from nnsim_hooks.integrations.synthetic import _blob_volume

    rng = np.random.default_rng(seed)
    n, shape, classes = 180, (16, 16, 16), 3
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).astype(np.float64)
    true = np.arange(n) % classes
    vols = np.stack([_blob_volume(rng, grid, shape, int(c), classes)[0] for c in true])[:, None]
    vols = (vols + rng.normal(0, 40, vols.shape)) / 100.0  # a faint blob: the class is not obvious at random init
    given = flip_labels(true, 0.15, classes, rng)

    def model(s):
        from monai.networks.nets import DenseNet121

        torch.manual_seed(s)
        return DenseNet121(spatial_dims=3, in_channels=1, out_channels=classes, init_features=16, growth_rate=8,
                           block_config=(2, 2))

    return Case("volumes", torch.tensor(vols, dtype=torch.float32), given, given != true, model, 1e-3, 16, 1, 60,
                "180 16^3 volumes, MONAI DenseNet121 3-D (reduced width)")


CASES = {"digits": digits_case, "shapes": shapes_case, "textures": textures_case, "volumes": volumes_case}
DESCRIPTIONS = {
    "digits": "1,797 8x8, small CNN (38 k parameters), 15% flipped",
    "shapes": "305 64x64 colour, timm resnet18 (11 M parameters), 30 flipped, 5 exact duplicates",
    "textures": "600 32x32 colour (CIFAR-like), timm resnet10t (4.9 M parameters), 15% flipped",
    "volumes": "180 16^3 noisy volumes with a faint blob whose position is the class, MONAI DenseNet121 3-D (reduced width), 15% flipped",
}


def accuracy(model, x, y, batch=256) -> float:
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(x[s:s + batch]).argmax(1) for s in range(0, len(x), batch)]).numpy()
    return float((pred == y).mean())


def probabilities(model, x, batch=256) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        return torch.cat([F.softmax(model(x[s:s + batch]), 1) for s in range(0, len(x), batch)]).double().numpy()


def train_until_memorised(case: Case, rows: np.ndarray, seed: int, keep: Dict[int, str] = None, log=print):
    """Adam (no weight decay) on the given labels of ``rows`` until all are predicted;
    returns the model and {state name: (state_dict, epochs, train accuracy)}."""
    model = case.make_model(seed)
    states = {}
    if keep is not None:
        states["random"] = (copy.deepcopy(model.state_dict()), 0, accuracy(model, case.inputs[rows], case.labels[rows]))
    opt = torch.optim.Adam(model.parameters(), lr=case.lr)
    g = torch.Generator().manual_seed(seed)
    x, y = case.inputs[rows], torch.as_tensor(case.labels[rows])
    acc = 0.0
    for epoch in range(1, case.max_epochs + 1):
        model.train()
        for batch in torch.randperm(len(rows), generator=g).split(case.batch_size):
            if len(batch) < 2:
                continue
            loss = F.cross_entropy(model(x[batch]), y[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
        acc = accuracy(model, x, y.numpy())
        if keep is not None and epoch == case.early_epochs:
            states["early"] = (copy.deepcopy(model.state_dict()), epoch, acc)
        if acc >= 1.0:
            break
    log(f"  {case.name}: trained {epoch} epochs on {len(rows)} samples, train accuracy {acc:.3f}")
    if keep is not None:
        states["memorised"] = (copy.deepcopy(model.state_dict()), epoch, acc)
    return model.eval(), states


def metrics(flipped, score, flags) -> Dict:
    from sklearn.metrics import roc_auc_score

    score = np.nan_to_num(np.asarray(score, dtype=np.float64), nan=0.0)
    flags = np.asarray(flags, dtype=bool)
    return {"auroc": roc_auc_score(flipped, score),
            "precision": float(flipped[flags].mean()) if flags.any() else float("nan"),
            "recall": float(flags[flipped].mean()), "flagged": int(flags.sum())}


def cleanlab_metrics(flipped, labels, probs) -> Dict:
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    return metrics(flipped, -get_label_quality_scores(labels, probs), find_label_issues(labels, probs))


def cross_fitted_vote(case: Case, view, fold: np.ndarray, fold_models, recipe):
    """Every sample's neighbours (the audit's label-free output and sketch) and probabilities
    through the fold model blind to it, and the neighbour vote on them."""
    from nnsim_hooks.audit.output_choice import default_sketch_dim

    trained = TrainedModels(model=fold_models[0], recipe=recipe, fold=fold, fold_models=fold_models)
    classes = int(case.labels.max()) + 1
    crossed = cross_fitted_neighbors(trained, view, 10, output=full_outputs,
                                     sketch_dim=default_sketch_dim("full", classes), seed=0, batch_size=case.batch_size)
    return crossed, neighbor_label_vote(crossed.ids, crossed.sims, case.labels, classes)


def shipped_recipe_rows(case: Case, seed: int, log, folds: int = 5) -> List[Dict]:
    """``nnsim audit --train E --folds 5 --augment A``'s fold models and cross-fitted vote,
    and cleanlab on their out-of-fold probabilities."""
    from nnsim_hooks.audit.fitting import fit_classifier

    t0 = time.time()
    dataset = torch.utils.data.TensorDataset(case.inputs, torch.as_tensor(case.labels))
    view = AuditView(dataset)
    recipe = TrainingRecipe(epochs=case.recipe_epochs, folds=folds, augment=case.augment, seed=seed)
    fold = fold_of_rows(case.labels, folds, recipe.seed)
    fold_models = []
    for f in range(folds):
        model = case.make_model(seed)  # every fold model starts from the same weights, as --train does
        fit_classifier(model, view, np.flatnonzero(fold != f), recipe, seed=recipe.seed + 1 + f)
        fold_models.append(model)
    crossed, vote = cross_fitted_vote(case, view, fold, fold_models, recipe)
    held_out = float((crossed.predictions == case.labels)[~case.flipped].mean())
    log(f"  {case.name}: shipped recipe, {folds} fold models, accuracy on the clean samples they never saw "
        f"{held_out:.3f}")
    name = f"--train {case.recipe_epochs} --folds {folds} --augment {recipe.augment}"
    base = {"dataset": case.name, "seed": seed, "state": "recipe", "epochs": case.recipe_epochs,
            "train_accuracy": float("nan"), "held_out_accuracy": held_out, "warnings": "",
            "seconds": time.time() - t0}
    return [{**base, "method": f"nnsim, shipped recipe ({name})", **metrics(case.flipped, vote.score, vote.flagged)},
            {**base, "method": f"cleanlab, same {folds} models", **cleanlab_metrics(case.flipped, case.labels,
                                                                                crossed.probabilities)}]


def run_case(case: Case, seed: int, cv_folds: int, log) -> List[Dict]:
    n = len(case.labels)
    dataset = torch.utils.data.TensorDataset(case.inputs, torch.as_tensor(case.labels))
    rows = []
    t0 = time.time()
    model, states = train_until_memorised(case, np.arange(n), seed, keep={}, log=log)
    t_train = time.time() - t0
    for state, (weights, epochs, train_acc) in states.items():
        model.load_state_dict(weights)
        base = {"dataset": case.name, "seed": seed, "state": state, "epochs": epochs, "train_accuracy": train_acc}
        for method, layers in (("nnsim, given model", None), ("nnsim, given model, first half of layers", "first_half")):
            t0 = time.time()
            result = nnsim_hooks.audit(model, dataset, progress=False, batch_size=case.batch_size,
                                       neighbor_layers=layers)
            table = result.table
            warned = ",".join(w["code"] for w in result.summary.get("warnings", []))
            rows.append({**base, "method": method, "seconds": time.time() - t0, "warnings": warned,
                         **metrics(case.flipped, table["label_issue_score"], table["is_label_issue"])})
        rows.append({**base, "method": "cleanlab, given model", "seconds": 0.0, "warnings": "",
                     **cleanlab_metrics(case.flipped, case.labels, probabilities(model, case.inputs))})
        for r in rows[-3:]:
            log(f"  {case.name} {state:9s} {r['method']:22s} AUROC {r['auroc']:.3f} recall {r['recall']:.2f} "
                f"flagged {r['flagged']} {r['warnings']} ({r['seconds']:.0f} s)")

    # Cross-fitted: two models with the same memorising recipe, each blind to one half.
    t0 = time.time()
    fold = fold_of_rows(case.labels, 2, seed)
    fold_models = [train_until_memorised(case, np.flatnonzero(fold != f), seed * 100 + f, log=log)[0] for f in (0, 1)]
    crossed, vote = cross_fitted_vote(case, AuditView(dataset), fold, fold_models,
                                      TrainingRecipe(epochs=case.max_epochs, folds=2))
    classes = int(case.labels.max()) + 1
    base = {"dataset": case.name, "seed": seed, "state": "retrained", "epochs": case.max_epochs,
            "train_accuracy": float("nan"), "warnings": ""}
    rows.append({**base, "method": "nnsim, cross-fitted (2 folds)", "seconds": time.time() - t0,
                 **metrics(case.flipped, vote.score, vote.flagged)})
    rows.append({**base, "method": "cleanlab, 2-fold CV (same models)", "seconds": time.time() - t0,
                 **cleanlab_metrics(case.flipped, case.labels, crossed.probabilities)})
    if cv_folds >= 2:
        from sklearn.model_selection import StratifiedKFold

        t0 = time.time()
        probs = np.zeros((n, classes))
        split = StratifiedKFold(cv_folds, shuffle=True, random_state=seed).split(case.labels, case.labels)
        for k, (train_rows, test_rows) in enumerate(split):
            m, _ = train_until_memorised(case, train_rows, seed * 1000 + k, log=log)
            probs[test_rows] = probabilities(m, case.inputs[test_rows])
        rows.append({**base, "method": f"cleanlab, {cv_folds}-fold CV", "seconds": time.time() - t0,
                     **cleanlab_metrics(case.flipped, case.labels, probs)})
    for r in rows[-3 if cv_folds >= 2 else -2:]:
        log(f"  {case.name} retrained {r['method']:32s} AUROC {r['auroc']:.3f} recall {r['recall']:.2f} "
            f"flagged {r['flagged']} ({r['seconds']:.0f} s)")
    log(f"  {case.name}: the training run took {t_train:.0f} s")
    return rows


def table(df) -> str:
    lines = ["| data set | state (epochs, train acc.) | method | AUROC | precision | recall | flagged | warnings |",
             "|---|---|---|---|---|---|---|---|"]

    def f(v, digits=2):
        return "–" if not np.isfinite(v) else f"{v:.{digits}f}"

    for (ds, state, method), sub in df.groupby(["dataset", "state", "method"], sort=False):
        ep, acc = sub["epochs"].iloc[0], sub["train_accuracy"].mean()
        if state == "recipe":
            held = sub["held_out_accuracy"].mean()
            where = f"retrained, shipped recipe ({ep} epochs; clean held-out acc. {f(held)})"
        elif state == "retrained":
            where = f"retrained ({ep} epochs at most)"
        else:
            where = f"{state} ({ep}, {f(acc)})"
        auroc = sub["auroc"].to_numpy(dtype=float)
        a = f"{auroc.mean():.3f}" + (f" ± {auroc.std():.3f}" if len(auroc) > 1 else "")
        lines.append(f"| {ds} | {where} | {method} | {a} | {f(sub['precision'].mean())} | {f(sub['recall'].mean())} "
                     f"| {sub['flagged'].mean():.0f} | {sub['warnings'].iloc[0] or ''} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", default="digits,shapes,textures,volumes")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--cv-folds", type=int, default=5)
    parser.add_argument("--cv-datasets", default="digits,textures",
                        help="data sets that get the K-fold CV row (K more trainings each)")
    parser.add_argument("--recipe-datasets", default="",
                        help="data sets that get the shipped-recipe rows (--train E --folds 5 --augment A: five more "
                        "trainings each)")
    parser.add_argument("--recipe-folds", default="5", help="the shipped recipe's --folds, comma-separated (default 5)")
    parser.add_argument("--recipe-only", action="store_true",
                        help="only the shipped-recipe rows (add them to an earlier run's CSV with --combine)")
    parser.add_argument("--max-epochs", type=int, default=None, help="cap every training (smoke runs)")
    parser.add_argument("--combine", nargs="+", default=None, metavar="ROWS.csv",
                        help="write the table from the CSV rows of earlier runs (run the data sets in parallel)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "label_issues.md"))
    args = parser.parse_args(argv)
    import pandas as pd

    started = time.time()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows, descriptions = [], {}
    if args.combine:
        rows = [r for path in args.combine for r in pd.read_csv(path, dtype={"warnings": str}).fillna({"warnings": ""}).to_dict("records")]
        descriptions = {name: DESCRIPTIONS[name] for name in dict.fromkeys(r["dataset"] for r in rows)}
    for name in [] if args.combine else args.datasets.split(","):
        for seed in range(args.seeds):
            case = CASES[name](seed)
            if args.max_epochs is not None:
                case.max_epochs = min(case.max_epochs, args.max_epochs)
                case.early_epochs = min(case.early_epochs, case.max_epochs)
                case.recipe_epochs = min(case.recipe_epochs, args.max_epochs)
            descriptions[name] = DESCRIPTIONS[name]
            print(f"{name}, seed {seed}: {len(case.labels)} samples, {int(case.flipped.sum())} flipped", flush=True)
            log = lambda m: print(m, flush=True)  # noqa: E731
            if not args.recipe_only:
                rows += run_case(case, seed, args.cv_folds if name in args.cv_datasets.split(",") else 0, log)
            for folds in [int(f) for f in args.recipe_folds.split(",")] if name in args.recipe_datasets.split(",") else []:
                rows += shipped_recipe_rows(case, seed, log, folds=folds)
                for r in rows[-2:]:
                    log(f"  {case.name} {r['method']:60s} AUROC {r['auroc']:.3f} recall {r['recall']:.2f} "
                        f"flagged {r['flagged']} ({r['seconds']:.0f} s)")
            pd.DataFrame(rows).to_csv(out.with_suffix(".csv"), index=False)  # what ran so far survives a kill
    df = pd.DataFrame(rows)
    order = {name: i for i, name in enumerate(dict.fromkeys(df["dataset"]))}  # combined runs: each data set together
    df = df.iloc[np.argsort(df["dataset"].map(order).to_numpy(), kind="stable")]
    import cleanlab

    command = "python benchmarks/bench_label_issues.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = f"""# Planted label errors: four data sets x three model states, nnsim_hooks.audit vs cleanlab

Command: `{command.strip()}`

{chr(10).join(f"- {k}: {v}" for k, v in descriptions.items())}

AUROC ranks every sample by each method's score against the planted flips; precision and recall are those of
each method's own flags (nnsim: `is_label_issue`; cleanlab: `find_label_issues`). "warnings": the audit's
model-state warnings (summary.json). States: see the script's docstring. Seeds: {args.seeds}.

{table(df)}

Environment: Python {platform.python_version()}, torch {torch.__version__}, cleanlab {cleanlab.__version__},
{platform.machine()} CPU, {torch.get_num_threads()} threads; total {time.time() - started:.0f} s.
"""
    if out.exists() and NOTES in out.read_text():
        text += "\n" + NOTES + out.read_text().split(NOTES, 1)[1]
    out.write_text(text)
    print(table(df))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
