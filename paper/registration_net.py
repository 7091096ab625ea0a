"""The registration network of ``paper.registration``: a small U-Net from (image, map) to a
dense 2-D displacement field, its training, and the d = 2 output the paper's kernel uses."""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

#: Channels per level of the default U-Net: 122,754 parameters, far more than N·d.
WIDTHS = (8, 16, 32, 64)


def conv_block(cin: int, cout: int) -> nn.Sequential:
    """Two 3×3 convolutions, each followed by a GroupNorm (per sample, unlike BatchNorm: it
    keeps each sample's gradient its own) and a ReLU."""
    groups = math.gcd(4, cout)
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(groups, cout), nn.ReLU(),
                         nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(groups, cout), nn.ReLU())


class UNet(nn.Module):
    """Encoder (average pooling between levels), decoder (nearest upsampling, skip
    connections), a 1×1 head to 2 channels: the displacement along x and y, in px."""

    def __init__(self, widths: Sequence[int] = WIDTHS, in_channels: int = 2):
        super().__init__()
        w = list(widths)
        self.down = nn.ModuleList([conv_block(in_channels, w[0])] + [conv_block(a, b) for a, b in zip(w, w[1:])])
        self.up = nn.ModuleList([conv_block(b + a, a) for a, b in zip(w, w[1:])])
        self.head = nn.Conv2d(w[0], 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for level, block in enumerate(self.down):
            x = block(F.avg_pool2d(x, 2) if level else x)
            skips.append(x)
        for level in reversed(range(len(self.up))):
            x = F.interpolate(x, scale_factor=2, mode="nearest")
            x = self.up[level](torch.cat([x, skips[level]], 1))
        return self.head(x)


class PatchMean(nn.Module):
    """The network's output averaged over the patch, [B, 2]: the d = 2 output whose Jacobian
    gives the authors' kernel (they sum each displacement channel over the output patch; the
    mean differs by a constant factor, to which the factor and the averages are blind)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).mean((2, 3))


def make_unet(seed: int, widths: Sequence[int] = WIDTHS) -> UNet:
    torch.manual_seed(seed)
    return UNet(widths)


def train(x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int, widths: Sequence[int] = WIDTHS,
          lr: float = 3e-3, batch: int = 16, log_every: int = 0) -> UNet:
    """Squared error on the dense field (the loss under which the prediction is the kernel
    average of the labels, the paper's §3), Adam with a one-cycle schedule. The same
    ``seed`` gives the same initial weights and batch order, whatever the labels."""
    net = make_unet(seed, widths)
    steps = epochs * (len(x) // batch)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=max(steps, 1))
    gen = torch.Generator().manual_seed(seed + 1)
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for s in range(0, len(x) - batch + 1, batch):
            idx = order[s:s + batch]
            loss = ((net(x[idx]) - y[idx]) ** 2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if log_every and (epoch + 1) % log_every == 0:
            print(f"epoch {epoch + 1}: squared error {loss.item():.3f} px²", flush=True)
    return net.eval()


@torch.no_grad()
def predict(net: nn.Module, x: torch.Tensor, batch: int = 256) -> torch.Tensor:
    return torch.cat([net(x[s:s + batch]) for s in range(0, len(x), batch)])
