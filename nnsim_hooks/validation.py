"""Checks on what users pass in, with messages that say what was expected."""

from __future__ import annotations

import numbers
from typing import Any, Optional

import torch
import torch.nn as nn

from .errors import InputError, NnsimError
from .engine.outputs import batched_outputs, make_output_spec
from .model_device import model_device_dtype


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
    leaf = first_input_tensor(inputs)
    if leaf is None or leaf.dim() == 0:
        raise InputError(f"inputs must be a batched tensor [B, ...] (or a tuple/dict of them), got {describe(inputs)}")
    return leaf.shape[0]


def first_input_tensor(inputs: Any) -> Optional[torch.Tensor]:
    """The tensor the batch size is read from: ``inputs`` itself, or the first tensor among
    its top-level values (the positional or keyword arguments of the model's forward).
    Not nested structures: those are not checked as inputs either (see check_inputs)."""
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


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _int_at_least(name: str, value: Any, low: int, meaning: str) -> int:
    if not _is_int(value) or value < low:
        raise InputError(f"attach({name}={value!r}): {name} is {meaning}; it must be an int >= {low}")
    return int(value)


def check_attach_arguments(model: nn.Module, *, output, layers, sketch_dim, seed, stage1_dim, exact_limit,
                           batch_size) -> dict:
    """Validate :func:`nnsim_hooks.attach`'s arguments before anything is hooked, so that a bad
    value fails at ``attach`` and not at the first call; return the sketch recipe's numbers as
    plain ints (a numpy integer would not go into an index's JSON manifest)."""
    make_output_spec(output)  # an unknown name raises OutputSpecError, listing the names
    _check_layers(model, layers)
    dim = _int_at_least("sketch_dim", sketch_dim, 1, "D, the dimension of the sketched features (default 1024)")
    if not _is_int(seed):
        raise InputError(f"attach(seed={seed!r}): the sketch seed must be an int (the same int gives the same "
                         "features anywhere), e.g. seed=0")
    if stage1_dim is not None:
        stage1_dim = _int_at_least(
            "stage1_dim", stage1_dim, dim,
            f"the first-stage sketch size, at least sketch_dim = {dim} (None: 16 x sketch_dim, at least 16384)",
        )
    return dict(
        dim=dim,
        seed=int(seed),
        stage1_dim=stage1_dim,
        exact_limit=_int_at_least("exact_limit", exact_limit, 0,
                                  "the size up to which a parameter is kept whole, unprojected"),
        batch_size=_int_at_least("batch_size", batch_size, 1, "how many samples go through the model at once"),
    )


def _check_layers(model: nn.Module, layers: Any) -> None:
    accepted = ("None (every trainable parameter), a module name or glob pattern ('layer4', 'blocks.*'), a list of "
                "them, or fn(name, module) -> bool")
    if isinstance(layers, nn.Module):
        # A module is callable, but not as fn(name, module): ask for its name instead.
        names = [name for name, module in model.named_modules() if module is layers]
        hint = f"layers={names[0]!r}" if names else "its name in model.named_modules()"
        raise InputError(f"attach(layers=<{type(layers).__name__}>): pass the module's name, {hint}; layers= takes "
                         f"{accepted}")
    if layers is None or isinstance(layers, str) or callable(layers):
        return
    if not isinstance(layers, (list, tuple, set, frozenset)):
        raise InputError(f"attach(layers={layers!r}): a {type(layers).__name__} is not a layer selection; layers= "
                         f"takes {accepted}")
    for item in layers:
        if not isinstance(item, str):
            raise InputError(f"attach(layers={layers!r}): {item!r} ({type(item).__name__}) is not a module name; "
                             f"layers= takes {accepted}")
