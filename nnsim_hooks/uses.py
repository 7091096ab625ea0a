"""Finding parameters used outside the forward of the module that holds them.

Hooks see a parameter only through its module's forward. ``nn.MultiheadAttention``
reads ``out_proj.weight`` itself (``out_proj`` is never called); a model may apply a
tied embedding table with ``F.linear`` in its own forward. Per-sample gradients built
from hooks alone would silently miss those uses. During every captured forward pass a
``TorchFunctionMode`` looks at the arguments of each torch op; a use of a tracked
parameter while none of its holders is running is recorded with the module that made
it, so that the engine can hand that module to the generic rule, with the parameter.
"""

from __future__ import annotations

from typing import Dict, List, Set, Tuple

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode


class ModuleStack:
    """The modules whose forward is running, innermost last (only while active)."""

    def __init__(self, model: nn.Module):
        self.stack: List[nn.Module] = []
        self.active = False
        self._handles = []
        try:
            for module in model.modules():
                self._handles.append(module.register_forward_pre_hook(self._push))
                self._handles.append(module.register_forward_hook(self._pop, always_call=True))
        except Exception:
            self.remove()
            raise

    def _push(self, module, args):
        if self.active:
            self.stack.append(module)

    def _pop(self, module, args, output):
        if self.active and self.stack and self.stack[-1] is module:
            self.stack.pop()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


class StrayUseDetector(TorchFunctionMode):
    """Records ``(parameter id, module)`` for each use of a tracked parameter made while
    none of the modules holding it is running."""

    def __init__(self, holders: Dict[int, Set[int]], stack: ModuleStack):
        super().__init__()
        self.holders = holders  # id(param) -> ids of the hooked modules that hold it
        self.stack = stack
        self.strays: Dict[Tuple[int, int], nn.Module] = {}

    def _check(self, value) -> None:
        holders = self.holders.get(id(value))
        if holders is None:
            return
        running = self.stack.stack
        if not any(id(m) in holders for m in running) and running:
            self.strays[(id(value), id(running[-1]))] = running[-1]

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for value in (*args, *kwargs.values()):
            if isinstance(value, nn.Parameter):
                self._check(value)
            elif isinstance(value, (list, tuple)):
                for item in value:
                    if isinstance(item, nn.Parameter):
                        self._check(item)
        return func(*args, **kwargs)
