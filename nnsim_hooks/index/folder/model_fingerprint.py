"""A model fingerprint for index manifests: architecture and weights."""

from __future__ import annotations

import hashlib
from typing import Dict, Iterable

import torch
import torch.nn as nn


def model_fingerprint(model: nn.Module, parameter_names: Iterable[str]) -> Dict[str, str]:
    """Hashes of the parameter names and shapes, and of the parameter values (all of
    them, trainable or not: frozen weights change similarities too)."""
    arch = hashlib.sha256()
    weights = hashlib.sha256()
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        arch.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        data = tensor.detach()
        if data.dtype == torch.bfloat16:
            data = data.float()
        weights.update(data.cpu().contiguous().numpy().tobytes())
    return {"class": type(model).__qualname__, "architecture": arch.hexdigest()[:16], "weights": weights.hexdigest()[:16]}
