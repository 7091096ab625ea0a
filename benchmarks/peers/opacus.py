"""Opacus ``GradSampleModule`` per-sample gradients, then a dense Gaussian projection to
D (generated in chunks each batch: the p x D matrix is too large to hold on CPU).

Opacus's full backward hooks fail on the stock torchvision ResNet (``ReLU(inplace=True)``
and ``out += identity``), so the adapter first tries the stock model, and if that
raises, removes the in-place ops by hand (``inplace=False``, an out-of-place
``BasicBlock.forward``) and says so in the notes. Opacus only captures in train mode:
the model is put in train mode with every BatchNorm kept in eval mode (the function
stays the same), and BatchNorm parameters are frozen: Opacus has no BatchNorm rule
(it is batch-coupled in training) and its functorch fallback refuses modules with
buffers. The notes give the fraction of parameters covered.
"""

from __future__ import annotations

import types

import torch.nn as nn

from .base import Adapter, dense_gaussian_projection
from .workload import scalar


def _basic_block_forward(self, x):
    identity = x if self.downsample is None else self.downsample(x)
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    return self.relu(out + identity)


def remove_inplace_ops(model: nn.Module) -> int:
    """Out-of-place ReLU and residual sum; returns how many modules were changed."""
    import torchvision

    changed = 0
    for module in model.modules():
        if isinstance(module, nn.ReLU) and module.inplace:
            module.inplace = False
            changed += 1
        if isinstance(module, torchvision.models.resnet.BasicBlock):
            module.forward = types.MethodType(_basic_block_forward, module)
            changed += 1
    return changed


class Peer(Adapter):
    package = "opacus"
    slow = True

    def __init__(self, model, workload, dim, seed, device, sample):
        super().__init__(model, workload, dim, seed, device, sample)
        from opacus import GradSampleModule

        model.train()
        self.total = sum(p.numel() for p in model.parameters() if p.requires_grad)
        frozen = 0
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
                frozen += sum(p.numel() for p in m.parameters())
                m.requires_grad_(False)  # Opacus has no eval-mode BatchNorm rule; its fallback refuses buffers
        self.gsm = GradSampleModule(model, strict=False)
        self.notes = "BatchNorm parameters frozen (Opacus refuses BatchNorm); " if frozen else ""
        x, y = sample
        try:
            self._grads(x[:2], y[:2])
        except Exception as exc:  # noqa: BLE001 - any failure of the stock model goes in the notes
            self.gsm._close()
            changed = remove_inplace_ops(model)
            self.gsm = GradSampleModule(model, strict=False)
            self.notes = f"stock model fails ({type(exc).__name__}: {str(exc)[:80]}); in-place ops removed by hand ({changed} modules); "
        self.notes += "dense projection generated per batch"

    def _grads(self, x, y):
        self.gsm.zero_grad(set_to_none=True)
        scalar(self.gsm(x), y).sum().backward()
        return [p.grad_sample.reshape(x.shape[0], -1) for p in self.gsm.parameters()
                if p.requires_grad and getattr(p, "grad_sample", None) is not None]

    def __call__(self, x, y):
        self._parts = parts = self._grads(x, y)
        if "covered" not in self.notes:
            covered = sum(t.shape[1] for t in parts)
            self.notes += f"; {covered / self.total:.1%} of parameters covered, D = {self.dim}"
        return dense_gaussian_projection(parts, self.dim, self.seed)

    def reseeded(self, seed):
        return dense_gaussian_projection(self._parts, self.dim, seed)

    def close(self):
        self.gsm._close()
