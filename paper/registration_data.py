"""Generated registration patches for ``paper.registration``: an image of textured shapes on a
varied background, a "map" of the same shapes drawn misaligned by a smooth displacement
field, that field (the truth) and a label-noise field of up to 4 px (the paper, §5).

Everything is generated from one seed, vectorised over the patches; no file is read.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

PATCH = 32
MAX_SHIFT = 5.0  # px, largest true displacement component
MAX_NOISE = 4.0  # px, largest label-noise component, as the paper's misaligned labels


class Patches(NamedTuple):
    """``x`` [n, 2, P, P] (image, map); ``truth`` and ``noise`` [n, 2, P, P] displacement fields
    in px (channel 0 along x, 1 along y); ``objects`` [n, P, P] bool, the shapes' pixels in the
    image (where the displacement can be seen, and where accuracy is measured)."""

    x: torch.Tensor
    truth: torch.Tensor
    noise: torch.Tensor
    objects: torch.Tensor


def grid() -> torch.Tensor:
    """Pixel centres [2, P, P] (x, y) in px, centred on the patch."""
    c = torch.arange(PATCH, dtype=torch.float32) - (PATCH - 1) / 2
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    return torch.stack([xx, yy])


def affine_field(gen: torch.Generator, n: int, offset: float, slope: float) -> torch.Tensor:
    """Smooth fields [n, 2, P, P]: a random offset of up to ``offset`` px plus a random linear
    map of the position with entries of up to ``slope`` px per half patch, so at most
    ``offset + 2 * slope`` px per component."""
    g = grid() / (PATCH / 2)
    t0 = (2 * torch.rand(n, 2, generator=gen) - 1) * offset
    lin = (2 * torch.rand(n, 2, 2, generator=gen) - 1) * slope
    return t0[:, :, None, None] + torch.einsum("nab,bhw->nahw", lin, g)


def smooth_noise(gen: torch.Generator, n: int, cells: int) -> torch.Tensor:
    """Random texture [n, P, P] in about [-1, 1], smooth over ``PATCH / cells`` px."""
    coarse = torch.randn(n, 1, cells, cells, generator=gen)
    return torch.nn.functional.interpolate(coarse, size=(PATCH, PATCH), mode="bicubic", align_corners=False)[:, 0]


def shape_mask(kind, centre, half, angle, at: torch.Tensor) -> torch.Tensor:
    """Soft masks [n, P, P] of rotated rectangles (kind 0) or ellipses (kind 1), evaluated at the
    positions ``at`` [n, 2, P, P]; 1 px of soft edge so that sub-pixel shifts show."""
    d = at - centre[:, :, None, None]
    cos, sin = torch.cos(angle)[:, None, None], torch.sin(angle)[:, None, None]
    u = cos * d[:, 0] + sin * d[:, 1]
    v = -sin * d[:, 0] + cos * d[:, 1]
    hu, hv = half[:, 0, None, None], half[:, 1, None, None]
    rect = torch.sigmoid((hu - u.abs()) / 0.5) * torch.sigmoid((hv - v.abs()) / 0.5)
    radius = torch.sqrt((u / hu) ** 2 + (v / hv) ** 2)
    ellipse = torch.sigmoid((1 - radius) * torch.minimum(hu, hv) / 0.5)
    return torch.where(kind[:, None, None] == 0, rect, ellipse)


def background(gen: torch.Generator, level: torch.Tensor) -> torch.Tensor:
    """Varied backgrounds [n, P, P] around ``level`` [n, 1, 1]: a gradient, coarse and fine
    texture of random strengths."""
    g = grid() / (PATCH / 2)
    n = len(level)
    slope = 0.15 * torch.randn(n, 2, generator=gen)
    ramp = torch.einsum("nb,bhw->nhw", slope, g)
    coarse = 0.15 * torch.rand(n, 1, 1, generator=gen) * smooth_noise(gen, n, 4)
    fine = 0.08 * torch.rand(n, 1, 1, generator=gen) * smooth_noise(gen, n, 16)
    return level + ramp + coarse + fine


def texture(gen: torch.Generator, level: torch.Tensor) -> torch.Tensor:
    """Object fills [n, P, P]: darker or lighter than the background's ``level`` [n, 1, 1] by
    0.4 to 0.8, with stripes of random period and direction, or blotches."""
    g = grid()
    n = len(level)
    sign = torch.where(torch.rand(n, 1, 1, generator=gen) < 0.5, -1.0, 1.0)
    bright = level + sign * (0.4 + 0.4 * torch.rand(n, 1, 1, generator=gen))
    period = 3 + 5 * torch.rand(n, 1, 1, generator=gen)
    angle = math.pi * torch.rand(n, 1, 1, generator=gen)
    stripes = torch.sin(2 * math.pi * (torch.cos(angle) * g[0] + torch.sin(angle) * g[1]) / period)
    blotch = smooth_noise(gen, n, 8)
    striped = torch.rand(n, 1, 1, generator=gen) < 0.5
    return bright + 0.1 * torch.where(striped, stripes, blotch)


def make_patches(n: int, seed: int, max_objects: int = 4) -> Patches:
    """``n`` patches with 2 to ``max_objects`` shapes each (see :class:`Patches`)."""
    gen = torch.Generator().manual_seed(seed)
    truth = affine_field(gen, n, MAX_SHIFT - 1, 0.5)  # up to 5 px per component
    noise = affine_field(gen, n, MAX_NOISE - 1, 0.5)  # up to 4 px: the labels' misalignment
    at = grid().expand(n, 2, PATCH, PATCH)
    level = torch.rand(n, 1, 1, generator=gen)
    image = background(gen, level)
    drawn = torch.zeros(n, PATCH, PATCH)
    objects = torch.zeros(n, PATCH, PATCH)
    count = torch.randint(2, max_objects + 1, (n,), generator=gen)
    for s in range(max_objects):
        present = (s < count).float()[:, None, None]
        kind = torch.randint(0, 2, (n,), generator=gen)
        centre = (2 * torch.rand(n, 2, generator=gen) - 1) * (PATCH / 2 - 6)
        half = 2.5 + 4.5 * torch.rand(n, 2, generator=gen)
        angle = math.pi * torch.rand(n, generator=gen)
        fill = texture(gen, level)
        m = shape_mask(kind, centre, half, angle, at) * present
        image = image * (1 - m) + fill * m  # later shapes occlude earlier ones
        objects = torch.maximum(objects, m)
        # The map shows the shape where it would be if moved by the truth: mask(p - t(p)).
        drawn = torch.maximum(drawn, shape_mask(kind, centre, half, angle, at - truth) * present)
    image = image + 0.05 * torch.randn(n, PATCH, PATCH, generator=gen)
    return Patches(torch.stack([image, drawn], 1), truth, noise, objects > 0.5)
