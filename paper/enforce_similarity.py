"""PAPER section 4: does a similarity term on same-class pairs speed up early training?

The authors' setting (Lydorn/netsimilarity, ``projects/nabla_sim_mnist``), the default here:
real MNIST (:mod:`paper.mnist_data`, normalised with mean 0.1307 and std 0.3081 as theirs),
their InnerConvNet (Conv 1→32 5×5, PReLU, AvgPool, Conv 32→64 5×5, PReLU, AvgPool, FC
1024→256, PReLU, FC 256→10), a minibatch = one pair of same-class training images, the loss
``1/2 [NLL(x_A) + NLL(x_B)] + term``, Adam at its default lr (1e-3), and 1,000 test images
scored along the way. k is the cosine between the gradients of ``log p_c - mean_{c' != c}
log p_c'`` (c the label) over all parameters, in train() mode, from the repository's own
:meth:`Handle.pair_similarity`. The arms, named by what they add to the loss:

- ``none``: nothing;
- ``one_minus_k``: ``lam (1 - k)``, the paper's text (it pulls the two gradients together);
- ``plus_k``: ``lam k``, what the released code adds (``DoubleNablaSimLoss`` returns
  ``weight * cosine``, added to the loss): it pushes the two gradients apart;
- ``normalised_distance``: ``lam |g_A - g_B|^2 / (|g_A| |g_B|)``, the alternative the paper
  discusses (and its code carries as a comment) without running it; it needs the norms, so
  it comes from a per-pair double back-propagation (:func:`flat_gradients`).

Each seed draws one initialisation, one sequence of pairs and one set of test images, and
every arm trains from them: the comparison is paired. The paper reports (60 runs) 26% → 35%
at 20 minibatches, 47% → 55% at 40, the curves meeting near 77% by 120-150 minibatches.

``--data digits`` runs the earlier stand-in: scikit-learn's digits (no download), the
digits CNN of the embedded demo, 4 same-class pairs per minibatch with the term on one.

    OMP_NUM_THREADS=1 python -m paper.enforce_similarity --workers 2   # the full run
    python -m paper.enforce_similarity --small --out /tmp/x            # CI-sized
"""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import nnsim_hooks
from nnsim_hooks.engine.outputs import contrast
from nnsim_hooks.training import same_class_pairs

from .common import parser, table, write_report

ARMS = ("none", "one_minus_k", "plus_k", "normalised_distance")
FORMULA = {
    "none": "no term",
    "one_minus_k": "λ(1 − k), the paper's text",
    "plus_k": "+λk, the released code",
    "normalised_distance": "λ‖g_A − g_B‖²/(‖g_A‖‖g_B‖)",
}
#: The paper's MNIST numbers (validation accuracy, %), without → with its term, read from its text.
PAPER = {20: "26 → 35", 40: "47 → 55", 150: "meet near 77"}
HEADLINE = (20, 40, 150)
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


class InnerConvNet(nn.Module):
    """The authors' MNIST network; returns logits."""

    def __init__(self, n_classes: int = 10):
        super().__init__()
        self.convnet = nn.Sequential(
            nn.Conv2d(1, 32, 5), nn.PReLU(), nn.AvgPool2d(2, stride=2),
            nn.Conv2d(32, 64, 5), nn.PReLU(), nn.AvgPool2d(2, stride=2))
        self.fc = nn.Sequential(nn.Linear(64 * 4 * 4, 256), nn.PReLU(), nn.Linear(256, n_classes))

    def forward(self, x):
        return self.fc(self.convnet(x).flatten(1))


# -- data -------------------------------------------------------------------------------


def load_data(name: str, n_test: int):
    """(train images, labels, test pool images, labels, a line on the source)."""
    if name == "mnist":
        from .mnist_data import load_mnist

        (tx, ty, vx, vy), source = load_mnist()

        def prep(x):
            return ((torch.from_numpy(x).float() / 255 - MNIST_MEAN) / MNIST_STD).unsqueeze(1)

        return prep(tx), torch.from_numpy(ty.astype(np.int64)), prep(vx), torch.from_numpy(vy.astype(np.int64)), source
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)
    labels = torch.from_numpy(digits.target.astype(np.int64))
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    val, train = order[:n_test], order[n_test:]
    return images[train], labels[train], images[val], labels[val], "scikit-learn digits"


def make_model(data: str, seed: int) -> nn.Module:
    if data == "mnist":
        torch.manual_seed(seed)
        return InnerConvNet()
    from nnsim_hooks.audit.demo import small_cnn

    return small_cnn(seed=seed)


# -- the terms ----------------------------------------------------------------------------


def flat_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample gradients ``[B, n_params]`` of the contrast scalar, with the graph kept."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(len(x)):
        s = contrast(model(x[i:i + 1]), y[i:i + 1]).sum()
        rows.append(torch.cat([g.flatten() for g in torch.autograd.grad(s, params, create_graph=True)]))
    return torch.stack(rows)


def term(arm: str, lam: float, handle, model, xa, xb, y) -> torch.Tensor:
    """The arm's addition to the loss for the pairs ``(xa[i], xb[i])`` of label ``y[i]``, averaged."""
    if arm in ("one_minus_k", "plus_k"):
        k = handle.pair_similarity(xa, xb, targets_a=y, targets_b=y)
        return lam * ((1 - k) if arm == "one_minus_k" else k).mean()
    if arm == "normalised_distance":
        ga, gb = flat_gradients(model, xa, y), flat_gradients(model, xb, y)
        return lam * ((ga - gb).pow(2).sum(1) / (ga.norm(dim=1) * gb.norm(dim=1))).mean()
    raise ValueError(f"unknown arm {arm!r}; the arms are {ARMS[1:]}")


# -- one seed -----------------------------------------------------------------------------


def accuracy(model, images, labels, batch: int = 250) -> float:
    model.eval()
    with torch.no_grad():
        right = sum(int((model(images[i:i + batch]).argmax(1) == labels[i:i + batch]).sum())
                    for i in range(0, len(labels), batch))
    model.train()
    return right / len(labels)


def draws(seed: int, data, steps: int, pairs: int, n_test: int):
    """What every arm of one seed shares: the pairs ``[steps, pairs]`` x 2 and the test images."""
    x_train, y_train, x_pool, y_pool = data[:4]
    generator = torch.Generator().manual_seed(10_000 + seed)
    first, second = (t.reshape(steps, pairs) for t in same_class_pairs(y_train, steps * pairs, generator))
    test = torch.randperm(len(y_pool), generator=torch.Generator().manual_seed(20_000 + seed))[:n_test]
    return first, second, x_pool[test], y_pool[test]


def train_arm(arm: str, initial: Dict[str, torch.Tensor], settings: dict, data, shared) -> List[float]:
    """Test accuracy after every ``every`` minibatches (from the first ``every``) of one arm."""
    x_train, y_train = data[0], data[1]
    first, second, x_test, y_test = shared
    model = make_model(settings["data"], 0)
    model.load_state_dict(initial)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=settings["lr"])
    curve = []
    with nnsim_hooks.attach(model, output="contrast") as h:
        for step in range(settings["steps"]):
            i, j = first[step], second[step]
            xa, xb, y = x_train[i], x_train[j], y_train[i]
            loss = 0.5 * (F.cross_entropy(model(xa), y) + F.cross_entropy(model(xb), y))
            if arm != "none":
                t = slice(0, settings["term_pairs"])
                loss = loss + term(arm, settings["lam"], h, model, xa[t], xb[t], y[t])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if (step + 1) % settings["every"] == 0:
                curve.append(accuracy(model, x_test, y_test))
    return curve


def run_seed(seed: int, settings: dict, data) -> dict:
    """Every arm from one initialisation, one sequence of pairs and one set of test images."""
    torch.set_num_threads(1)
    model = make_model(settings["data"], seed)
    initial = copy.deepcopy(model.state_dict())
    shared = draws(seed, data, settings["steps"], settings["pairs"], settings["test"])
    start = accuracy(model, shared[2], shared[3])
    out = {"seed": seed, "curves": {}}
    for arm in settings["arms"]:
        out["curves"][arm] = [start] + train_arm(arm, initial, settings, data, shared)
    return out


_DATA = None  # the data, loaded once per worker process


def _worker_init() -> None:
    torch.set_num_threads(1)


def _worker_run(job):
    seed, settings = job
    return run_seed(seed, settings, _DATA)


# -- statistics and the report --------------------------------------------------------------


def interval(values: np.ndarray):
    """Mean and half-width of the 95% t-interval, per column (NaN below 2 runs)."""
    from scipy import stats

    n = values.shape[0]
    mean = values.mean(0)
    if n < 2:
        return mean, np.full_like(mean, float("nan"))
    return mean, stats.t.ppf(0.975, n - 1) * values.std(0, ddof=1) / math.sqrt(n)


def verdict(points: Sequence[int], diff: np.ndarray, half: np.ndarray) -> str:
    """The paper's claim for one arm: a gain early (20 and 40 minibatches, or the nearest points)
    whose interval excludes 0, and no significant difference at the end."""
    def at(n):
        c = int(np.argmin([abs(p - n) for p in points]))
        return diff[c], half[c]

    early = [at(20), at(40)]
    end = (diff[-1], half[-1])
    gain = any(d - h > 0 for d, h in early)
    slower = any(d + h < 0 for d, h in early)
    same_end = abs(end[0]) <= end[1]
    if gain and same_end:
        return "**reproduces the figure**: faster early, the same final accuracy within the interval"
    if gain:
        return "**partly**: faster early, but the final accuracies differ"
    if slower or end[0] + end[1] < 0:
        return "**does not**: it slows training"
    return "**does not**: no early difference beyond the interval"


def summarise(points: List[int], curves: Dict[str, np.ndarray]):
    """Per arm: mean and interval of the accuracy (%); per term arm: the paired difference with none."""
    acc = {arm: interval(c * 100) for arm, c in curves.items()}
    diff = {arm: interval((c - curves["none"]) * 100) for arm, c in curves.items() if arm != "none"}
    return acc, diff


def figure(points: List[int], acc, path: Path, title: str, paper: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for arm, (mean, half) in acc.items():
        line, = ax.plot(points, mean, label=f"{arm}: {FORMULA[arm]}")
        ax.fill_between(points, mean - half, mean + half, alpha=0.2, color=line.get_color())
    if paper:
        ax.plot([20, 40], [26, 47], "kx", label="paper, without term")
        ax.plot([20, 40], [35, 55], "k^", label="paper, with its term")
        ax.axhline(77, color="k", lw=0.6, ls=":", label="paper: curves meet near 77%")
    ax.set_xlabel("minibatches (one same-class pair each)" if paper else "minibatches")
    ax.set_ylabel("test accuracy (%), 1,000 images")
    ax.set_title(title)
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(results: dict, out: Path, started: float, argv, note: str = "") -> Path:
    """Tables, figure and JSON from ``results`` (the settings and every seed's curves)."""
    settings, runs = results["settings"], results["runs"]
    arms = settings["arms"]
    points = [0] + list(range(settings["every"], settings["steps"] + 1, settings["every"]))
    curves = {arm: np.array([r["curves"][arm] for r in runs]) for arm in arms}
    acc, diff = summarise(points, curves)
    mnist = settings["data"] == "mnist"
    shown = [n for n in HEADLINE if n in points] or points[-1:]
    col = {n: points.index(n) for n in points}

    def cell(stat, n):
        mean, half = stat
        return f"{mean[col[n]]:.1f} ± {half[col[n]]:.1f}"

    def dcell(stat, n):
        mean, half = stat
        return f"{mean[col[n]]:+.1f} ± {half[col[n]]:.1f}"

    head = ["minibatches"] + [f"`{a}`: {FORMULA[a]}" for a in arms] + (["paper (without → with)"] if mnist else [])
    rows = [[n] + [cell(acc[a], n) for a in arms] + ([PAPER.get(n, "")] if mnist else []) for n in shown]
    term_arms = [a for a in arms if a != "none"]
    drows = [[n] + [dcell(diff[a], n) for a in term_arms] for n in shown]
    curve_rows = [[n] + [cell(acc[a], n) for a in arms] + [dcell(diff[a], n) for a in term_arms] for n in points]
    verdicts = [f"- `{a}` ({FORMULA[a]}): {verdict(points, *diff[a])}." for a in term_arms]
    n_runs = len(runs)
    sections = ([note, ""] if note else []) + [
        f"## Test accuracy (%), mean over {n_runs} paired seeds ± 95% t-interval", "",
        table(head, rows), "",
        "## Paired difference with `none` (percentage points, ± 95% t-interval)", "",
        "Each seed trains every arm from the same initial weights, on the same pairs, scored on the same test "
        "images; the difference is taken within a seed.", "",
        table(["minibatches"] + [f"`{a}` − `none`" for a in term_arms], drows), "",
        "The paper's claim (faster early training, the same accuracy at the end), arm by arm:", "",
        *verdicts, "",
        "## The whole curve", "",
        table(["minibatches"] + [f"`{a}`" for a in arms] + [f"`{a}` − `none`" for a in term_arms], curve_rows), "",
        "Figure: `enforce_similarity.png`; every seed's curves: `enforce_similarity.json`.",
    ]
    described = ", ".join(f"{k} = {v}" for k, v in settings.items() if k not in ("arms",))
    out.mkdir(parents=True, exist_ok=True)
    title = ("Enforcing similarity during training (PAPER §4) on MNIST, the authors' setting" if mnist else
             "Enforcing similarity during training (PAPER §4) on scikit-learn's digits")
    md = write_report(out, "enforce_similarity", title, sections, started, described, argv)
    (out / "enforce_similarity.json").write_text(json.dumps({"points": points, **results}))
    figure(points, acc, out / "enforce_similarity.png",
           f"{'MNIST' if mnist else 'digits'}, {n_runs} paired seeds, mean and 95% interval", mnist)
    return md


def _comparable(settings: dict) -> dict:
    return {k: v for k, v in settings.items() if k not in ("runs", "arms")}


def _resumed(path: Path, settings: dict) -> list:
    """The finished seeds of an earlier run with the same settings (every arm asked for present)."""
    if not path.exists():
        return []
    saved = json.loads(path.read_text())
    if _comparable(saved.get("settings", {})) != _comparable(settings):
        raise SystemExit(f"{path} was written with other settings ({saved.get('settings')}); "
                         "use another --out or delete it")
    return [r for r in saved["runs"] if all(a in r["curves"] for a in settings["arms"])]


def _save_partial(path: Path, settings: dict, runs: list) -> None:
    """Every finished seed, after each one (so that a run cut short keeps what it did)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"settings": settings, "runs": runs}))
    tmp.replace(path)


def main(argv=None) -> dict:
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--data", choices=("mnist", "digits"), default="mnist")
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, from {','.join(ARMS)} (none is always run)")
    p.add_argument("--runs", type=int, default=20, help="paired seeds")
    p.add_argument("--steps", type=int, default=150, help="minibatches per run")
    p.add_argument("--every", type=int, default=10, help="score the test images every this many minibatches")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default: Adam's, as the authors)")
    p.add_argument("--lam", type=float, default=1.0, help="the term's weight, > 0 (the sign is the arm's)")
    p.add_argument("--pairs", type=int, default=None, help="same-class pairs per minibatch (mnist 1, digits 4)")
    p.add_argument("--term-pairs", type=int, default=1, help="pairs per minibatch that enter the term")
    p.add_argument("--test", type=int, default=None, help="test images scored (mnist 1000, digits 500)")
    p.add_argument("--workers", type=int, default=1, help="processes, one seed at a time each, one thread each")
    p.add_argument("--resume", action="store_true",
                   help="keep the seeds already in OUT/enforce_similarity.json (same settings) and run the rest")
    p.add_argument("--report-only", action="store_true",
                   help="write the table and figure from the seeds in OUT/enforce_similarity.json, train nothing")
    args = p.parse_args(argv)
    arms = ["none"] + [a for a in args.arms.split(",") if a and a != "none"]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        p.error(f"unknown arm(s) {unknown}; choose from {', '.join(ARMS)}")
    if not args.lam > 0:
        p.error(f"--lam must be > 0, got {args.lam}: the sign belongs to the arm (one_minus_k pulls the gradients "
                "together, plus_k pushes them apart)")
    if args.small:
        args.runs, args.steps, args.every = 2, 20, 10
        args.test = args.test or 200
    pairs = args.pairs or (1 if args.data == "mnist" else 4)
    n_test = args.test or (1000 if args.data == "mnist" else 500)
    started = time.time()
    torch.set_num_threads(1)
    data = load_data(args.data, n_test)
    settings = {
        "data": args.data, "source": data[4], "arms": arms, "runs": args.runs, "steps": args.steps,
        "every": args.every, "lr": args.lr, "lam": args.lam, "pairs": pairs,
        "term_pairs": min(args.term_pairs, pairs), "test": n_test,
        "model": "InnerConvNet (the authors')" if args.data == "mnist" else "small_cnn (digits demo)",
        "loss": "1/2 [NLL(x_A) + NLL(x_B)] + term; k over all parameters of log p_c - mean_{c' != c} log p_c', "
                "train() mode; Adam",
    }
    seeds = list(range(args.seed, args.seed + args.runs))
    saved = args.out / "enforce_similarity.json"
    runs = _resumed(saved, settings) if args.resume or args.report_only else []
    if args.report_only:
        if not runs:
            p.error(f"--report-only: {saved} holds no seeds run with these settings")
        note = (f"**Rendered with --report-only from the {len(runs)} seeds (of {settings['runs']} asked for) that "
                f"{saved.name} held**: the wall time below is the rendering's, not the training's.")
        settings["runs"] = len(runs)
        md = report({"settings": settings, "runs": runs}, args.out, started, argv, note)
        print(md.read_text())
        return {"settings": settings, "runs": runs}
    todo = [s for s in seeds if s not in {r["seed"] for r in runs}]

    def done(r):
        runs.append(r)
        runs.sort(key=lambda r: r["seed"])
        _save_partial(saved, settings, runs)
        print(f"seed {r['seed']}: " + ", ".join(f"{a} {c[-1]:.3f}" for a, c in r["curves"].items())
              + f" ({len(runs)}/{len(seeds)} seeds, {time.time() - started:.0f} s)", flush=True)

    if args.workers > 1 and len(todo) > 1:
        import multiprocessing as mp

        global _DATA
        _DATA = data  # the forked workers inherit it
        with mp.get_context("fork").Pool(args.workers, _worker_init) as pool:
            for r in pool.imap(_worker_run, [(s, settings) for s in todo]):
                done(r)
    else:
        for s in todo:
            done(run_seed(s, settings, data))
    results = {"settings": settings, "runs": runs}
    md = report(results, args.out, started, argv)
    print(md.read_text())
    return results


if __name__ == "__main__":
    main()
