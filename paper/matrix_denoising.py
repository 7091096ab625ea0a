"""The authors' d×d denoising factor against the scalar 1/N_eff, on d = 2 models (PAPER §3, §6).

The authors compute the denoising factor for d outputs as the matrix
F_i = Σ_j A_ij A_ijᵀ, A_ij = (Σ_k K_ik)⁻¹ K_ij on the raw kernel K_ij = J(x_i) J(x_j)ᵀ, and
report Tr(F_i)/d. ``GradientIndex.denoising_factor`` gives a scalar 1/N_eff of the scalar
kernel Tr(K_C)/d (cosine) or of n_i n_j Tr(K_C)/d with n = √Tr K(x,x) (raw), which is all a
stored index of whitened rows allows. This script puts them side by side, per sample, on
two trained d = 2 networks:

- ``circle``: the circle MLP of ``paper.circle_toy`` with two outputs (sin, cos of 2π·2α);
- ``registration``: the U-Net of ``paper.registration``, narrowed to 3.8k parameters, on its
  generated patches; d = 2: the patch-mean displacement (x and y), trained on noisy labels.

All factors here are exact (no sketch), so the only difference is the formula; for the
model small enough, the index path is checked against them too.

    OMP_NUM_THREADS=1 python -m paper.matrix_denoising
    python -m paper.matrix_denoising --small --out /tmp/md
"""

from __future__ import annotations

import time

import numpy as np
import torch
from torch.utils.data import TensorDataset

import nnsim_hooks
from nnsim_hooks.exact.matrix_denoising import MOMENT_LIMIT, index_matrix_denoising_factor, matrix_denoising_factor

from . import circle_toy, registration_net
from .common import parser, seed_all, table, write_report
from .registration_data import make_patches

NARROW_UNET = (2, 4, 6, 8)


def circle_model(n: int, epochs: int, seed: int):
    alpha = circle_toy.draw_alpha(n, "sobol")  # the grid the committed results used
    x, _, _ = circle_toy.circle_data(alpha, 2)
    y = np.stack([np.sin(2 * np.pi * 2 * alpha), np.cos(2 * np.pi * 2 * alpha)], 1).astype(np.float32)
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(2, 64), torch.nn.ReLU(),
                              *[m for _ in range(5) for m in (torch.nn.Linear(64, 64), torch.nn.ReLU())],
                              torch.nn.Linear(64, 2))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen)
        for s in range(0, n, 64):
            idx = order[s:s + 64]
            loss = (net(xt[idx]) - yt[idx]).abs().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return net.eval(), xt


def registration_model(n: int, epochs: int, seed: int):
    """The U-Net of ``paper.registration`` narrowed to 3,762 parameters (so that an index of
    exact features fits, P <= 4096), trained on noisy labels; its d = 2 output is the
    patch-mean displacement."""
    data = make_patches(n, seed)
    net = registration_net.train(data.x, data.truth + data.noise, epochs, seed, widths=NARROW_UNET)
    return registration_net.PatchMean(net), data.x


def compare(net, x) -> dict:
    """Per-sample factors: the matrix ones (raw, cosine) from exact Jacobians, the scalar
    1/N_eff (cosine, raw) from the exact similarity, and, when the model is small enough for
    exact index features (P <= 4096), the matrix-cosine one from an index."""
    params = sum(p.numel() for p in net.parameters())
    with nnsim_hooks.attach(net, output="full", batch_size=256) as h:
        raw = matrix_denoising_factor(h, x, kernel="raw")
        cos = matrix_denoising_factor(h, x, kernel="cosine")
        k = h.similarity(x).numpy()  # Tr(K_C)/2, exact
        norms = np.sqrt(np.concatenate([  # sqrt(Tr K(x, x)), the index's raw-kernel weights
            sum((g.double() ** 2).flatten(1).sum(1) for g in h.per_sample_gradients(x[s:s + 256]).values()).numpy()
            for s in range(0, len(x), 256)]))
    k_raw = norms[:, None] * norms[None, :] * k
    out = {
        "matrix, raw kernel (the authors')": raw.trace.numpy(),
        "matrix, cosine kernel K_C": cos.trace.numpy(),
        "scalar 1/N_eff, cosine Tr(K_C)/2": (k**2).sum(1) / k.sum(1) ** 2,
        "scalar 1/N_eff, raw (n_i n_j Tr(K_C)/2)": (k_raw**2).sum(1) / k_raw.sum(1) ** 2,
        "params": params,
    }
    if params <= MOMENT_LIMIT:
        # sketch_dim >= P: stage 2 is a padding, the stored features are exact.
        with nnsim_hooks.attach(net, output="full", sketch_dim=MOMENT_LIMIT, batch_size=256) as h:
            if not h.sketcher.exact:
                raise RuntimeError(f"sketch_dim={MOMENT_LIMIT} does not keep the features of {params} parameters exact")
            idx = h.build_index(TensorDataset(x), progress=False, store_outputs=False)
        out["matrix, cosine, from the index"] = index_matrix_denoising_factor(idx).trace.numpy()
        out["scalar 1/N_eff, cosine, from the index"] = idx.denoising_factor("cosine")
    return out


def rel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs(a / b - 1)


def figure(results, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4.5))
    axes = np.atleast_1d(axes)
    ref = "matrix, raw kernel (the authors')"
    for ax, (name, r) in zip(axes, results.items()):
        for other, marker in (("scalar 1/N_eff, cosine Tr(K_C)/2", "o"), ("scalar 1/N_eff, raw (n_i n_j Tr(K_C)/2)", "x"),
                              ("matrix, cosine kernel K_C", ".")):
            ax.scatter(r[other], r[ref], s=6, marker=marker, alpha=0.6, label=other)
        lo = min(np.nanmin(r[ref]), np.nanmin(r["scalar 1/N_eff, cosine Tr(K_C)/2"]))
        hi = max(np.nanmax(r[ref]), np.nanmax(r["scalar 1/N_eff, cosine Tr(K_C)/2"]))
        ax.plot([lo, hi], [lo, hi], "k-", lw=0.8)
        ax.ticklabel_format(style="sci", scilimits=(0, 0))  # narrow ranges: linear axes read better
        ax.set_xlabel("other factor")
        ax.set_ylabel("Tr(F)/2, matrix factor, raw kernel")
        ax.set_title(f"{name} (d = 2)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    p = parser(__doc__.split("\n")[0])
    args = p.parse_args(argv)
    started = time.time()
    seed_all(args.seed)
    if args.small:
        sizes = {"circle": (64, 10), "registration": (64, 2)}
    else:
        sizes = {"circle": (1024, 200), "registration": (1024, 30)}
    results = {
        "circle": compare(*circle_model(*sizes["circle"], args.seed)),
        "registration": compare(*registration_model(*sizes["registration"], args.seed)),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    png = args.out / "matrix_denoising.png"
    figure(results, png)

    ref = "matrix, raw kernel (the authors')"
    rows = []
    for name, r in results.items():
        for other in ("matrix, cosine kernel K_C", "scalar 1/N_eff, cosine Tr(K_C)/2",
                      "scalar 1/N_eff, raw (n_i n_j Tr(K_C)/2)", "matrix, cosine, from the index",
                      "scalar 1/N_eff, cosine, from the index"):
            if other not in r:
                continue
            d = rel(r[other], r[ref])
            rows.append([name, other, f"{np.nanmean(r[other]):.5f}", f"{np.nanmean(r[ref]):.5f}",
                         f"{100 * np.nanmedian(d):.2f}%", f"{100 * np.nanmax(d):.2f}%"])
    sections = [
        "## Tr(F)/d of the authors' matrix factor (raw kernel) against the other factors", "",
        "The paper's code (PAPER §6): the matrix factor's Tr/d differs from a scalar 1/N_eff by up to 8.5% at d = 2 "
        "(19% on the raw kernel), measured on the authors' models.", "",
        table(["model", "factor", "mean", "mean Tr(F)/2 (raw)", "median |rel. diff.|", "max |rel. diff.|"], rows,
              "llrrrr"), "",
        "The rows `from the index` use an index of exact features (models of at most 4,096 parameters): they "
        "must match the exact rows above them; the raw matrix factor cannot come from an index (its rows are "
        "whitened). `scalar 1/N_eff, raw` is what `GradientIndex.denoising_factor(\"raw\")` computes for d > 1.", "",
        f"Figure: `{png.name}` (per sample; the line is equality).",
    ]
    settings = ("; ".join(f"{k}: {v[0]} samples, {v[1]} epochs, {results[k]['params']} parameters"
                          for k, v in sizes.items()) + f"; seed {args.seed}")
    md = write_report(args.out, "matrix_denoising", "Matrix denoising factor vs scalar 1/N_eff (d = 2)", sections,
                      started, settings, argv)
    print(md.read_text())
    return results


if __name__ == "__main__":
    main()
