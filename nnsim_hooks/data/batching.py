"""Slicing and joining model inputs that are a tensor, a tuple of tensors or a dict, and
splitting ``0..n-1`` into consecutive ranges (batches, blocks)."""

from __future__ import annotations

from typing import Any, Iterator, Tuple

import torch


def take(inputs: Any, index) -> Any:
    if inputs is None:
        return None
    if torch.is_tensor(inputs):
        return inputs[index]
    if isinstance(inputs, dict):
        return {k: take(v, index) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(take(v, index) for v in inputs)
    return inputs


def concat(first: Any, second: Any) -> Any:
    if first is None or second is None:
        if first is None and second is None:
            return None
        raise ValueError("give targets for both sets of inputs or for neither")
    if torch.is_tensor(first):
        return torch.cat([first, torch.as_tensor(second, device=first.device)])
    if isinstance(first, dict):
        return {k: concat(first[k], second[k]) for k in first}
    if isinstance(first, (tuple, list)):
        return type(first)(concat(x, y) for x, y in zip(first, second))
    return first


def chunks(n: int, size: int) -> Iterator[Tuple[int, int]]:
    """``(start, end)`` of consecutive ranges of at most ``size`` covering ``0..n-1``."""
    for start in range(0, n, size):
        yield start, min(n, start + size)
