"""Where a model lives: the one place that decides which device and dtype inputs,
targets and exact computations are moved to."""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn as nn


def model_device_dtype(model: nn.Module) -> Tuple[torch.device, torch.dtype]:
    """The device and dtype of the model's first parameter, or CPU float32 for a model
    without parameters (it then runs wherever its inputs are, and the CPU is the safe
    default for what we allocate)."""
    for p in model.parameters():
        return p.device, p.dtype
    return torch.device("cpu"), torch.float32
