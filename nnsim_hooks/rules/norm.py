"""Normalisation layers with affine parameters: BatchNorm (eval), LayerNorm, GroupNorm,
InstanceNorm, RMSNorm. Their parameters are vectors, so per-sample gradients are cheap
to materialise: ``weight`` gets ``sum(delta * x_hat)`` and ``bias`` gets ``sum(delta)``
over every dimension but the channel ones."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from opacus.grad_sample.group_norm import compute_group_norm_grad_sample
from opacus.grad_sample.layer_norm import compute_layer_norm_grad_sample
from opacus.grad_sample.rms_norm import compute_rms_norm_grad_sample

from ..errors import BatchCouplingError
from .base import Grads, LayerRule
from .registry import register_rule


def _per_output(module, activation, backprops, sampler) -> Grads:
    """Run an Opacus sampler once per differentiated output; stack to ``[B, d, ...]``."""
    results = [sampler(module, [activation.to(backprops.dtype)], backprops[j]) for j in range(backprops.shape[0])]
    out: Grads = {}
    for name, param in module.named_parameters(recurse=False):
        if param.requires_grad:
            out[name] = torch.stack([r[param] for r in results], dim=1)
    return out


def _channel_sums(module, normalized: torch.Tensor, backprops: torch.Tensor) -> Grads:
    """weight: sum over non-channel dims of delta * x_hat; bias: of delta. Channel dim = 1."""
    d, b = backprops.shape[:2]
    out: Grads = {}
    if module.weight is not None and module.weight.requires_grad:
        prod = (backprops * normalized.unsqueeze(0)).reshape(d, b, backprops.shape[2], -1)
        out["weight"] = prod.sum(-1).transpose(0, 1)
    if module.bias is not None and module.bias.requires_grad:
        out["bias"] = backprops.reshape(d, b, backprops.shape[2], -1).sum(-1).transpose(0, 1)
    return out


def uses_batch_statistics(module: nn.modules.batchnorm._NormBase) -> bool:
    """True when a BatchNorm normalises with the batch's own statistics (mixing samples)."""
    return module.training or module.running_mean is None


@register_rule(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
class BatchNormRule(LayerRule):
    name = "batchnorm_eval"
    differentiable = True

    def check(self, module, module_name):
        if uses_batch_statistics(module):
            raise BatchCouplingError(batch_coupling_message(module_name, module))

    def grad_sample(self, module, activation, backprops) -> Grads:
        x = activation.to(backprops.dtype)
        shape = [1, -1] + [1] * (x.dim() - 2)
        mean = module.running_mean.to(x.dtype).view(shape)
        var = module.running_var.to(x.dtype).view(shape)
        return _channel_sums(module, (x - mean) / torch.sqrt(var + module.eps), backprops)


def batch_coupling_message(module_name: str, module: nn.Module) -> str:
    why = "is in training mode" if module.training else "has no running statistics (track_running_stats=False)"
    return (
        f"module '{module_name}' ({type(module).__name__}) {why}, so it normalises with the statistics "
        "of the whole batch and mixes the samples: per-sample gradients are not defined. "
        "Call model.eval() before computing similarities"
        + ("" if module.training else ", or use a norm that works per sample (GroupNorm, LayerNorm)")
        + "."
    )


@register_rule(nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
class InstanceNormRule(LayerRule):
    name = "instancenorm"
    differentiable = True

    def grad_sample(self, module, activation, backprops) -> Grads:
        x = activation.to(backprops.dtype)
        if module.track_running_stats and not module.training:
            # Opacus's sampler always uses instance statistics; in eval with running
            # statistics, the layer uses those instead.
            normalized = F.instance_norm(x, module.running_mean, module.running_var, eps=module.eps, use_input_stats=False)
        else:
            normalized = F.instance_norm(x, eps=module.eps)
        return _channel_sums(module, normalized, backprops)


@register_rule(nn.GroupNorm)
class GroupNormRule(LayerRule):
    name = "groupnorm"
    differentiable = True

    def grad_sample(self, module, activation, backprops) -> Grads:
        return _per_output(module, activation, backprops, compute_group_norm_grad_sample)


@register_rule(nn.LayerNorm)
class LayerNormRule(LayerRule):
    name = "layernorm"
    differentiable = True

    def grad_sample(self, module, activation, backprops) -> Grads:
        if module.bias is not None and module.weight is not None:
            return _per_output(module, activation, backprops, compute_layer_norm_grad_sample)
        # Opacus assumes both affine parameters exist; LayerNorm(bias=False) does not have one.
        x = activation.to(backprops.dtype)
        normalized = F.layer_norm(x, module.normalized_shape, eps=module.eps)
        n = len(module.normalized_shape)
        dims = tuple(range(2, backprops.dim() - n))
        # No dims to sum when the normalised shape covers every non-batch dimension, and
        # torch reads .sum(()) as "sum everything".
        over_tokens = (lambda t: t.sum(dims)) if dims else (lambda t: t)
        out: Grads = {}
        if module.weight is not None and module.weight.requires_grad:
            out["weight"] = over_tokens(backprops * normalized.unsqueeze(0)).transpose(0, 1)
        if module.bias is not None and module.bias.requires_grad:
            out["bias"] = over_tokens(backprops).transpose(0, 1)
        return out


if hasattr(nn, "RMSNorm"):

    @register_rule(nn.RMSNorm)
    class RMSNormRule(LayerRule):
        name = "rmsnorm"
        differentiable = True

        def grad_sample(self, module, activation, backprops) -> Grads:
            return _per_output(module, activation, backprops, compute_rms_norm_grad_sample)
