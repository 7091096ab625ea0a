"""What a per-layer rule computes, and the generic paths every rule inherits.

A rule turns what the hooks captured for one call of one module into per-sample
quantities for that module's own trainable parameters:

- ``activation``: the module's first positional input, ``[B, ...]``;
- ``backprops``: the gradient of each differentiated output with respect to the
  module's output, stacked as ``[d, B, ...]`` (d = 1 for a scalar output).

A rule that needs more of the call (attention reads query, key, value and masks, and
has two outputs) overrides :meth:`LayerRule.operands`, which builds these two
arguments from the whole captured call (positional and keyword arguments, every
output's gradient), sets ``multi_output``, and may override :meth:`LayerRule.batched`
when the batch is not the first dimension of its input, and :meth:`LayerRule.tap_graph`
to have the capture hook gradients at nodes inside the call's own autograd graph
(attention reads its two matrix products there instead of recomputing them). Existing
rules change nothing.

From these a rule provides three things, each for all d outputs at once:

- :meth:`LayerRule.grad_sample` materialises per-sample gradients ``[B, d, *shape]``;
- :meth:`LayerRule.gram` gives the Gram matrix of those gradients, ``[B*d, B*d]``
  (rows ordered sample-major), without materialising them where the layer allows
  (ghost inner products);
- :meth:`LayerRule.sketch` gives the randomly projected gradients ``[B, d, m]``,
  where the layer allows without materialising them.

Only :meth:`grad_sample` is required; the other two fall back to materialising, as does
:meth:`LayerRule.self_gram` (the Gram's diagonal blocks, each sample's own kernel, which
the exact density needs without the rest of the Gram).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

if TYPE_CHECKING:  # pragma: no cover
    from ..capture.hooks import LayerCall
    from ..engine.sketch import ParamSketch

Grads = Dict[str, torch.Tensor]


def trainable(module: nn.Module) -> Iterator[Tuple[str, nn.Parameter]]:
    """The module's own (non-recursive) parameters that require grad."""
    for name, param in module.named_parameters(recurse=False):
        if param.requires_grad:
            yield name, param


class LayerRule:
    """Base class of the per-layer rules. Subclasses implement :meth:`grad_sample`."""

    #: short name shown in the coverage report
    name = "rule"
    #: True: the rule also handles calls with several differentiable outputs (it reads
    #: them through :meth:`operands`); False sends such calls to the generic rule
    multi_output = False

    def operands(self, call: "LayerCall", d: int) -> Tuple[Any, Any]:
        """The ``(activation, backprops)`` passed to :meth:`grad_sample`, :meth:`gram` and
        :meth:`sketch` for one captured call: by default its first tensor input and its
        output gradients ``[d, B, ...]``."""
        return call.activation, call.backprops(d)

    def batched(self, module: nn.Module, args: Tuple, kwargs: Dict, outputs: Sequence[torch.Tensor],
                batch: int) -> Optional[bool]:
        """Whether this call ran on the batch, for a rule whose inputs may not have the batch
        first (``nn.MultiheadAttention(batch_first=False)``); None: the default check (the
        batch first in an input derived from the model's inputs and in every output)."""
        return None

    def tap_graph(self, call: "LayerCall") -> Optional[Tuple[Any, Dict[str, Any]]]:
        """Called right after a captured call: autograd nodes inside the call whose output
        gradient the rule wants (``{key: node}``, hooked by the capture into
        ``call.taps[key][j]``) and what it keeps of them at forward time (stored as
        ``call.tapped``). None (the default): nothing to tap."""
        return None

    def child_parameters(self, module: nn.Module) -> List[str]:
        """Local names (``"out_proj.weight"``) of parameters of the module's children that this
        rule computes: the module that uses them, not the child, is then their target."""
        return []

    def supports(self, module: nn.Module) -> bool:
        """False sends this module to the torch.func fallback (an unusual configuration)."""
        return True

    def check(self, module: nn.Module, module_name: str) -> None:
        """Raise a :class:`~nnsim_hooks.errors.ModelError` if this module cannot be
        handled in its current state (called on every captured forward)."""

    def grad_sample(self, module: nn.Module, activation: torch.Tensor, backprops: torch.Tensor) -> Grads:
        raise NotImplementedError

    def gram(self, module: nn.Module, activation: torch.Tensor, backprops: torch.Tensor) -> torch.Tensor:
        grads = self.grad_sample(module, activation, backprops)
        return gram_of_grads(grads)

    def self_gram(self, module: nn.Module, activation: torch.Tensor, backprops: torch.Tensor) -> torch.Tensor:
        """The diagonal blocks of :meth:`gram`, ``[B, d, d]`` float64: each sample's own kernel."""
        return self_gram_of_grads(self.grad_sample(module, activation, backprops))

    def sketch(
        self,
        module: nn.Module,
        activation: torch.Tensor,
        backprops: torch.Tensor,
        sketches: Dict[str, "ParamSketch"],
    ) -> Grads:
        grads = self.grad_sample(module, activation, backprops)
        return {name: sketches[name].project_gradients(g) for name, g in grads.items()}


def gram_of_grads(grads: Grads) -> torch.Tensor:
    """Sum over parameters of the Gram matrices of flattened per-sample gradients.

    ``grads`` values are ``[B, d, *shape]``; the result is ``[B*d, B*d]`` in float64.
    """
    total = None
    for g in grads.values():
        flat = g.reshape(g.shape[0] * g.shape[1], -1)
        part = (flat @ flat.T).double()
        total = part if total is None else total + part
    if total is None:
        raise ValueError("no trainable parameters in this module")
    return total


def self_gram_of_grads(grads: Grads) -> torch.Tensor:
    """``[B, d, d]`` float64: each sample's Gram of its d gradients, summed over parameters."""
    total = None
    for g in grads.values():
        flat = g.reshape(g.shape[0], g.shape[1], -1)
        part = (flat @ flat.transpose(1, 2)).double()
        total = part if total is None else total + part
    if total is None:
        raise ValueError("no trainable parameters in this module")
    return total


def sums_of_grads(grads: Grads, weights: torch.Tensor) -> Grads:
    """``grads`` ``{name: [B, d, *shape]}`` -> ``{name: [K, *shape]}``."""
    out: Grads = {}
    for name, g in grads.items():
        flat = g.reshape(g.shape[0], g.shape[1], -1)
        out[name] = torch.einsum("bmp,bmk->kp", flat, weights.to(flat.dtype)).reshape(-1, *g.shape[2:])
    return out


def dots_of_grads(grads: Grads, sums: Grads) -> Optional[torch.Tensor]:
    total = None
    for name, g in grads.items():
        if name not in sums:
            continue
        s = sums[name]
        part = torch.einsum("bmp,kp->bmk", g.reshape(g.shape[0], g.shape[1], -1), s.reshape(s.shape[0], -1).to(g.dtype))
        total = part if total is None else total + part
    return total


def sum_to_batch(x: torch.Tensor, keep: int) -> torch.Tensor:
    """Sum ``x`` over every dimension except the first ``keep`` ones."""
    if x.dim() == keep:
        return x
    return x.sum(dim=tuple(range(keep, x.dim())))
