"""What the torch ops of a captured forward pass do with the tracked parameters.

Hooks see a parameter only through its module's forward. A ``TorchFunctionMode``
active during every captured forward pass looks at the arguments of each torch op and
records two things:

- **stray uses**: a parameter used while none of the modules holding it is running.
  ``nn.MultiheadAttention`` reads ``out_proj.weight`` itself (``out_proj`` is never
  called); a model may apply a tied embedding table with ``F.linear`` in its own
  forward. Per-sample gradients from hooks alone would silently miss those uses, so
  the engine hands the module that made the use to the generic rule, with the parameter.
- **direct uses** by a module on the generic rule of its own parameters (a ViT's
  ``cls_token.expand(B, ...)`` and ``x + pos_embed``): the op and its output, whose
  gradient is captured too, so that the per-sample gradient can come from that one op
  instead of re-running the whole module (see :mod:`nnsim_hooks.capture.direct_uses`).

It also tracks which tensors derive from the batch (the model's inputs and whatever is
computed from them). A hooked module called on something that does not (timm's
relative-position MLP runs on a coordinate table) or whose input does not have the
batch first produces one output shared by all samples: its per-sample gradients only
exist through the module that mixes that output into each sample, so that module (the
innermost running one called on the batch) takes those parameters on the generic rule.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten
import weakref


class ModuleStack:
    """The modules whose forward is running, innermost last (only while active), and
    for each whether it was called on the batch (see :meth:`ParamUseRecorder.on_batch`)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.stack: List[nn.Module] = []
        self.on_batch: List[bool] = []
        self.active = False
        self.recorder: Optional["ParamUseRecorder"] = None
        #: when set, every module call is summarised into it (see layout.py)
        self.trace = None
        self._handles = []

    def install(self) -> None:
        try:
            for module in self.model.modules():
                self._handles.append(module.register_forward_pre_hook(self._push))
                self._handles.append(module.register_forward_hook(self._pop, always_call=True))
        except Exception:
            self.remove()
            raise

    def _push(self, module, args):
        if self.active:
            if self.trace is not None:
                self.trace.enter(module, args)
            self.stack.append(module)
            self.on_batch.append(self.recorder is None or self.recorder.on_batch(args, {}, module))

    def _pop(self, module, args, output):
        if self.active and self.trace is not None:
            self.trace.leave(module, output)
        if self.active and self.stack and self.stack[-1] is module:
            self.stack.pop()
            self.on_batch.pop()

    def clear(self) -> None:
        self.stack.clear()
        self.on_batch.clear()

    def batched_ancestor(self, module: nn.Module) -> Optional[nn.Module]:
        """The innermost running module other than ``module`` that was called on the batch."""
        for m, ok in zip(reversed(self.stack), reversed(self.on_batch)):
            if ok and m is not module:
                return m
        return None

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


@dataclass
class DirectUse:
    """One op applied by a generic-rule module directly to one of its own parameters."""

    param: nn.Parameter
    func: Callable
    args: Tuple
    kwargs: Dict[str, Any]
    output: torch.Tensor
    versions: List[Tuple[torch.Tensor, int]]
    grads: List[Optional[torch.Tensor]] = field(default_factory=list)  # per differentiated output


class ParamUseRecorder(TorchFunctionMode):
    """See the module docstring. ``holders``: id(param) -> ids of the hooked modules that
    hold it; ``generic``: ids of the modules on the generic rule."""

    def __init__(
        self, holders: Dict[int, Set[int]], generic: Set[int], stack: ModuleStack, pass_index: Callable[[], int],
        batch: int,
        not_batch_first: Set[int] = frozenset(),
    ):
        super().__init__()
        self.not_batch_first = not_batch_first
        self.holders = holders
        self.generic = generic
        self.stack = stack
        self.pass_index = pass_index
        self.batch = batch
        # id -> weak reference: a dead tensor's id may be reused, so the reference is checked
        self._batched: Dict[int, weakref.ref] = {}
        self.strays: Dict[Tuple[int, int], nn.Module] = {}
        #: the strays that come from a module run without the batch first
        self.shared: Set[Tuple[int, int]] = set()
        self.uses: List[DirectUse] = []
        #: ids of parameters used in a way that cannot be split per op
        self.unsplittable: Set[int] = set()
        self.hooks: List = []

    def _params_in(self, args, kwargs) -> List[nn.Parameter]:
        # Identity through id(): tracked parameters are alive, so their ids are theirs
        # alone (and isinstance(x, nn.Parameter) is slow: a metaclass check per op).
        holders = self.holders
        found = []
        for value in (*args, *kwargs.values()):
            if id(value) in holders:
                found.append(value)
            elif type(value) in (list, tuple):
                found.extend(v for v in value if id(v) in holders)
        return found

    def _mark(self, t: torch.Tensor) -> None:
        self._batched[id(t)] = weakref.ref(t)

    def _is_batched(self, t: torch.Tensor) -> bool:
        ref = self._batched.get(id(t))
        return ref is not None and ref() is t

    def mark_batch(self, inputs) -> None:
        for t in tree_flatten(inputs)[0]:
            if torch.is_tensor(t):
                self._mark(t)

    def _from_batch(self, args, kwargs) -> bool:
        for value in (*args, *kwargs.values()):
            if torch.is_tensor(value):
                if self._is_batched(value):
                    return True
            elif isinstance(value, (list, tuple)):
                if any(torch.is_tensor(v) and self._is_batched(v) for v in value):
                    return True
        return False

    def on_batch(self, args, kwargs, module: Optional[nn.Module] = None) -> bool:
        """True when some tensor argument derives from the batch and has it first (and the
        layout check did not find ``module`` getting inputs without the batch first)."""
        if module is not None and id(module) in self.not_batch_first:
            return False
        for t in tree_flatten((args, kwargs))[0]:
            if torch.is_tensor(t) and self._is_batched(t) and t.dim() > 0 and t.shape[0] == self.batch:
                return True
        return False

    def derives_from_batch(self, args, kwargs, module: Optional[nn.Module] = None) -> bool:
        """True when some tensor argument derives from the batch, wherever its batch
        dimension is (the module's rule placed it), and the layout check did not flag
        ``module``."""
        if module is not None and id(module) in self.not_batch_first:
            return False
        return any(torch.is_tensor(t) and self._is_batched(t) for t in tree_flatten((args, kwargs))[0])

    def unbatched_call(self, module: nn.Module, params: List[nn.Parameter]) -> None:
        """A hooked module ran on something that is not the batch: its parameters go to
        the innermost running module that was called on the batch."""
        owner = self.stack.batched_ancestor(module)
        if owner is None:
            return
        for p in params:
            if id(owner) not in self.holders.get(id(p), ()):
                self.strays[(id(p), id(owner))] = owner
                self.shared.add((id(p), id(owner)))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        params = self._params_in(args, kwargs)
        out = func(*args, **kwargs)
        if self._from_batch(args, kwargs):
            for t in (out if isinstance(out, (list, tuple)) else (out,)):
                if torch.is_tensor(t):
                    self._mark(t)
        running = self.stack.stack
        for param in params:
            holders = self.holders[id(param)]
            if running and not any(id(m) in holders for m in running):
                self.strays[(id(param), id(running[-1]))] = running[-1]
            elif running and id(running[-1]) in holders and id(running[-1]) in self.generic:
                self._record(param, func, args, kwargs, out)
            else:
                self.unsplittable.add(id(param))
        return out

    def _record(self, param, func, args, kwargs, out) -> None:
        if not any(torch.is_tensor(t) for t in tree_flatten(out)[0]):
            return  # metadata (``pos_embed.shape``, a dtype): no gradient goes through it
        if not (torch.is_tensor(out) and out.requires_grad):
            self.unsplittable.add(id(param))
            return
        leaves = [a for a in (*args, *kwargs.values()) if torch.is_tensor(a)]
        use = DirectUse(param, func, args, kwargs, out, [(t, t._version) for t in leaves])
        self.uses.append(use)

        def hook(grad, use=use):
            j = self.pass_index()
            while len(use.grads) <= j:
                use.grads.append(None)
            use.grads[j] = grad

        self.hooks.append(out.register_hook(hook))

    def remove_hooks(self) -> None:
        for handle in self.hooks:
            handle.remove()
        self.hooks.clear()
