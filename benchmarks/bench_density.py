"""Cost of the exact dataset-scale queries in plain passes (issue 12, items 1 and 2).

For resnet18 and a small ViT at 32x32, N samples in batches of B, each timed in the same
run as the baseline:

- ``plain pass``: one forward + backward over the N samples in batches of B (the unit
  every ratio is against);
- ``density exact``: :meth:`Handle.density` (two captured passes, no sketch);
- ``density sketched``: :meth:`Handle.build_index` (D = 1024) + ``idx.density()``;
- ``similarity exact, kept factors``: ``similarity(x)`` on all N (one pass per batch,
  Gram blocks from kept factors);
- ``similarity exact, pairs of half-batches``: the previous loop (every pair of half-batches
  through the model together), kept as the fallback;

and the error of the sketched density against the exact one (mean and max absolute
difference, and the exact density's spread for scale).

    python benchmarks/bench_density.py [--n 256] [--batch 64] [--out benchmarks/results/density_cpu.md]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import nnsim_hooks  # noqa: E402
from nnsim_hooks.exact import gram_blocks  # noqa: E402


def timed(fn, device: str):
    common.sync(device)
    start = time.perf_counter()
    out = fn()
    common.sync(device)
    return time.perf_counter() - start, out


def bench_model(name: str, n: int, batch: int, device: str, pairs: bool):
    torch.manual_seed(0)
    model = common.MODELS[name]().to(device)
    x = torch.randn(n, 3, 32, 32, device=device)

    def plain_pass():
        for start in range(0, n, batch):
            model.zero_grad(set_to_none=True)
            out = model(x[start : start + batch])
            F.cross_entropy(out, out.argmax(1)).backward()

    plain_pass()  # warm-up
    rows = []
    plain = [timed(plain_pass, device)[0]]
    with nnsim_hooks.attach(model, sketch_dim=1024, batch_size=batch) as h:
        h.similarity(x[:batch], progress=False)  # warm-up and the one-off layout checks
        t, exact = timed(lambda: h.density(x, progress=False), device)
        rows.append(("density exact", t, ""))
        t, idx = timed(lambda: h.build_index(x, progress=False), device)
        t2, sketched = timed(idx.density, device)
        rows.append(("density sketched (D=1024)", t + t2, ""))
        plain.append(timed(plain_pass, device)[0])
        t, sim = timed(lambda: h.similarity(x, progress=False), device)
        rows.append(("similarity exact, kept factors", t, f"{n // batch + (n % batch > 0)} passes"))
        if pairs:
            def old():
                gram, d = h._pair_gram(x, None, n)
                return gram

            t, gram = timed(old, device)
            rows.append(("similarity exact, pairs of half-batches", t, f"{gram_blocks.passes_of_pairs(n, batch)} passes"))
            norms = torch.diagonal(gram).sqrt()
            agree = float((gram / (norms[:, None] * norms[None, :]) - sim).abs().max())
        else:
            agree = float("nan")
    plain.append(timed(plain_pass, device)[0])
    # On a shared machine the least disturbed of three plain passes (before, between and
    # after the methods) is the baseline; each method runs once, so its ratio errs high.
    base = min(plain)
    rows.insert(0, ("plain pass", base, f"min of {', '.join(f'{t:.2f}' for t in plain)} s"))
    row_sums = sim.sum(1).cpu().numpy()
    err = {
        "exact vs similarity row sums (max abs. difference)": float(np.nanmax(np.abs(exact - row_sums))),
        "sketched vs exact (mean abs. difference)": float(np.nanmean(np.abs(sketched - exact))),
        "sketched vs exact (max abs. difference)": float(np.nanmax(np.abs(sketched - exact))),
        "exact density: std over samples": float(np.nanstd(exact)),
        "kept factors vs pairs (max abs. difference of the kernel)": agree,
    }
    return base, rows, err


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--models", nargs="+", default=list(common.MODELS))
    parser.add_argument("--no-pairs", action="store_true", help="skip the (slow) pair-of-half-batches loop")
    parser.add_argument("--out", default=None, help="write the Markdown table here too")
    args = parser.parse_args()

    command = "python benchmarks/bench_density.py " + " ".join(sys.argv[1:])
    lines = [
        "# Exact density and exact similarity: cost in plain passes",
        "",
        f"Command: `{command.strip()}`",
        "",
        f"Machine: {common.machine_line(args.device)}. N = {args.n} samples, batch {args.batch}, 32x32 inputs.",
        "",
        "`x plain pass` divides each time by one forward + backward over the same N samples in batches of "
        f"{args.batch}, timed in the same run (the least of three, before, between and after the methods; "
        "each method runs once, so on a loaded machine its ratio errs high).",
        "",
        "| model | method | seconds | x plain pass | note |",
        "|---|---|---:|---:|---|",
    ]
    errors = ["", "| model | check | value |", "|---|---|---:|"]
    for name in args.models:
        base, rows, err = bench_model(name, args.n, args.batch, args.device, not args.no_pairs)
        for method, t, note in rows:
            lines.append(f"| {name} | {method} | {t:.2f} | {t / base:.2f} | {note} |")
            print(lines[-1], flush=True)
        for key, value in err.items():
            errors.append(f"| {name} | {key} | {value:.3g} |")
            print(errors[-1], flush=True)
    text = "\n".join(lines + errors) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
