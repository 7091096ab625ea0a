"""A per-sample autograd loop: the oracle for the layer tests.

Nothing here uses nnsim_hooks: each sample goes through the model alone, and
``torch.autograd.grad`` gives its gradient. Slow, but it needs no ``vmap`` support
from the layer and takes any input the model takes (tuples of ids and offsets, ...).
"""

from __future__ import annotations

from typing import Any, Callable, Dict

import torch
import torch.nn as nn


class Head(nn.Module):
    """``layer`` then a fixed nonlinearity, so that the output gradient varies by position."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, *args):
        return torch.tanh(self.layer(*args))


def take(inputs: Any, i: int) -> Any:
    """Sample ``i`` of a batch (a tensor, or a tuple of batch-first tensors), kept ``[1, ...]``."""
    if torch.is_tensor(inputs):
        return inputs[i : i + 1]
    return tuple(t[i : i + 1] if torch.is_tensor(t) else t for t in inputs)


def call(model: nn.Module, inputs: Any):
    return model(*inputs) if isinstance(inputs, tuple) else model(inputs)


def batch_size(inputs: Any) -> int:
    return (inputs if torch.is_tensor(inputs) else inputs[0]).shape[0]


def loop_per_sample_grads(
    model: nn.Module, inputs: Any, value_fn: Callable[[Any], torch.Tensor]
) -> Dict[str, torch.Tensor]:
    """``{name: [B, d, *shape]}`` for the trainable parameters, in ``named_parameters()``
    order; ``value_fn(outputs)`` gives ``[1, d]`` for a batch of one sample."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    rows = []
    for i in range(batch_size(inputs)):
        values = value_fn(call(model, take(inputs, i)))
        assert values.shape[0] == 1 and values.dim() == 2, f"value_fn must give [1, d], got {tuple(values.shape)}"
        per_value = []
        for j in range(values.shape[1]):
            grads = torch.autograd.grad(values[0, j], list(params.values()), retain_graph=True, allow_unused=True)
            per_value.append([torch.zeros_like(p) if g is None else g for g, p in zip(grads, params.values())])
        rows.append([torch.stack([v[k] for v in per_value]) for k in range(len(params))])
    return {name: torch.stack([r[k] for r in rows]) for k, name in enumerate(params)}


def weighted_outputs(weights: torch.Tensor) -> Callable[..., torch.Tensor]:
    """An output function ``[B, *out] -> [B, d]``: fixed random weights ``[d, *out]`` over
    every output position, so that each position gets its own gradient."""

    def values(outputs, targets=None):
        return torch.einsum("b...,d...->bd", outputs, weights)

    return values
