"""A stand-in accelerator for finding device mix-ups on a machine without a GPU.

:class:`OnDevice` wraps a real CPU tensor but reports another device (``meta``: autograd
needs a stream for a tensor that claims to be on CUDA, and there is none here). Every
operation unwraps, runs on the CPU data and wraps the result again, so the numbers are
the CPU's, while an operation that mixes an ``OnDevice`` tensor with a plain CPU tensor
of one or more dimensions raises as CUDA does ("Expected all tensors to be on the same
device"), and ``.numpy()`` raises as it does on a CUDA tensor. Under :class:`DeviceMode`,
factories and ``.to()`` that name the device make ``OnDevice`` tensors, as
``torch.zeros(..., device=x.device)`` makes CUDA tensors on a GPU.

What it cannot see: code that branches on ``device.type == "cuda"``, random generators
on the wrong device, and speed. Copies, index tensors and 0-d tensors (scalars) may be
CPU tensors next to device ones, as CUDA allows.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

DEVICE = torch.device("meta")
_aten = torch.ops.aten
# ops that CUDA runs with CPU tensors beside CUDA ones: copies, and CPU index tensors
MIXED_OK = {
    _aten.copy_.default, _aten._to_copy.default, _aten.index.Tensor, _aten.index_put_.default,
    _aten.index_put.default, _aten._index_put_impl_.default, _aten.lift_fresh.default,
    _aten.detach.default, _aten.alias.default,
}


class OnDevice(torch.Tensor):
    """CPU numbers that report and behave as a tensor on another device (see the module docstring)."""

    @staticmethod
    def __new__(cls, data: torch.Tensor):
        if type(data) is not torch.Tensor or data.device.type != "cpu":
            raise TypeError(f"OnDevice wraps a plain CPU tensor, got {type(data).__name__} on {data.device}")
        out = torch.Tensor._make_wrapper_subclass(
            cls, data.shape, strides=data.stride(), storage_offset=data.storage_offset(), dtype=data.dtype,
            device=DEVICE, requires_grad=data.requires_grad,
        )
        out.cpu_data = data
        return out

    def tolist(self):
        return self.cpu_data.tolist()

    def numpy(self, *args, **kwargs):
        raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() to copy the tensor to "
                        "host memory first.")

    def __repr__(self) -> str:
        return f"OnDevice({self.cpu_data!r})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        plain = []

        def unwrap(t):
            if isinstance(t, OnDevice):
                return t.cpu_data
            if isinstance(t, torch.Tensor) and t.dim() > 0:
                plain.append(t)
            return t

        args, unwrapped_kwargs = tree_map(unwrap, (args, kwargs))
        if plain and func not in MIXED_OK:
            raise RuntimeError(
                "Expected all tensors to be on the same device, but found at least two devices, cuda:0 and cpu! "
                f"({func} got a {plain[0].device} tensor of shape {tuple(plain[0].shape)})"
            )
        wrap = True
        if kwargs.get("device") is not None:
            wrap = _on_device(kwargs["device"])
            unwrapped_kwargs["device"] = torch.device("cpu")
        out = func(*args, **unwrapped_kwargs)
        return tree_map(lambda t: OnDevice(t) if type(t) is torch.Tensor else t, out) if wrap else out


def _on_device(d) -> bool:
    if d is None or isinstance(d, (torch.dtype, torch.Tensor)):
        return False
    try:
        return torch.device(d).type == DEVICE.type
    except (RuntimeError, TypeError):
        return False


def _wrap(t):
    return OnDevice(t) if type(t) is torch.Tensor else t


class DeviceMode(TorchFunctionMode):
    """Factories and ``.to()`` / ``.cuda()`` that name the device make :class:`OnDevice` tensors."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.nn.functional.one_hot and isinstance(args[0], OnDevice):
            # at::one_hot has a branch for meta tensors (what OnDevice reports) that CUDA never takes
            return OnDevice(func(args[0].cpu_data, *args[1:], **kwargs))
        if func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__) and isinstance(args[0], OnDevice):
            # CUDA tensors take CPU index tensors (torch moves them over in C++, out of our reach)
            args = (args[0],) + tuple(tree_map(_wrap, list(args[1:])))
        if func in (torch.Tensor.to, torch.Tensor.cuda):
            to_device = func is torch.Tensor.cuda or any(_on_device(a) for a in args[1:]) or _on_device(kwargs.get("device"))
            if to_device:
                src, rest = args[0], [a for a in args[1:] if not _on_device(a)] if func is torch.Tensor.to else []
                kwargs.pop("device", None)
                kwargs.pop("non_blocking", None)
                if isinstance(src, OnDevice):
                    return src.to(*rest, **kwargs) if rest or kwargs else src
                moved = src.to(*rest, **kwargs) if rest or kwargs else src
                return OnDevice(moved.detach().clone()).requires_grad_(src.requires_grad)
        if _on_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
            return _wrap(func(*args, **kwargs))
        return func(*args, **kwargs)


def model_on_device(model: nn.Module) -> nn.Module:
    """``model`` with every parameter and buffer made :class:`OnDevice` (in place)."""
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None:
                module._parameters[name] = nn.Parameter(OnDevice(p.detach()), requires_grad=p.requires_grad)
        for name, b in list(module._buffers.items()):
            if b is not None:
                module._buffers[name] = OnDevice(b)
    return model
