"""Audit a timm classifier on an ImageFolder, end to end on data this script generates.

1. writes an ImageFolder of PNGs (two shapes), with a few images filed under the wrong
   class (planted label errors) and one exact duplicate;
2. trains a small timm model on it for a few epochs and saves its weights;
3. runs the command line a user would run on their own folder and checkpoint:

       nnsim audit --data DIR --model timm:resnet10t --num-classes 2 --checkpoint W.pt --out OUT

and prints which planted errors the audit flags.

    python examples/timm_imagefolder_audit.py --out /tmp/timm-audit     (a few minutes on 2 CPU cores)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _train import train  # noqa: E402

from nnsim_hooks.cli import commands as cli  # noqa: E402
from nnsim_hooks.integrations import load_dataset, load_model  # noqa: E402
from nnsim_hooks.integrations.synthetic import make_image_folder  # noqa: E402


def plant_label_errors(root: str, count: int) -> list:
    """Move the first ``count`` images of class 'circle' into 'square'."""
    moved = []
    circles = sorted(os.listdir(os.path.join(root, "circle")))
    for name in [n for n in circles if n.startswith("circle_")][:count]:
        target = os.path.join(root, "square", name)
        shutil.move(os.path.join(root, "circle", name), target)
        moved.append(target)
    return moved


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="timm-audit-example", help="working folder (data, weights, audit)")
    parser.add_argument("--model", default="timm:resnet10t")
    parser.add_argument("--per-class", type=int, default=30)
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args(argv)

    data = os.path.join(args.out, "images")
    shutil.rmtree(args.out, ignore_errors=True)
    make_image_folder(data, classes=("circle", "square"), per_class=args.per_class, size=(48, 48), duplicates=1)
    planted = plant_label_errors(data, count=max(2, args.per_class // 10))
    print(f"wrote {data}: {2 * args.per_class + 1} images, {len(planted)} filed under the wrong class")

    # Train on the data exactly as the audit will read it: timm's data config for this
    # model (224 px, its mean and std), through timm's own evaluation transform.
    loaded = load_model(args.model, num_classes=2)
    dataset = load_dataset(data, loaded)
    accuracy = train(loaded.model, dataset, epochs=args.epochs)
    weights = os.path.join(args.out, "weights.pt")
    torch.save(loaded.model.state_dict(), weights)
    print(f"trained {args.model}: training accuracy {accuracy:.0%} (noisy labels), weights in {weights}")

    # The audit as a user runs it on their own folder and weights.
    out = os.path.join(args.out, "audit")
    code = cli.main(["audit", "--data", data, "--model", args.model, "--num-classes", "2", "--checkpoint", weights,
                     "--out", out, "--k", "8", "--no-progress"])
    if code != 0:
        return code
    import pandas as pd

    table = pd.read_csv(os.path.join(out, "table.csv"))
    paths = dataset.paths
    flagged = {paths[i] for i in table.index[table["is_label_issue"]]}
    found = [p for p in planted if p in flagged]
    print(f"planted label errors flagged: {len(found)} of {len(planted)}; flags in total: {len(flagged)}")
    print(json.dumps({"report": os.path.abspath(os.path.join(out, "report.html"))}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
