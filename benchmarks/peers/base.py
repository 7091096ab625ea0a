"""What an adapter is: one peer package doing the same work as ``nnsim_hooks.features``.

An adapter is built once per sketch seed on a fresh copy of the workload's model (some
peers modify the model: LoGra adds LoRA modules, Opacus wraps it), then called on the
batch: ``adapter(x, y)`` returns the peer's projected per-sample gradients ``[B, D']`` of
``workload.scalar(model(x), y)``. Set-up (hooks, projection matrices a peer keeps)
happens in ``__init__`` and is not timed; the call is.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn


class Adapter:
    package: Optional[str] = None  # the distribution whose version the table shows
    slow: bool = False  # one timed repeat and fewer seeds

    def __init__(self, model: nn.Module, workload: str, dim: int, seed: int, device: str,
                 sample: Tuple[torch.Tensor, torch.Tensor]) -> None:
        self.model = model
        self.workload = workload
        self.dim = dim
        self.seed = seed
        self.device = device
        self.notes = ""

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def reseeded(self, seed: int) -> Optional[torch.Tensor]:
        """The last batch's gradients projected with another seed, for peers whose
        gradients do not depend on the seed (so the error is averaged over seeds
        without recomputing them); ``None``: build a new adapter for that seed."""
        return None

    def close(self) -> None:
        """Remove hooks etc.; the model is thrown away after each seed anyway."""


class Unsupported(Exception):
    """The peer cannot do this workload; the message says why (it goes in the table)."""


def dense_gaussian_projection(flat_parts, dim: int, seed: int, chunk_rows: int = 1 << 18) -> torch.Tensor:
    """``[B, p] @ P`` with ``P`` a ``p x dim`` standard Gaussian, generated in row chunks
    (the whole matrix is too large to hold: 45 GB for resnet18 at D = 1024) from one
    CPU generator, so any device gives the same matrix. ``flat_parts`` is a list of
    ``[B, p_k]`` tensors, concatenated along the columns."""
    gen = torch.Generator().manual_seed(seed)
    out = None
    for part in flat_parts:
        for start in range(0, part.shape[1], chunk_rows):
            block = part[:, start : start + chunk_rows]
            proj = torch.randn(block.shape[1], dim, generator=gen).to(block.device, block.dtype)
            term = block @ proj
            out = term if out is None else out + term
    return out
