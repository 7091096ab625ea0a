"""What tests/test_index_distributed.py and its torchrun ranks (tests/dist_worker.py) share:
the model, the data (an odd length, so the two shares differ) and the audit run."""

from __future__ import annotations

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


def audit_digits(out_dir):
    """The audit of a digits subset with an untrained small CNN (what matters here is that
    torchrun and one process give the same report)."""
    import nnsim_hooks
    from nnsim_hooks.audit import demo

    data = demo.noisy_digits(0.1, seed=0, limit=AUDIT_N)
    model = demo.small_cnn(width=4, seed=0).eval()
    return nnsim_hooks.audit(model, data.dataset(), out_dir=out_dir, k=5, progress=False, batch_size=32,
                             sketch_dim=64, output="contrast")
