"""Which layers' gradients the audit's neighbours are computed from (``neighbor_layers=``,
``--neighbor-layers``).

A network trained until it predicts every given label has memorised its wrong labels,
and mostly in its last layers: through them a mislabelled sample looks like the class it
was taught, its neighbours share the wrong label, and the vote cannot contradict it.
The gradients of the first layers keep what the samples look like. Measured on the
label-issue benchmark's memorised models (``benchmarks/results/label_issues.md``): the
neighbour vote's AUROC on 3-D volumes goes from 0.52 with every layer to 0.88 with the
first half, and digits stays at 0.999. The paper's density and denoising keep every layer:
only the neighbours (label issues, duplicates, rare samples) change.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Union

import torch.nn as nn

from ..capture.targets import LayerSelector
from ..errors import InputError

FIRST_HALF = "first_half"
CHOICES = ("all", FIRST_HALF)


def modules_with_parameters(model: nn.Module) -> List[str]:
    """Names of the modules holding trainable parameters of their own, in the order the
    model lists them (input to output for timm, torchvision and MONAI networks)."""
    return [name for name, module in model.named_modules()
            if any(p.requires_grad for p in module.parameters(recurse=False))]


def first_half(model: nn.Module) -> List[str]:
    """The first half (rounded up) of :func:`modules_with_parameters`."""
    names = modules_with_parameters(model)
    if not names:
        raise InputError(f"neighbor_layers='{FIRST_HALF}': {type(model).__name__} has no trainable parameters")
    return names[: (len(names) + 1) // 2]


def _named(choice) -> Optional[str]:
    """``"all"`` or ``"first_half"`` when ``choice`` names one of them (``-`` or ``_``), else None."""
    if choice is None:
        return "all"
    if isinstance(choice, str) and choice.replace("-", "_") in CHOICES:
        return choice.replace("-", "_")
    return None


def neighbor_selector(model: nn.Module, choice: Union[None, str, List[str], Callable]) -> Optional[LayerSelector]:
    """The ``layers=`` selector for :func:`nnsim_hooks.attach` (None: every layer).

    ``choice``: None or ``"all"``; ``"first_half"`` (the first half of
    :func:`modules_with_parameters`, rounded up); or anything ``attach(layers=...)`` takes
    (module names, glob patterns, ``fn(name, module) -> bool``)."""
    named = _named(choice)
    if named == "all":
        return None
    if named == FIRST_HALF:
        chosen = frozenset(first_half(model))
        return lambda name, module: name in chosen
    if isinstance(choice, (str, list, tuple)) or callable(choice):
        return choice
    raise InputError(f"neighbor_layers must be None, one of {CHOICES}, module names or patterns, or "
                     f"fn(name, module) -> bool; got {choice!r}")


def describe(model: nn.Module, choice) -> str:
    """How the summary names the choice."""
    named = _named(choice)
    if named == "all":
        return "all"
    if named == FIRST_HALF:
        half = first_half(model)
        return (f"first_half ({len(half)} of {len(modules_with_parameters(model))} modules, "
                f"'{half[0]}' to '{half[-1]}')")
    if callable(choice):
        return getattr(choice, "__name__", "callable")
    return str(choice)
