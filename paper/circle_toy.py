"""The circle toy of the paper (PAPER §5, Fig. 2): neighbour counts drop where the target curves.

2,048 inputs on the unit circle, x = (cos 2πα, sin 2πα), target sin(2π f α), f ∈ {1, 2, 4, 8}.
MLP 2→64, 5×(64→64), ReLU, →1, L1 loss, Adam lr 1e-4, batch 64, 5,000 epochs: the authors'
config (Lydorn/netsimilarity, ``projects/netsimilarity/config.json``), about 40 min of one core
for the 20 runs. α: the authors' training script (``train.py``) sets ``sobol_generator = None``,
so their ``generate_data`` draws α with ``np.random.uniform`` (unseeded) and sorts it, once per
frequency, and the 5 runs of a frequency reuse that draw from disk; their Sobol generator is
used only by the stand-alone ``synthetic_1d_generation.py``. The default here is the same: one
uniform draw (seeded by ``--seed``, shared by all frequencies), sorted; ``--alpha sobol`` takes
the first n points of the unscrambled Sobol sequence instead. All runs (frequencies × seeds)
train together as one stacked model: Adam acts element by element, so each run is exactly an
independent training (its own initialisation and batch order).

Then, for each run, the exact similarity of the raw output (d = 1, all parameters) through
``nnsim_hooks.attach(net, output="sum").similarity(x)``, and the authors' measures:
soft density Σ_j k_ij (self included), hard counts #{j ≠ i: k_ij > t}, t = 0.5…0.99, and the
"less soft" counts Σ_{j≠i} max(k_ij, 0)^n, n = 2, 3, 4 (self excluded, as their pdist).
Each measure is the median over the runs of one frequency; the paper's figure plots the soft
count against α beside the target's curvature |y''| / (1 + y'^2)^{3/2} and shows a dip at each
curvature peak. Two numbers per measure: its Spearman correlation with the curvature over the
whole circle, and the local dip (:func:`local_dip`): the share of the 2% highest-curvature
samples whose count lies below the median count within a quarter period on either side, 50%
by chance. Spearman over the whole circle hides narrow dips; the local dip does not.

    OMP_NUM_THREADS=1 python -m paper.circle_toy            # full (see the table for its time)
    python -m paper.circle_toy --small --out /tmp/circle    # seconds
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

import nnsim_hooks

from .common import parser, seed_all, table, write_report

THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.925, 0.95, 0.975, 0.99)
POWERS = (2, 3, 4)
WIDTH, HIDDEN = 64, 5


def draw_alpha(n: int, how: str = "uniform", seed: int = 0) -> np.ndarray:
    """n positions on [0, 1), sorted: uniform (the authors' training script) or the first n
    points of the unscrambled Sobol sequence."""
    if how == "uniform":
        return np.sort(np.random.default_rng(seed).uniform(size=n))
    if how == "sobol":
        from scipy.stats import qmc

        return np.sort(qmc.Sobol(1, scramble=False).random(n)[:, 0])
    raise ValueError(f"alpha must be 'uniform' or 'sobol', got {how!r}")


def circle_data(alpha: np.ndarray, f: float):
    """Inputs [n, 2], targets [n], curvature [n] at positions α (the authors' formulas)."""
    x = np.stack([np.cos(2 * np.pi * alpha), np.sin(2 * np.pi * alpha)], 1)
    y = np.sin(2 * np.pi * f * alpha)
    dy = 2 * np.pi * f * np.cos(2 * np.pi * f * alpha)
    ddy = -4 * np.pi**2 * f**2 * np.sin(2 * np.pi * f * alpha)
    curvature = np.abs(ddy) / (1 + dy**2) ** 1.5
    return x.astype(np.float32), y.astype(np.float32), curvature


def local_dip(alpha: np.ndarray, count: np.ndarray, curvature: np.ndarray, f: float, top: float = 0.02) -> float:
    """Share of the ``top`` highest-curvature samples whose count is below the median count of
    the samples within a quarter period (1 / (4 f)) on either side on the circle, itself
    included: 1 where the count dips at every curvature peak, 0.5 by chance, 0 for bumps."""
    peaks = np.argsort(-curvature)[: max(1, int(round(top * len(alpha))))]
    below = []
    for i in peaks:
        gap = np.abs(alpha - alpha[i])
        near = np.minimum(gap, 1 - gap) <= 1 / (4 * f)
        below.append(count[i] < np.median(count[near]))
    return float(np.mean(below))


class StackedMLP(nn.Module):
    """R independent MLPs 2→64→…→1 evaluated at once (weights [R, in, out]), nn.Linear's init."""

    def __init__(self, runs: int, width: int = WIDTH, hidden: int = HIDDEN):
        super().__init__()
        sizes = [2] + [width] * (hidden + 1) + [1]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
            bound = 1 / math.sqrt(fan_in)  # nn.Linear: kaiming_uniform(a=√5) = U(±1/√fan_in)
            self.weights.append(nn.Parameter(torch.empty(runs, fan_in, fan_out).uniform_(-bound, bound)))
            self.biases.append(nn.Parameter(torch.empty(runs, 1, fan_out).uniform_(-bound, bound)))

    def forward(self, x):  # x [R, B, 2] -> [R, B]
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            x = torch.baddbmm(b, x, w)
            if i < len(self.weights) - 1:
                x = torch.relu(x)
        return x[..., 0]

    def run(self, r: int) -> nn.Sequential:
        """Run r as an ordinary nn.Sequential of Linear/ReLU (what a user would attach to)."""
        layers = []
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            lin = nn.Linear(w.shape[1], w.shape[2])
            with torch.no_grad():
                lin.weight.copy_(w[r].T)
                lin.bias.copy_(b[r, 0])
            layers.append(lin)
            if i < len(self.weights) - 1:
                layers.append(nn.ReLU())
        return nn.Sequential(*layers)


def train(x: np.ndarray, ys: np.ndarray, epochs: int, lr: float, batch: int, seed: int, log_every: int = 0,
          snapshots=(), on_snapshot=None):
    """Train one run per row of ``ys`` [R, n] on the shared inputs; returns the model and
    the final L1 loss of each run on the whole set. ``on_snapshot(epoch, net, loss)`` is called
    after each epoch listed in ``snapshots``."""
    runs, n = ys.shape
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = StackedMLP(runs)
    opt = torch.optim.Adam(net.parameters(), lr=lr, fused=True)  # the same update, 6x faster on CPU
    xt, yt = torch.from_numpy(x), torch.from_numpy(ys)
    steps = n // batch
    for epoch in range(epochs):
        order = torch.argsort(torch.rand(runs, n, generator=gen), dim=1)  # own batch order per run
        for s in range(steps):
            idx = order[:, s * batch:(s + 1) * batch]
            pred = net(xt[idx])
            loss = (pred - torch.gather(yt, 1, idx)).abs().mean(1).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if log_every and (epoch + 1) % log_every == 0:
            print(f"epoch {epoch + 1}: L1 per run {final_loss(net, xt, yt).round(4).tolist()}", flush=True)
        if on_snapshot is not None and epoch + 1 in snapshots and epoch + 1 < epochs:
            on_snapshot(epoch + 1, net, final_loss(net, xt, yt))
    return net, final_loss(net, xt, yt)


@torch.no_grad()
def final_loss(net, xt, yt) -> np.ndarray:
    pred = net(xt.expand(yt.shape[0], -1, -1))
    return (pred - yt).abs().mean(1).numpy()


def measures(k: np.ndarray) -> dict:
    """The authors' neighbour measures from a similarity matrix [n, n]."""
    out = {"soft": k.sum(1)}  # self included (k_ii = 1)
    off = k.copy()
    np.fill_diagonal(off, 0.0)  # their pdist/squareform: self excluded
    for t in THRESHOLDS:
        out[f"hard t={t}"] = (off > t).sum(1).astype(np.float64)
    pos = np.clip(off, 0, None)
    for n in POWERS:
        out[f"less soft n={n}"] = (pos**n).sum(1)
    return out


def setup(n: int, freqs, seeds: int, seed: int, alpha_draw: str = "uniform"):
    """α [n], the shared inputs [n, 2], the targets [len(freqs) * seeds, n] and the curvature per f."""
    alpha = draw_alpha(n, alpha_draw, seed)
    x = None
    ys, curv = [], {}
    for f in freqs:
        x, y, c = circle_data(alpha, f)
        curv[f] = c
        ys += [y] * seeds
    return alpha, x, np.stack(ys), curv


def analyse(net, loss, alpha, x, curv, freqs, seeds: int) -> dict:
    """Per frequency: median measures over its runs, Spearman with the curvature, local dip."""
    from scipy.stats import spearmanr

    n = len(alpha)
    xt = torch.from_numpy(x)
    results = {}
    for fi, f in enumerate(freqs):
        per_run = []
        for s in range(seeds):
            r = fi * seeds + s
            with nnsim_hooks.attach(net.run(r), output="sum", batch_size=n) as h:
                k = h.similarity(xt).numpy()
            per_run.append(measures(k))
        names = list(per_run[0])
        median = {m: np.median(np.stack([p[m] for p in per_run]), 0) for m in names}
        rho = {m: spearmanr(median[m], curv[f])[0] for m in names}
        rho_runs = {m: [spearmanr(p[m], curv[f])[0] for p in per_run] for m in names}
        dip = {m: local_dip(alpha, median[m], curv[f], f) for m in names}
        dip_runs = {m: [local_dip(alpha, p[m], curv[f], f) for p in per_run] for m in names}
        results[f] = {"median": median, "rho": rho, "rho_runs": rho_runs, "dip": dip, "dip_runs": dip_runs,
                      "curvature": curv[f], "loss": loss[fi * seeds:(fi + 1) * seeds]}
    return results


def run_experiment(n: int, freqs, seeds: int, epochs: int, lr: float, batch: int, seed: int, log_every: int = 0,
                   alpha_draw: str = "uniform", snapshots=(), on_snapshot=None):
    """Train, then analyse; ``on_snapshot(epoch, alpha, results)`` gets the analysis at each
    epoch of ``snapshots`` on the way."""
    alpha, x, ys, curv = setup(n, freqs, seeds, seed, alpha_draw)

    def snap(epoch, net, loss):
        on_snapshot(epoch, alpha, analyse(net, loss, alpha, x, curv, freqs, seeds))

    net, loss = train(x, ys, epochs, lr, batch, seed, log_every, snapshots, snap if on_snapshot else None)
    return alpha, analyse(net, loss, alpha, x, curv, freqs, seeds)


def figure(alpha, results, path) -> None:
    """The paper's figure: the soft count (median of runs) against α, the curvature shaded;
    the most negatively correlated hard count dashed beside it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    freqs = list(results)
    fig, axes = plt.subplots(len(freqs), 1, figsize=(9, 2.6 * len(freqs)), sharex=True)
    axes = np.atleast_1d(axes)
    for ax, f in zip(axes, freqs):
        r = results[f]
        best_hard = max((m for m in r["rho"] if m.startswith("hard")), key=lambda m: -r["rho"][m])
        for m, style, width in (("soft", "-", 1.6), (best_hard, "--", 0.8)):
            v = r["median"][m]
            span = np.ptp(v) or 1.0
            ax.plot(alpha, (v - v.min()) / span, style, lw=width,
                    label=f"{m} (ρ = {r['rho'][m]:+.2f}, dip {100 * r['dip'][m]:.0f}%)")
        c = r["curvature"]
        ax.fill_between(alpha, 0, c / c.max(), color="grey", alpha=0.25, label="curvature (scaled)")
        ax.set_ylabel(f"f = {f:g}\n(scaled)")
        ax.legend(fontsize=7, loc="upper right", ncol=3)
    axes[-1].set_xlabel("α")
    fig.suptitle("Circle toy: the soft neighbour count (median of runs) against α, target curvature shaded")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt_share(x: float) -> str:
    return f"{100 * x:.0f}%"


def write_outputs(out, alpha, results, history, epoch: int, epochs: int, settings: str, started: float, argv) -> Path:
    """Table (.md), figure (.png) and numbers (.json) of the analysis at ``epoch``, with the soft
    count's numbers at every snapshot so far (``history``: epoch -> {f: (rho, dip, loss)})."""
    freqs = list(results)
    out.mkdir(parents=True, exist_ok=True)
    png = out / "circle_toy.png"
    figure(alpha, results, png)
    head = [f"soft count (the paper's figure), epoch {epoch}"] + [f"f = {f:g}" for f in freqs]
    headline = [
        ["Spearman with the curvature"] + [f"{results[f]['rho']['soft']:+.2f}" for f in freqs],
        ["local dip (50% by chance)"] + [_fmt_share(results[f]["dip"]["soft"]) for f in freqs],
        ["Spearman, per run (min…max)"] + [
            f"{min(results[f]['rho_runs']['soft']):+.2f}…{max(results[f]['rho_runs']['soft']):+.2f}" for f in freqs],
        ["local dip, per run (min…max)"] + [
            f"{_fmt_share(min(results[f]['dip_runs']['soft']))}…{_fmt_share(max(results[f]['dip_runs']['soft']))}"
            for f in freqs],
        ["L1 loss (median of runs)"] + [f"{np.median(results[f]['loss']):.4f}" for f in freqs],
    ]
    names = list(results[freqs[0]]["rho"])
    every = [["measure"] + [f"f = {f:g}" for f in freqs],
             [[m] + [f"{results[f]['rho'][m]:+.2f} / {_fmt_share(results[f]['dip'][m])}" for f in freqs] for m in names]]
    by_epoch = [["epoch"] + [f"f = {f:g}" for f in freqs],
                [[e] + [f"{h[f][0]:+.2f} / {_fmt_share(h[f][1])} / {h[f][2]:.4f}" for f in freqs]
                 for e, h in sorted(history.items())]]
    paper_row = ("The paper (Fig. 2, §5): the soft neighbour count dips where the target's curvature is high; "
                 "it gives curves, no numbers. Spearman < 0 and a local dip near 100% are that drop; "
                 "Spearman over the whole circle can miss narrow dips, the local dip cannot.")
    status = "" if epoch == epochs else f"**Snapshot at epoch {epoch} of {epochs}: the run was still training.**"
    sections = [status, "", "## The soft count, as in the paper's figure (median over runs)", "", paper_row, "",
                table(head, headline), "",
                "Local dip: the share of the 2% highest-curvature samples whose count lies below the median count "
                "within a quarter period (1/(4f)) on either side; 100% = a dip at every curvature peak, 50% = chance, "
                "0% = bumps.", "",
                "## The soft count along training: Spearman / local dip / L1 loss", "", table(*by_epoch), "",
                f"## Every measure at epoch {epoch}: Spearman / local dip (median measure over runs)", "",
                table(*every), "",
                f"Figure: `{png.name}` (epoch {epoch}; the soft count and the most negatively correlated hard count, "
                "scaled to [0, 1])."]
    md = write_report(out, "circle_toy", "Circle toy (PAPER §5, the paper's Fig. 2)", sections, started, settings, argv)
    summary = {str(f): {"rho": results[f]["rho"], "dip": results[f]["dip"], "rho_runs": results[f]["rho_runs"],
                        "dip_runs": results[f]["dip_runs"], "loss": results[f]["loss"].tolist()} for f in freqs}
    (out / "circle_toy.json").write_text(json.dumps(
        {"settings": settings, "epoch": epoch, "frequencies": summary,
         "soft_by_epoch": {str(e): {str(f): v for f, v in h.items()} for e, h in history.items()}}, indent=1))
    return md


def main(argv=None) -> dict:
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=None, help="default 5000 (the authors'); --small: 150")
    p.add_argument("--lr", type=float, default=None, help="Adam learning rate; default 1e-4 (the authors'); --small: 3e-3")
    p.add_argument("--runs", type=int, default=None, help="seeds per frequency (default 5, as the authors)")
    p.add_argument("--alpha", choices=("uniform", "sobol"), default="uniform",
                   help="how α is drawn: uniform (the authors' training script, default) or the Sobol sequence")
    p.add_argument("--snapshots", default=None,
                   help="comma-separated epochs at which to analyse and write the outputs on the way "
                        "(default 250,1000,2000,3000,4000; --small: 50)")
    p.add_argument("--log-every", type=int, default=0)
    args = p.parse_args(argv)
    started = time.time()
    seed_all(args.seed)
    if args.small:
        n, freqs, runs, epochs, lr, batch = 256, (1, 2), args.runs or 2, args.epochs or 150, args.lr or 3e-3, 64
    else:
        n, freqs, runs, epochs, lr, batch = 2048, (1, 2, 4, 8), args.runs or 5, args.epochs or 5000, args.lr or 1e-4, 64
    snapshots = [int(e) for e in (args.snapshots or ("50" if args.small else "250,1000,2000,3000,4000")).split(",") if e]
    settings = (f"n = {n}, α {args.alpha} (sorted), f ∈ {list(freqs)}, {runs} runs per f, MLP 2→64, 5×(64→64), ReLU, "
                f"→1, L1 loss, Adam lr {lr:g}, batch {batch}, {epochs} epochs; exact similarity of the raw output over "
                "all parameters")
    history = {}

    def record(epoch, alpha, results):
        history[epoch] = {f: (float(r["rho"]["soft"]), float(r["dip"]["soft"]), float(np.median(r["loss"])))
                          for f, r in results.items()}
        return write_outputs(args.out, alpha, results, history, epoch, epochs, settings, started, argv)

    def snapshot(epoch, alpha, results):
        record(epoch, alpha, results)
        print(f"epoch {epoch}: soft count Spearman / dip " + ", ".join(
            f"f={f:g} {v[0]:+.2f}/{v[1]:.2f}" for f, v in history[epoch].items()) + f" ({time.time() - started:.0f} s)",
            flush=True)

    alpha, results = run_experiment(n, freqs, runs, epochs, lr, batch, args.seed, args.log_every, args.alpha,
                                    snapshots, snapshot)
    md = record(epochs, alpha, results)
    print(md.read_text())
    return results


if __name__ == "__main__":
    main()
