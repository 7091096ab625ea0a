"""``--augment``: label-keeping transforms for the models that ``--train`` fits.

A network trained from scratch on a few hundred images learns its training labels by
heart before it learns the classes; cross-fitted models then see nothing of the class in
the samples they did not train on. Augmentation shows each training sample in new
positions and colours, so the classes are cheaper to learn than the labels.

The transforms act on a batch tensor ``[N, C, *spatial]`` (2-D images or 3-D volumes),
each sample drawn apart from a seeded generator:

- ``flip``: mirror the last spatial axis (left-right), with probability 1/2;
- ``shift``: translate every spatial axis by up to 1/8 of its size (reflected border);
- ``channels``: shuffle the channels (colour is not the class).

Only for training: the audit itself looks at the samples as given. Pick the transforms
that keep *your* labels: ``flip`` changes a "left" class into a "right" one, ``shift`` a
class told by position, ``channels`` a class told by colour.
"""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F

from ..errors import InputError

TRANSFORMS = ("flip", "shift", "channels")
#: how far ``shift`` translates: up to this share of each spatial size (CIFAR's 4 of 32 pixels)
SHIFT_SHARE = 1 / 8


def parse_augment(value) -> Tuple[str, ...]:
    """``"flip,shift"``, ``["flip", "shift"]``, ``"none"``/``""``/None -> the transforms, in
    :data:`TRANSFORMS` order; an unknown name is refused with the known ones."""
    if value is None:
        return ()
    names = value.split(",") if isinstance(value, str) else list(value)
    names = [str(n).strip().lower() for n in names if str(n).strip()]
    if names in ([], ["none"]):
        return ()
    unknown = [n for n in names if n not in TRANSFORMS]
    if unknown:
        raise InputError(f"--augment {value!r}: unknown transform(s) {unknown}; choose from {', '.join(TRANSFORMS)} "
                         "(comma-separated), or none")
    return tuple(t for t in TRANSFORMS if t in names)


def check_augmentable(x, transforms: Tuple[str, ...]) -> None:
    """Refuse inputs the transforms cannot act on, with what was found."""
    if not transforms:
        return
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 4:
        found = (f"a {x.dtype} tensor of shape {list(x.shape)}" if isinstance(x, torch.Tensor)
                 else type(x).__name__)
        raise InputError(f"--augment {','.join(transforms)} needs each batch as one float tensor [N, C, H, W] "
                         f"(images) or [N, C, D, H, W] (volumes); the data gives {found}. Use --augment none")


def augment_batch(x: torch.Tensor, transforms: Tuple[str, ...], generator: torch.Generator) -> torch.Tensor:
    """``x`` transformed per sample (a new tensor; ``x`` is left as it is)."""
    if not transforms:
        return x
    check_augmentable(x, transforms)
    n, spatial = x.shape[0], x.shape[2:]
    draw = {"device": "cpu", "generator": generator}
    if "flip" in transforms:
        mirror = (torch.rand(n, **draw) < 0.5).to(x.device)
        x = torch.where(mirror.view(n, *[1] * (x.dim() - 1)), x.flip(-1), x)
    if "shift" in transforms:
        pads = [max(1, int(s * SHIFT_SHARE)) if s > 1 else 0 for s in spatial]  # reflect needs pad < size
        padded = F.pad(x, [p for pad in reversed(pads) for p in (pad, pad)], mode="reflect")
        starts = [torch.randint(0, 2 * p + 1, (n,), **draw) for p in pads]
        x = torch.stack([padded[(i, slice(None)) + tuple(slice(int(s[i]), int(s[i]) + size)
                                                         for s, size in zip(starts, spatial))]
                         for i in range(n)])
    if "channels" in transforms and x.shape[1] > 1:
        order = torch.argsort(torch.rand(n, x.shape[1], **draw), dim=1).to(x.device)
        x = torch.gather(x, 1, order.view(n, -1, *[1] * len(spatial)).expand_as(x))
    return x
