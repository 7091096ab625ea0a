"""Error of a peer's projected cosine, over that of an ideal dense Gaussian projection.

- ``exact_cosines``: the cosine between exact per-sample gradients (all trainable
  parameters), from a per-sample autograd loop in float64: the oracle.
- ``projected_mae``: mean |projected cosine - exact cosine| over all pairs i < j.
- ``ideal_mae``: the same for an ideal dense Gaussian projection of the exact gradients
  to D. Projecting gradients ``g_i`` with a Gaussian ``P`` gives rows ``G P`` that are
  jointly Gaussian with covariance ``Gram (x) I_D``, so it is simulated exactly, and
  cheaply, as ``chol(Gram) @ Z`` with ``Z ~ N(0, 1)^{n x D}``.
- ``error_ratio``: a peer's MAE (averaged over its seeds) over the ideal MAE (averaged
  over many draws). 1.0 is as good as a dense Gaussian projection; more is worse.
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch
import torch.nn as nn


def cosine_matrix(rows: torch.Tensor) -> torch.Tensor:
    rows = rows.double()
    rows = rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-300)
    return rows @ rows.T


def pair_mae(cos_a: torch.Tensor, cos_b: torch.Tensor) -> float:
    """Mean absolute difference over all pairs i < j (the diagonal is 1 for both)."""
    n = cos_a.shape[0]
    iu = torch.triu_indices(n, n, 1)
    return (cos_a.double() - cos_b.double())[iu[0], iu[1]].abs().mean().item()


def projected_mae(features: torch.Tensor, exact_cos: torch.Tensor) -> float:
    return pair_mae(cosine_matrix(features), exact_cos)


def ideal_mae(exact_cos: torch.Tensor, dim: int, draws: int = 40) -> float:
    """Expected MAE of an ideal dense Gaussian projection of the exact gradients to ``dim``."""
    n = exact_cos.shape[0]
    gram = exact_cos.double()
    chol = torch.linalg.cholesky(gram + 1e-10 * torch.eye(n, dtype=gram.dtype))
    maes = []
    for r in range(draws):
        z = torch.randn(n, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(10_000 + r))
        maes.append(projected_mae(chol @ z, gram))
    return sum(maes) / len(maes)


def error_ratio(features_per_seed: Sequence[torch.Tensor], exact_cos: torch.Tensor, dim: int, draws: int = 40) -> float:
    """Mean projected MAE over the seeds, divided by the ideal MAE at ``dim``."""
    if not features_per_seed:
        raise ValueError("error_ratio needs the features of at least one seed")
    mine = sum(projected_mae(f, exact_cos) for f in features_per_seed) / len(features_per_seed)
    return mine / ideal_mae(exact_cos, dim, draws)


def exact_cosines(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    scalar: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    progress: bool = False,
) -> torch.Tensor:
    """Cosine matrix of the exact per-sample gradients of ``scalar(model(x_i), y_i)``
    over all trainable parameters, from a per-sample loop in float64.

    Each sample's gradient is computed in float64 and kept in float32 (64 resnet18
    gradients are 2.9 GB even so); the Gram matrix is accumulated in float64. The
    float32 rounding moves cosines by about 1e-7, far below any projection error.
    """
    model = model.double()
    params = [p for p in model.parameters() if p.requires_grad]
    total = sum(p.numel() for p in params)
    n = x.shape[0]
    grads = torch.empty(n, total, dtype=torch.float32)
    steps: Iterable[int] = range(n)
    if progress:
        from tqdm import tqdm

        steps = tqdm(steps, desc="exact per-sample gradients", leave=False)
    for i in steps:
        out = model(x[i : i + 1].double())
        g = torch.autograd.grad(scalar(out, y[i : i + 1])[0], params)
        grads[i] = torch.cat([t.reshape(-1) for t in g]).float()
    gram = torch.zeros(n, n, dtype=torch.float64)
    for start in range(0, total, 1 << 20):
        block = grads[:, start : start + (1 << 20)].double()
        gram += block @ block.T
    model.float()
    norms = gram.diagonal().sqrt().clamp_min(1e-300)
    return gram / norms[:, None] / norms[None, :]
