"""The work every peer is given: the same model, batch and scalar output.

Two workloads, both at 32x32 with random weights (nothing is downloaded):

- ``resnet18``: torchvision ``resnet18(weights=None, num_classes=10)``, eval mode;
- ``vit_tiny``: timm ``vit_tiny_patch16_224(img_size=32, patch_size=4, pretrained=False,
  num_classes=10)``, eval mode.

The differentiated scalar per sample is the contrast of a fixed class (the authors'
classifier output with the label given): ``z_y - mean_{c != y} z_c`` on the logits, with
``y`` drawn once per batch from a fixed seed. It is a linear function of the logits, so
every peer can be handed it: as a loss with ``reduction="sum"`` (Captum), a model-output
function (TRAK, dattri), or a backward of its sum (hook-based peers).
"""

from __future__ import annotations

from typing import Callable, Dict, Tuple

import torch
import torch.nn as nn

NUM_CLASSES = 10
IMAGE_SIZE = 32
SKETCH_DIM = 1024


def resnet18() -> nn.Module:
    import torchvision

    return torchvision.models.resnet18(weights=None, num_classes=NUM_CLASSES)


def vit_tiny() -> nn.Module:
    import timm

    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=IMAGE_SIZE, patch_size=4, num_classes=NUM_CLASSES
    )


MODELS: Dict[str, Callable[[], nn.Module]] = {"resnet18": resnet18, "vit_tiny": vit_tiny}


def build_model(name: str, state_dict: Dict[str, torch.Tensor] = None) -> nn.Module:
    """The workload's model in eval mode; ``state_dict`` makes every process use the same weights."""
    if name not in MODELS:
        raise ValueError(f"unknown workload {name!r}; choose from {sorted(MODELS)}")
    torch.manual_seed(0)
    model = MODELS[name]()
    if state_dict is not None:
        model.load_state_dict(state_dict)
    return model.eval()


def make_batch(batch: int, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Inputs ``[batch, 3, 32, 32]`` and the fixed classes ``y`` whose contrast is differentiated."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=gen)
    y = torch.randint(0, NUM_CLASSES, (batch,), generator=gen)
    return x, y


def scalar(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample contrast of class ``y``: ``z_y - mean_{c != y} z_c``, shape ``[B]``."""
    z_y = logits.gather(1, y.view(-1, 1).long()).squeeze(1)
    return z_y - (logits.sum(1) - z_y) / (logits.shape[1] - 1)


class ScalarSum(nn.Module):
    """``scalar(...).sum()`` as a loss module with ``reduction="sum"`` (what Captum asks for)."""

    reduction = "sum"

    def forward(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return scalar(logits, y).sum()


def plain_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    """The baseline every time is divided by: one forward + backward of the batch."""
    model.zero_grad(set_to_none=True)
    scalar(model(x), y).sum().backward()
