"""nn.Linear: per-sample gradient ``sum_t delta_t a_t^T`` over token positions t."""

from __future__ import annotations


import torch
import torch.nn as nn
from opacus.grad_sample.linear import compute_linear_grad_sample

from .base import Grads, LayerRule, trains
from .factored import mix, per_sample_dots
from .registry import register_rule


def _tokens(activation: torch.Tensor, backprops: torch.Tensor):
    """Activations ``[B, T, in]`` and backprops ``[d, B, T, out]`` (T = 1 without tokens)."""
    a = activation.reshape(activation.shape[0], -1, activation.shape[-1])
    g = backprops.reshape(backprops.shape[0], backprops.shape[1], -1, backprops.shape[-1])
    return a.to(g.dtype), g


@register_rule(nn.Linear)
class LinearRule(LayerRule):
    """Gram, self-Gram and sketch come from :meth:`factors` (the base class's factored
    forms); the weighted sums and products have their own token-major form here."""

    name = "linear"
    differentiable = True

    def grad_sample(self, module: nn.Linear, activation, backprops) -> Grads:
        out: Grads = {}
        d = backprops.shape[0]
        # Opacus's rule, once per differentiated output.
        per_output = [compute_linear_grad_sample(module, [activation], backprops[j]) for j in range(d)]
        for name, param in module.named_parameters(recurse=False):
            if param.requires_grad:
                out[name] = torch.stack([r[param] for r in per_output], dim=1)
        return out

    def factors(self, module: nn.Linear, activation, backprops):
        a, g = _tokens(activation, backprops)
        return a.transpose(1, 2), g.transpose(2, 3)  # [B, in, T], [d, B, out, T]

    def sums(self, module, activation, backprops, weights) -> Grads:
        a, g = _tokens(activation, backprops)
        r = mix(g, weights)  # [K, B, T, out]
        out: Grads = {}
        if trains(module, "weight"):
            out["weight"] = torch.einsum("kbto,bti->koi", r, a)
        if trains(module, "bias"):
            out["bias"] = r.sum((1, 2))
        return out

    def dots(self, module, activation, backprops, sums):
        a, g = _tokens(activation, backprops)
        y = 0
        if "weight" in sums:  # the layer's forward with the weights S_k: [K, B, T, out]
            y = torch.matmul(a.unsqueeze(0), sums["weight"].to(g.dtype).transpose(1, 2).unsqueeze(1))
        if "bias" in sums:
            y = y + sums["bias"].to(g.dtype)[:, None, None, :]
        return per_sample_dots(g, y) if torch.is_tensor(y) else None
