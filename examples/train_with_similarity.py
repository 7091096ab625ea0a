"""Train a small CNN on scikit-learn's digits with the paper's similarity term (PAPER section 4).

A plain PyTorch loop: each minibatch's cross-entropy, plus ``lam * (1 - k)`` on pairs of
two different images of the same class drawn from that minibatch, k being the cosine
between their parameter gradients (``Handle.pair_similarity``, differentiable).

    python examples/train_with_similarity.py --steps 200 --pairs 1 --lam 1
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F

import nnsim_hooks
from nnsim_hooks.audit.demo import noisy_digits, small_cnn
from nnsim_hooks.training import same_class_pairs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200, help="minibatches")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--pairs", type=int, default=1, help="same-class pairs per minibatch in the term")
    parser.add_argument("--lam", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    data = noisy_digits(noise=0.0, seed=args.seed)  # the clean digits
    images, labels = data.images, torch.as_tensor(data.true_labels)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(args.seed))
    val, train = order[:400], order[400:]
    model = small_cnn(seed=args.seed).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    generator = torch.Generator().manual_seed(args.seed + 1)

    # attach() once: hooks go on only while pair_similarity runs; the model stays as it is.
    with nnsim_hooks.attach(model, output="contrast") as h:
        for step in range(args.steps):
            batch = train[torch.randint(len(train), (args.batch_size,), generator=generator)]
            x, y = images[batch], labels[batch]
            loss = F.cross_entropy(model(x), y)
            if args.lam:
                i, j = same_class_pairs(y, args.pairs, generator)  # may raise if no class repeats
                k = h.pair_similarity(x[i], x[j], targets_a=y[i], targets_b=y[i])
                loss = loss + args.lam * (1 - k).mean()  # 1 - k pulls the pair's gradients together
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    model.eval()
    with torch.no_grad():
        accuracy = float((model(images[val]).argmax(1) == labels[val]).double().mean())
        with nnsim_hooks.attach(model, output="contrast") as h:
            i, j = same_class_pairs(labels[val], 64, torch.Generator().manual_seed(2))
            mean_k = float(h.pair_similarity(images[val][i], images[val][j], targets_a=labels[val][i],
                                             targets_b=labels[val][i]).mean())
    print(json.dumps({"steps": args.steps, "lam": args.lam, "validation_accuracy": round(accuracy, 4),
                      "mean_same_class_similarity": round(mean_k, 4)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
