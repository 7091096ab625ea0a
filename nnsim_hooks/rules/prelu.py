"""nn.PReLU: ``y = max(0, x) + w * min(0, x)``, so ``dw = sum(delta * min(0, x))`` per channel."""

from __future__ import annotations

import torch.nn as nn

from .base import Grads, LayerRule
from .registry import register_rule


@register_rule(nn.PReLU)
class PReLURule(LayerRule):
    name = "prelu"
    differentiable = True

    def grad_sample(self, module, activation, backprops) -> Grads:
        if not module.weight.requires_grad:
            return {}
        d, b = backprops.shape[:2]
        prod = backprops * activation.to(backprops.dtype).clamp(max=0).unsqueeze(0)
        if module.num_parameters == 1:
            w = prod.reshape(d, b, -1).sum(-1, keepdim=True)
        else:
            w = prod.reshape(d, b, prod.shape[2], -1).sum(-1)
        return {"weight": w.transpose(0, 1)}
