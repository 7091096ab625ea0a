"""What tests/test_index_distributed.py and its torchrun ranks (tests/dist_worker.py) share:
the model, the data (an odd length, so the two shares differ) and the audit run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

N, DIM, BATCH = 151, 32, 16
KILL_AT = 76 + 40  # rank 1's share is 76..150: it dies in its third batch
AUDIT_N = 64


def make_cnn(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 3)
    ).eval()


def dataset() -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(N, 1, 8, 8, generator=g), torch.randint(0, 3, (N,), generator=g))


def other_dataset() -> TensorDataset:
    """Another dataset of the same length and shapes (the samples in reverse order)."""
    x, y = dataset().tensors
    return TensorDataset(x.flip(0).contiguous(), y.flip(0).contiguous())


def npy_folder(root: Path, n: int = AUDIT_N) -> Path:
    """The first ``n`` samples as an ImageFolder of .npy arrays (one sub-folder per class)."""
    x, y = dataset().tensors
    for i in range(n):
        folder = root / f"class{int(y[i])}"
        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / f"s{i:03d}.npy", x[i].numpy())
    return root


def cli_audit(data: Path, out: Path) -> int:
    """``nnsim audit`` of that folder with make_cnn (under torchrun: on every rank)."""
    from nnsim_hooks.cli.commands import main

    return main(["audit", "--data", str(data), "--model", "dist_common:make_cnn", "--out", str(out), "--k", "5",
                 "--sketch-dim", "32", "--output", "contrast", "--batch-size", "16", "--no-progress"])
