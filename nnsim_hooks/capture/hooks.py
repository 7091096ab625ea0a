"""Forward hooks plus hooks on the modules' output tensors.

Nothing is written onto the model: hook handles and captured tensors live in this
module's side tables and are cleared after every batch. A tensor hook registered on a
module's output fires with the gradient of that output *before* any later in-place
op (``ReLU(inplace=True)``, ``out += identity``), which is what full backward module
hooks cannot cope with on stock torchvision ResNets.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Protocol, Set, Tuple

import torch
import torch.nn as nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..errors import InputError


@dataclass
class LayerCall:
    """One call of one hooked module during a captured forward pass."""

    module_name: str
    module: nn.Module
    args: Tuple
    kwargs: Dict
    #: the output tensors that carry a gradient, in pytree order
    out_leaves: List[torch.Tensor]
    #: where each of out_leaves sits among the flattened outputs
    out_positions: List[int]
    #: version counters of the tensor inputs at forward time (in-place edits are caught)
    versions: List[Tuple[torch.Tensor, int]]
    #: grads[j][i]: gradient of output j with respect to out_leaves[i] (None: not reached)
    grads: List[List[Optional[torch.Tensor]]] = field(default_factory=list)
    #: local names of parameters whose gradient a running generic-rule ancestor already
    #: accounts for (it re-runs this call): they are left out here
    skip: Set[str] = field(default_factory=set)
    #: version counters of out_leaves right after the call (later in-place edits show)
    out_versions: List[int] = field(default_factory=list)
    #: taps[key][j]: gradient of output j at an autograd node inside the call that the
    #: rule asked for (see LayerRule.tap_graph); tapped: what the rule kept of those nodes
    taps: Dict[str, List[Optional[torch.Tensor]]] = field(default_factory=dict)
    tapped: Optional[object] = None

    @property
    def activation(self) -> torch.Tensor:
        for a in self.args:
            if torch.is_tensor(a):
                return a
        raise InputError(f"module '{self.module_name}' was called without a tensor input")

    def check_unchanged(self) -> None:
        for tensor, version in self.versions:
            if tensor._version != version:
                raise InputError(
                    f"the input of module '{self.module_name}' ({type(self.module).__name__}) was modified "
                    "in place after the module used it, so its per-sample gradient cannot be computed; "
                    "avoid in-place ops on that tensor (for example set inplace=False on the following activation)"
                )

    def backprops(self, d: int) -> torch.Tensor:
        """The output gradients of a single-output module, stacked ``[d, *out.shape]``
        (zeros for an output that did not reach this module)."""
        out = self.out_leaves[0]
        rows = []
        for j in range(d):
            g = self.grads[j][0] if j < len(self.grads) else None
            rows.append(torch.zeros_like(out) if g is None else g)
        return rows[0].unsqueeze(0) if d == 1 else torch.stack(rows)  # no copy for one output


def copies_to_hook(leaves: list, spec, positions: List[int]):
    """The output leaves to hook, and the output to return in place of the module's (None
    to keep it). A copy is hooked, and returned instead, when

    - a leaf is a view: an in-place op on a view (F.instance_norm's output, then
      ReLU(inplace=True)) re-routes the gradient around a hook on the view;
    - the module has several outputs: one may be computed from another inside it ((y, h)
      with y from h), and the hook on h would also see y's gradient.

    The copy's gradient is exactly what flows in from outside the module."""
    several = len(positions) > 1
    if not (several or any(leaves[k]._is_view() for k in positions)):
        return leaves, None
    leaves = list(leaves)
    for k in positions:
        if several or leaves[k]._is_view():
            leaves[k] = leaves[k].clone()
    return leaves, tree_unflatten(leaves, spec)


class CapturePolicy(Protocol):
    """What the capture asks its owner about each hooked call, fixed at construction
    (:class:`Capture` takes one). The engine's is
    :class:`~nnsim_hooks.engine.policy.EnginePolicy`, which answers from its plan and from
    the parameter-use recorder of the pass under way."""

    def check(self, name: str, module: nn.Module) -> None:
        """Raise if ``module`` cannot be captured in its current state (every forward)."""

    def rule_of(self, module: nn.Module) -> Optional[object]:
        """The module's fast rule, asked first whether a call ran on the batch (see
        ``LayerRule.batched``); None: the generic rule."""

    def on_batch(self, args: Tuple, kwargs: Dict, module: nn.Module) -> bool:
        """For a call whose outputs have the batch first: whether its inputs are the batch."""

    def derives_from_batch(self, args: Tuple, kwargs: Dict, module: nn.Module) -> bool:
        """For a call its rule placed on the batch: whether its inputs derive from it."""

    def on_unbatched(self, module: nn.Module) -> None:
        """Told of a call that did not run on the batch (it is not recorded)."""

    def covered(self, module: nn.Module) -> Set[str]:
        """Local names of the module's parameters a running ancestor already accounts for
        (left out of this call's results)."""

    def params_of(self, module: nn.Module) -> List[torch.Tensor]:
        """The parameters a hooked module is differentiated for (where backward stops
        when the call's inputs need no gradient)."""


class Capture:
    """Hooks the target modules during a pass; records :class:`LayerCall` s while active.

    ``policy`` answers the questions each call raises (see :class:`CapturePolicy`).
    ``on_grad(call, j, leaf_index, grad)`` is called from inside backward for each
    output gradient that arrives; by default it is stored in ``call.grads``.
    """

    def __init__(self, policy: CapturePolicy, modules: Optional[Dict[str, nn.Module]] = None):
        self.modules: Dict[str, nn.Module] = {}
        self.policy = policy
        self._handles: List = []
        self._tensor_handles: List = []
        self.active = False
        self.calls: List[LayerCall] = []
        self.pass_index = 0
        #: the batch size of the current pass
        self.batch = 0
        self.on_grad: Optional[Callable[[LayerCall, int, int, torch.Tensor], None]] = None
        for name, module in (modules or {}).items():
            self.add(name, module)

    def add(self, name: str, module: nn.Module) -> None:
        """Hook one more module (from the next :meth:`install` on)."""
        self.modules[name] = module

    def install(self) -> None:
        """Put the forward hooks on. They stay only for the duration of a pass, so that
        between passes the model carries nothing of ours (it can be copied or saved)."""
        try:
            for name, module in self.modules.items():
                self._handles.append(module.register_forward_hook(self._make_forward_hook(name), with_kwargs=True))
        except Exception:
            self.remove()
            raise

    def remove(self) -> None:
        self.clear()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def clear(self) -> None:
        for handle in self._tensor_handles:
            handle.remove()
        self._tensor_handles.clear()
        self.calls = []
        self.pass_index = 0

    def _make_forward_hook(self, name: str):
        def forward_hook(module, args, kwargs, output):
            if not self.active:
                return None
            policy = self.policy
            policy.check(name, module)
            leaves, spec = tree_flatten(output)
            positions = [k for k, t in enumerate(leaves) if torch.is_tensor(t) and t.requires_grad]
            if not positions:
                return None  # ran without gradient (torch.no_grad inside the model): contributes nothing
            rule = policy.rule_of(module)
            verdict = None if rule is None else rule.batched(
                module, args, kwargs, [leaves[k] for k in positions], self.batch
            )
            if verdict is None:
                batch_first = all(leaves[k].dim() > 0 and leaves[k].shape[0] == self.batch for k in positions)
                on_batch = batch_first and policy.on_batch(args, kwargs, module)
            else:  # the rule knows where this module keeps the batch
                on_batch = verdict and policy.derives_from_batch(args, kwargs, module)
            if not on_batch:
                # Shared by all samples (a table), or another layout (windows folded into
                # the batch, sequence first): the module that mixes it in takes it.
                policy.on_unbatched(module)
                return None
            leaves, replaced = copies_to_hook(leaves, spec, positions)
            out_leaves = [leaves[k] for k in positions]
            in_leaves, in_spec = tree_flatten((args, kwargs))
            # A copy of the containers (not the tensors): a list argument that grows after
            # the call (DenseNet-style feature lists) must not change what the rule reruns.
            args, kwargs = tree_unflatten(in_leaves, in_spec)
            versions = [(t, t._version) for t in in_leaves if torch.is_tensor(t)]
            call = LayerCall(name, module, args, kwargs, out_leaves, positions, versions, skip=policy.covered(module))
            call.out_versions = [t._version for t in out_leaves]
            self.calls.append(call)
            for i, leaf in enumerate(out_leaves):
                self._tensor_handles.append(leaf.register_hook(self._make_tensor_hook(call, i)))
            found = None if rule is None else rule.tap_graph(call)
            if found is not None:
                call.tapped, nodes = found
                for key, node in nodes.items():
                    self._tensor_handles.append(node.register_prehook(self._make_node_hook(call, key)))
            return replaced

        return forward_hook

    def _make_tensor_hook(self, call: LayerCall, leaf_index: int):
        def tensor_hook(grad):
            j = self.pass_index
            while len(call.grads) <= j:
                call.grads.append([None] * len(call.out_leaves))
            if self.on_grad is not None:
                self.on_grad(call, j, leaf_index, grad)
            else:
                call.grads[j][leaf_index] = grad
            return None

        return tensor_hook

    def _make_node_hook(self, call: LayerCall, key: str):
        def node_hook(grad_outputs):
            slots = call.taps.setdefault(key, [])
            while len(slots) <= self.pass_index:
                slots.append(None)
            slots[self.pass_index] = grad_outputs[0]
            return None

        return node_hook

    def grad_inputs(self) -> List[torch.Tensor]:
        """Where backward may stop: each call's tensor inputs that require grad, or, for a
        call whose inputs do not (the first layer, a module taking a buffer), the trainable
        parameters it is differentiated for. Stopping there skips the weight gradients a
        plain ``backward()`` would compute."""
        seen = set()
        out: List[torch.Tensor] = []

        def add(t):
            if id(t) not in seen:
                seen.add(id(t))
                out.append(t)

        for call in self.calls:
            inputs = [t for t, _ in call.versions if t.requires_grad and t.is_floating_point()]
            if inputs:
                for t in inputs:
                    add(t)
            else:
                for p in self.policy.params_of(call.module):
                    if p.requires_grad:
                        add(p)
        return out
