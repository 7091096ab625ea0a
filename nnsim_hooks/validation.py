"""Checks on what users pass in, with messages that say what was expected."""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn as nn

from .errors import InputError, NnsimError
from .engine.outputs import batched_outputs


def model_device_dtype(model: nn.Module):
    for p in model.parameters():
        return p.device, p.dtype
    return torch.device("cpu"), torch.float32


def expected_input(model: nn.Module) -> str:
    """A description of the input the model's first parameterised layer expects."""
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            n = len(module.kernel_size)
            spatial = {1: "L", 2: "H, W", 3: "D, H, W"}[n]
            return f"[B, {module.in_channels}, {spatial}] for its first layer '{name}' ({type(module).__name__})"
        if isinstance(module, nn.Linear):
            return f"[B, ..., {module.in_features}] for its first layer '{name}' (Linear)"
        if isinstance(module, nn.Embedding):
            return f"integer ids [B, ...] < {module.num_embeddings} for its first layer '{name}' (Embedding)"
    return "the shape its forward() expects"


def batch_size_of(inputs: Any) -> int:
    leaf = first_tensor(inputs)
    if leaf is None or leaf.dim() == 0:
        raise InputError(f"inputs must be a batched tensor [B, ...] (or a tuple/dict of them), got {describe(inputs)}")
    return leaf.shape[0]


def first_tensor(inputs: Any) -> Optional[torch.Tensor]:
    if torch.is_tensor(inputs):
        return inputs
    values = inputs.values() if isinstance(inputs, dict) else inputs if isinstance(inputs, (tuple, list)) else ()
    for v in values:
        if torch.is_tensor(v):
            return v
    return None


def describe(inputs: Any) -> str:
    if torch.is_tensor(inputs):
        return f"{inputs.dtype} tensor of shape {list(inputs.shape)} on {inputs.device}"
    if isinstance(inputs, (tuple, list)):
        return "(" + ", ".join(describe(v) for v in inputs) + ")"
    if isinstance(inputs, dict):
        return "{" + ", ".join(f"{k}: {describe(v)}" for k, v in inputs.items()) + "}"
    return type(inputs).__name__


def check_inputs(model: nn.Module, inputs: Any) -> int:
    """Validate device and dtype of every tensor in ``inputs``; return the batch size.

    A batch of no samples is refused, on every path (per-sample gradients, similarity,
    features, the training term), as the features and the exact sums refuse empty data:
    the number of values per sample is the output function's, and the built-in ones
    cannot tell it from an empty batch."""
    device, dtype = model_device_dtype(model)
    batch = batch_size_of(inputs)
    if batch == 0:
        raise InputError(
            f"inputs hold no samples ({describe(inputs)}): per-sample gradients need a batch of at least one "
            "sample [B >= 1, ...]; skip empty batches before calling"
        )
    tensors = [inputs] if torch.is_tensor(inputs) else list(inputs.values() if isinstance(inputs, dict) else inputs)
    for t in tensors:
        if not torch.is_tensor(t):
            continue
        if t.device != device:
            raise InputError(
                f"inputs are on {t.device} but the model is on {device}: move them with inputs.to('{device}'); "
                f"the model expects {expected_input(model)}"
            )
        if t.is_floating_point() and t.dtype != dtype:
            raise InputError(
                f"inputs are {t.dtype} but the model's parameters are {dtype}: convert them with "
                f"inputs.to({dtype}); the model expects {expected_input(model)}"
            )
        if t.dim() == 0 or t.shape[0] != batch:
            raise InputError(f"all input tensors must share the batch size {batch}; got {describe(inputs)}")
        if t.is_complex():
            raise InputError(f"complex inputs are not supported; got {describe(inputs)}")
    return batch


def call_model(model: nn.Module, inputs: Any):
    """``model(inputs)`` (tuple -> *args, dict -> **kwargs), with shape context on failure.

    A 0-d output of a one-sample batch (a model ending in ``.squeeze()``) comes back as
    ``[1]``; see :func:`nnsim_hooks.engine.outputs.batched_outputs`."""
    try:
        if isinstance(inputs, dict):
            outputs = model(**inputs)
        elif isinstance(inputs, (tuple, list)):
            outputs = model(*inputs)
        else:
            outputs = model(inputs)
    except NnsimError:
        raise
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        raise InputError(
            f"the model's forward failed on inputs {describe(inputs)}: {exc}. "
            f"The model expects {expected_input(model)}."
        ) from exc
    return batched_outputs(outputs, batch_size_of(inputs))


def check_targets(targets, batch: int, device) -> Optional[torch.Tensor]:
    if targets is None:
        return None
    targets = torch.as_tensor(targets)
    if targets.dim() == 0 or targets.shape[0] != batch:
        raise InputError(f"targets must have one entry per sample ({batch}), got shape {list(targets.shape)}")
    return targets.to(device)
