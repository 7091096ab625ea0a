"""One training step with the similarity term (PAPER section 4) against a plain step and the
authors' per-pair loop.

- plain: cross-entropy on a minibatch, backward, SGD step;
- pair_similarity: the same plus ``lam * (1 - k).mean()`` over P pairs from
  :meth:`Handle.pair_similarity` (one pass for the 2P inputs);
- per-pair loop: the same term as the authors compute it, for each pair
  ``autograd.grad(f(x_a), params, create_graph=True)``, the same for ``x_b``, the cosine;
- bound (not the term): the squared norm of the gradient summed over the 2P inputs, one
  double back-propagation of them with no per-pair separation: roughly the least that any
  method which double-back-propagates the 2P inputs costs.

The four are timed alternately in one process (rotating order, median of the repeats), in
CPU time of the process (one thread: the work done, not the wait for a core on a shared
machine), and each is divided by the plain step's median.

    OMP_NUM_THREADS=1 python benchmarks/bench_pair.py --out benchmarks/results/pair_cpu.md
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import nnsim_hooks
from nnsim_hooks.audit.demo import small_cnn
from nnsim_hooks.engine.outputs import contrast

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine_line  # noqa: E402


def digits_cnn():
    return small_cnn().train(), (1, 8, 8), 32


def small_vit():
    import timm
    from nnsim_hooks.integrations.timm_rules import register_timm_rules

    register_timm_rules()  # timm's LayerNorm on the core rule
    torch.manual_seed(0)
    return timm.create_model("test_vit", pretrained=False, img_size=32, num_classes=10).train(), (3, 32, 32), 16


MODELS = {"digits_cnn": digits_cnn, "test_vit_32px": small_vit}


def loop_term(model, xa, xb, ya):
    params = [p for p in model.parameters() if p.requires_grad]
    ks = []
    for i in range(len(xa)):
        flat = []
        for x in (xa[i : i + 1], xb[i : i + 1]):
            g = torch.autograd.grad(contrast(model(x), ya[i : i + 1]).sum(), params, create_graph=True)
            flat.append(torch.cat([t.reshape(-1) for t in g]))
        ks.append(flat[0] @ flat[1] / (flat[0].norm() * flat[1].norm()))
    return torch.stack(ks)


def one_double_backprop(model, xa, xb, ya):
    """Not the term: the squared norm of the gradient summed over the 2P inputs. One double
    back-propagation of the 2P inputs with no per-pair separation, a lower bound on the cost
    of any per-pair method."""
    params = [p for p in model.parameters() if p.requires_grad]
    values = contrast(model(torch.cat([xa, xb])), torch.cat([ya, ya])).sum()
    grads = torch.autograd.grad(values, params, create_graph=True)
    return 1 - sum((g * g).sum() for g in grads)  # the step adds 1 - this: a gradient penalty, stable


def bench(name: str, pairs: int, repeats: int):
    model, shape, batch = MODELS[name]()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *shape, generator=g)
    y = torch.randint(10, (batch,), generator=g)
    xa, xb = torch.randn(pairs, *shape, generator=g), torch.randn(pairs, *shape, generator=g)
    ya = torch.randint(10, (pairs,), generator=g)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    h = nnsim_hooks.attach(model, output="contrast")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def step(term):
        loss = F.cross_entropy(model(x), y)
        if term is not None:
            loss = loss + (1 - term()).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    def ours():
        step(lambda: h.pair_similarity(xa, xb, targets_a=ya, targets_b=ya))

    def loop():
        with sdpa_kernel(SDPBackend.MATH):
            step(lambda: loop_term(model, xa, xb, ya))

    def bound():
        with sdpa_kernel(SDPBackend.MATH):
            step(lambda: one_double_backprop(model, xa, xb, ya))

    methods = {"plain": lambda: step(None), "pair_similarity": ours, "per-pair loop": loop,
               "bound: one double backprop of the 2P inputs": bound}
    times = {m: [] for m in methods}
    for fn in methods.values():
        fn()  # warm-up (and the first-call check of pair_similarity)
    order = list(methods)
    for r in range(repeats):
        for m in order[r % len(order) :] + order[: r % len(order)]:
            start = time.process_time()  # CPU time: with one thread, the work done, not the wait for a core
            methods[m]()
            times[m].append(time.process_time() - start)
    h.detach()
    return {m: statistics.median(t) for m, t in times.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    load_before = os.getloadavg()[0]
    for name in args.models:
        for p in args.pairs:
            t = bench(name, p, args.repeats)
            base = t["plain"]
            for m, s in t.items():
                ratio = "" if m == "plain" else f"{s / t['pair_similarity']:.2f}"
                rows.append(f"| {name} | {p} | {m} | {s * 1000:.1f} | {s / base:.2f} | "
                            f"{ratio} |")
            print("\n".join(rows[-len(t):]), flush=True)
    command = "OMP_NUM_THREADS=1 python benchmarks/bench_pair.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = "\n".join([
        "# Training step with the similarity term: pair_similarity against a plain step and the per-pair loop",
        "",
        f"Command: `{command.strip()}`",
        "",
        f"Machine: {machine_line('cpu')}. Shared with other jobs (load average {load_before:.1f} at the start, "
        f"{os.getloadavg()[0]:.1f} at the end, on 2 cores): times are the process's CPU time (one thread), measured "
        f"alternately in one process (median of {args.repeats} repeats each); they still vary with cache sharing.",
        "",
        "A step is the cross-entropy of a minibatch (digits CNN: 32 images 8x8; timm test_vit: 16 images 32x32), "
        "plus for the other rows `(1 - k).mean()` over P pairs (other images), backward and an SGD step. "
        "`x plain` divides by the plain step; `x ours` divides by the pair_similarity step (above 1: the loop is "
        "slower). For a single pair pair_similarity runs the per-input double back-propagation itself. "
        "The `bound` row is not the term: the squared norm of the gradient summed over the 2P inputs, one double "
        "back-propagation of them with no per-pair separation: roughly the least that any method which "
        "double-back-propagates the 2P inputs costs.",
        "",
        "| model | P pairs | step | CPU ms / step | x plain | x ours |",
        "|---|---:|---|---:|---:|---:|",
        *rows,
    ])
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
