"""nn.Linear: per-sample gradient ``sum_t delta_t a_t^T`` over token positions t."""

from __future__ import annotations


import torch
import torch.nn as nn
from opacus.grad_sample.linear import compute_linear_grad_sample

from .base import Grads, LayerRule
from .registry import register_rule
from .factored import factored_gram, factored_self_gram, factored_sketch


def _tokens(activation: torch.Tensor, backprops: torch.Tensor):
    """Activations ``[B, T, in]`` and backprops ``[d, B, T, out]`` (T = 1 without tokens)."""
    a = activation.reshape(activation.shape[0], -1, activation.shape[-1])
    g = backprops.reshape(backprops.shape[0], backprops.shape[1], -1, backprops.shape[-1])
    return a.to(g.dtype), g


@register_rule(nn.Linear)
class LinearRule(LayerRule):
    name = "linear"

    def grad_sample(self, module: nn.Linear, activation, backprops) -> Grads:
        out: Grads = {}
        d = backprops.shape[0]
        # Opacus's rule, once per differentiated output.
        per_output = [compute_linear_grad_sample(module, [activation], backprops[j]) for j in range(d)]
        for name, param in module.named_parameters(recurse=False):
            if param.requires_grad:
                out[name] = torch.stack([r[param] for r in per_output], dim=1)
        return out

    def gram(self, module: nn.Linear, activation, backprops) -> torch.Tensor:
        a, g = _tokens(activation, backprops)
        # [B, in, T] / [d, B, out, T]: the generic factored form used by convolutions too.
        return factored_gram(
            a.transpose(1, 2), g.transpose(2, 3), module.weight.requires_grad,
            module.bias is not None and module.bias.requires_grad,
        )

    def self_gram(self, module: nn.Linear, activation, backprops) -> torch.Tensor:
        a, g = _tokens(activation, backprops)
        return factored_self_gram(
            a.transpose(1, 2), g.transpose(2, 3), module.weight.requires_grad,
            module.bias is not None and module.bias.requires_grad,
        )

    def sketch(self, module: nn.Linear, activation, backprops, sketches) -> Grads:
        a, g = _tokens(activation, backprops)
        return factored_sketch(module, a.transpose(1, 2), g.transpose(2, 3), sketches)
