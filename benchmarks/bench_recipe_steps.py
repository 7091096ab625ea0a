"""Which step of ``--train``'s recipe lets the fold models learn the classes: a 5-fold
held-out run on one data set of the label-issue benchmark, one variant per call.

    OMP_NUM_THREADS=1 python benchmarks/bench_recipe_steps.py DATASET VARIANT

``VARIANT`` is dash-separated: ``flip``, ``shift``, ``chan`` (the transforms of
:mod:`nnsim_hooks.audit.augment`), ``cos`` (cosine decay of the learning rate), ``b64``
(batches of 64 instead of the data set's own), ``eE`` (E epochs; required), ``none``
(nothing). Prints the out-of-fold accuracy on the clean samples and cleanlab's AUROC on
the out-of-fold probabilities. The numbers quoted in ``results/label_issues.md`` (Reading):
``textures flip-shift-b64-e40``, ``textures flip-shift-cos-b64-e40``, ``textures
flip-shift-cos-e40``, ``shapes none-e20``, ``shapes flip-shift-chan-e20``, ``shapes
flip-shift-chan-cos-e80``.
"""

import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_label_issues as B  # noqa: E402

from nnsim_hooks.audit.augment import augment_batch  # noqa: E402


def main(name: str, variant: str) -> None:
    from cleanlab.rank import get_label_quality_scores
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold

    parts = variant.split("-")
    transforms = tuple(t for t, key in (("flip", "flip"), ("shift", "shift"), ("channels", "chan")) if key in parts)
    epochs = int(next(p for p in parts if p.startswith("e"))[1:])
    case = B.CASES[name](0)

    def train(rows, seed):
        model = case.make_model(seed)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
        decay = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs) if "cos" in parts else None
        g = torch.Generator().manual_seed(seed)
        x, y = case.inputs[rows], torch.as_tensor(case.labels[rows])
        for _ in range(epochs):
            model.train()
            for b in torch.randperm(len(rows), generator=g).split(64 if "b64" in parts else case.batch_size):
                if len(b) < 2:
                    continue
                loss = F.cross_entropy(model(augment_batch(x[b], transforms, g)), y[b])
                opt.zero_grad()
                loss.backward()
                opt.step()
            if decay is not None:
                decay.step()
        return model.eval()

    started = time.time()
    probs = np.zeros((len(case.labels), int(case.labels.max()) + 1))
    split = StratifiedKFold(5, shuffle=True, random_state=0).split(case.labels, case.labels)
    for k, (train_rows, test_rows) in enumerate(split):
        probs[test_rows] = B.probabilities(train(train_rows, k), case.inputs[test_rows])
    clean = ~case.flipped
    accuracy = np.mean(probs.argmax(1)[clean] == case.labels[clean])
    auroc = roc_auc_score(case.flipped, -get_label_quality_scores(case.labels, probs))
    print(f"{name} {variant}: held-out accuracy on the clean samples {accuracy:.3f}, cleanlab AUROC {auroc:.3f} "
          f"({time.time() - started:.0f} s)")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
