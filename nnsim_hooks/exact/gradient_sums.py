"""Weighted sums of per-sample gradients, and each sample's inner product with them.

The exact dataset-scale queries (:mod:`nnsim_hooks.exact.dataset_kernel`) need, for K mixing
weights ``W [B, d, K]`` (d differentiated outputs per sample),

- the accumulators ``S_k = sum_j sum_m W[j, m, k] g_{j,m}`` (one per k, the shape of each
  parameter): for a layer whose gradient is ``sum_u delta_u a_u^T`` this is just the weight
  gradient of a backward whose output gradients were mixed by W, one matmul (a
  convolution's weight gradient), never a per-sample gradient;
- the products ``P[i, m, k] = g_{i,m} . S_k``: for such a layer ``sum_u delta_{i,u} .
  (S_k a_{i,u})``, the layer's own forward run with the weight S_k (a "ghost" product).

Layers without such a form here (norms, PReLU, transposed convolutions, generic-rule
modules) materialise their per-sample gradients, one module at a time.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..rules.base import Grads, dots_of_grads, sums_of_grads  # noqa: F401 - part of this module's API
from ..rules.conv import ConvRule, pad_like_layer
from ..rules.embedding import EmbeddingRule
from ..rules.attention import MultiheadAttentionRule
from ..rules.factored import mix, per_sample_dots  # noqa: F401 - mix is part of this module's API
from ..rules.linear import LinearRule

_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_WEIGHT = {1: torch.nn.grad.conv1d_weight, 2: torch.nn.grad.conv2d_weight, 3: torch.nn.grad.conv3d_weight}


def _wants(module: nn.Module, name: str) -> bool:
    p = getattr(module, name, None)
    return isinstance(p, torch.Tensor) and p.requires_grad


# -- nn.Linear -------------------------------------------------------------------------


def _linear_factors(activation, backprops):
    a = activation.reshape(activation.shape[0], -1, activation.shape[-1])
    g = backprops.reshape(backprops.shape[0], backprops.shape[1], -1, backprops.shape[-1])
    return a.to(g.dtype), g  # [B, T, in], [d, B, T, out]


def _linear_sums(module, activation, backprops, weights) -> Grads:
    a, g = _linear_factors(activation, backprops)
    r = mix(g, weights)  # [K, B, T, out]
    out: Grads = {}
    if _wants(module, "weight"):
        out["weight"] = torch.einsum("kbto,bti->koi", r, a)
    if _wants(module, "bias"):
        out["bias"] = r.sum((1, 2))
    return out


def _linear_dots(module, activation, backprops, sums) -> torch.Tensor:
    a, g = _linear_factors(activation, backprops)
    y = 0
    if "weight" in sums:  # the layer's forward with the weights S_k: [K, B, T, out]
        y = torch.matmul(a.unsqueeze(0), sums["weight"].to(g.dtype).transpose(1, 2).unsqueeze(1))
    if "bias" in sums:
        y = y + sums["bias"].to(g.dtype)[:, None, None, :]
    return per_sample_dots(g, y) if torch.is_tensor(y) else None


# -- convolutions (any groups, any padding mode) ----------------------------------------


def _conv_sums(module, activation, backprops, weights) -> Grads:
    n = len(module.kernel_size)
    x, padding = pad_like_layer(activation.to(backprops.dtype), module)
    r = mix(backprops, weights)  # [K, B, out, *L]
    out: Grads = {}
    if _wants(module, "weight"):
        out["weight"] = torch.stack([
            _CONV_WEIGHT[n](x, module.weight.shape, rk, module.stride, padding, module.dilation, module.groups)
            for rk in r
        ])
    if _wants(module, "bias"):
        out["bias"] = r.reshape(r.shape[0], r.shape[1], r.shape[2], -1).sum((1, 3))
    return out


def _conv_dots(module, activation, backprops, sums) -> torch.Tensor:
    n = len(module.kernel_size)
    x, padding = pad_like_layer(activation.to(backprops.dtype), module)
    d, b, c = backprops.shape[:3]
    k = next(iter(sums.values())).shape[0]
    conv = _CONV_FN[n]
    ys = []
    for j in range(k):
        w = sums["weight"][j].to(x.dtype) if "weight" in sums else None
        bias = sums["bias"][j].to(x.dtype) if "bias" in sums else None
        if w is None:  # bias only: the product is delta summed over positions, dotted with S_b
            ys.append(bias.view(1, c, 1).expand(b, c, backprops[0, 0, 0].numel()))
            continue
        ys.append(conv(x, w, bias, module.stride, padding, module.dilation, module.groups).reshape(b, c, -1))
    y = torch.stack(ys)  # [K, B, out, L]
    return torch.einsum("mbcl,kbcl->bmk", backprops.reshape(d, b, c, -1), y)


# -- nn.Embedding ------------------------------------------------------------------------


def _embedding_factors(module, activation, backprops):
    b = activation.shape[0]
    ids = activation.reshape(b, -1).long()
    g = backprops.reshape(backprops.shape[0], b, -1, module.embedding_dim)
    if module.padding_idx is not None:
        g = g * (ids != module.padding_idx).unsqueeze(0).unsqueeze(-1).to(g.dtype)
    return ids, g  # [B, T], [d, B, T, E]


def _embedding_sums(module, activation, backprops, weights) -> Grads:
    if not _wants(module, "weight"):
        return {}
    ids, g = _embedding_factors(module, activation, backprops)
    r = mix(g, weights)  # [K, B, T, E]
    k = r.shape[0]
    table = torch.zeros(k, *module.weight.shape, dtype=r.dtype, device=r.device)
    table.index_add_(1, ids.reshape(-1), r.reshape(k, -1, module.embedding_dim))
    return {"weight": table}


def _embedding_dots(module, activation, backprops, sums) -> Optional[torch.Tensor]:
    if "weight" not in sums:
        return None
    ids, g = _embedding_factors(module, activation, backprops)
    rows = sums["weight"].to(g.dtype)[:, ids]  # [K, B, T, E]
    return torch.einsum("mbte,kbte->bmk", g, rows)


Sums = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], Grads]
Dots = Callable[[nn.Module, torch.Tensor, torch.Tensor, Grads], Optional[torch.Tensor]]

#: By exact rule class: a rule replaced by an integration falls back to materialising.
FACTORED: Dict[type, Tuple[Sums, Dots]] = {
    LinearRule: (_linear_sums, _linear_dots),
    ConvRule: (_conv_sums, _conv_dots),
    EmbeddingRule: (_embedding_sums, _embedding_dots),
    # attention has its own factored form (a rule of the whole call: see its sums / dots)
    MultiheadAttentionRule: (MultiheadAttentionRule().sums, MultiheadAttentionRule().dots),
}


# -- one call of a fast rule (materialising where there is no factored form) ---------------


def rule_sums(rule, module, activation, backprops, weights) -> Grads:
    """The accumulators of one call of a module on a fast rule."""
    fns = FACTORED.get(type(rule))
    if fns is not None and fns[0] is not None:
        return fns[0](module, activation, backprops, weights)
    return sums_of_grads(rule.grad_sample(module, activation, backprops), weights)


def rule_dots(rule, module, activation, backprops, sums: Grads) -> Optional[torch.Tensor]:
    """``[B, d, K]`` products of one call's per-sample gradients with the accumulators
    ``sums`` (keyed by the module's local parameter names; absent ones count as zero)."""
    if not sums:
        return None
    fns = FACTORED.get(type(rule))
    if fns is not None:
        return fns[1](module, activation, backprops, sums)
    return dots_of_grads(rule.grad_sample(module, activation, backprops), sums)
