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

From these a rule provides, each for all d outputs at once:

- :meth:`LayerRule.grad_sample` (required) materialises per-sample gradients
  ``[B, d, *shape]``, keyed by the module's local parameter names;
- :meth:`LayerRule.factors` (optional): for a layer whose weight gradient is
  ``sum_u rows_u cols_u^T`` over positions u (Linear, convolutions), the two factors.
  A rule that gives them gets the factored Gram, self-Gram, sketch, weighted sums and
  products below without writing them, and the training term's ghost inner products;
- :meth:`LayerRule.gram`: the Gram matrix of the per-sample gradients, ``[B*d, B*d]``
  (rows ordered sample-major), ghost inner products where the layer allows;
- :meth:`LayerRule.self_gram`: the Gram's diagonal blocks ``[B, d, d]`` (each sample's own
  kernel, which the exact density needs without the rest);
- :meth:`LayerRule.sketch`: the randomly projected gradients ``[B, d, m]``;
- :meth:`LayerRule.sums` and :meth:`LayerRule.dots`: weighted sums of the per-sample
  gradients and each sample's products with them (the exact density, see
  :mod:`nnsim_hooks.exact.dataset_kernel`);
- :meth:`LayerRule.parts`: for a rule of the whole call, the call split into simpler
  layers' calls whose operands concatenate across batches (attention's two matrix
  products as Linear layers), which the exact Gram keeps between batches.

Every method but :meth:`grad_sample` has a default here: from :meth:`factors` when the
rule gives them, else from the materialised gradients. ``differentiable = True`` declares
that :meth:`grad_sample` and :meth:`factors` are plain torch maths on their arguments
that keep the autograd graph, so that the training term (the paper, §4) can
differentiate through them; a rule that does not declare it is handled there by
torch.func.

A new rule is one file: a subclass with :meth:`grad_sample` (and whatever faster forms
the layer allows), registered with ``@register_rule(ModuleType)``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .factored import factored_dots, factored_gram, factored_self_gram, factored_sketch, factored_sums, mix

if TYPE_CHECKING:  # pragma: no cover
    from ..capture.hooks import LayerCall
    from ..engine.sketch import ParamSketch

Grads = Dict[str, torch.Tensor]


def trainable(module: nn.Module) -> Iterator[Tuple[str, nn.Parameter]]:
    """The module's own (non-recursive) parameters that require grad."""
    for name, param in module.named_parameters(recurse=False):
        if param.requires_grad:
            yield name, param


def trains(module: Any, name: str) -> bool:
    """True when ``module.<name>`` is a tensor that requires grad (None, absent or frozen: False)."""
    p = getattr(module, name, None)
    return isinstance(p, torch.Tensor) and p.requires_grad


class Part(NamedTuple):
    """One simpler layer's call inside a rule of the whole call (see :meth:`LayerRule.parts`)."""

    suffix: str  # tells the part apart within the call ("in_proj")
    rule: "LayerRule"
    module: Any  # what ``rule`` reads: an nn.Module or a view with the same attributes
    activation: torch.Tensor
    backprops: torch.Tensor


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

    #: True: grad_sample and factors keep the autograd graph (the training term uses them)
    differentiable = False

    def grad_sample(self, module: nn.Module, activation: torch.Tensor, backprops: torch.Tensor) -> Grads:
        """Per-sample gradients ``{local name: [B, d, *shape]}`` of the module's trainable
        parameters. Required."""
        raise NotImplementedError(f"{type(self).__name__} must implement grad_sample")

    def factors(self, module: nn.Module, activation, backprops) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """``(cols [B, c, L], rows [d, B, r, L])`` when the per-sample gradient of ``weight``
        (any shape with ``r * c`` elements) is ``sum_u rows_u cols_u^T`` over L positions and
        that of ``bias`` (if trainable) is ``sum_u rows_u``; None (the default): no such form."""
        return None

    def gram(self, module: nn.Module, activation, backprops) -> torch.Tensor:
        """``[B*d, B*d]`` float64 Gram matrix of the per-sample gradients (sample-major)."""
        f = self.factors(module, activation, backprops)
        if f is not None:
            return factored_gram(*f, trains(module, "weight"), trains(module, "bias"))
        return gram_of_grads(self.grad_sample(module, activation, backprops))

    def self_gram(self, module: nn.Module, activation, backprops) -> torch.Tensor:
        """The diagonal blocks of :meth:`gram`, ``[B, d, d]`` float64: each sample's own kernel."""
        f = self.factors(module, activation, backprops)
        if f is not None:
            return factored_self_gram(*f, trains(module, "weight"), trains(module, "bias"))
        return self_gram_of_grads(self.grad_sample(module, activation, backprops))

    def sketch(self, module: nn.Module, activation, backprops, sketches: Dict[str, "ParamSketch"]) -> Grads:
        """``{local name: [B, d, m]}``: each parameter's per-sample gradients projected by its
        :class:`~nnsim_hooks.engine.sketch.ParamSketch` in ``sketches``."""
        f = self.factors(module, activation, backprops)
        if f is not None:
            return factored_sketch(module, *f, sketches)
        grads = self.grad_sample(module, activation, backprops)
        return {name: sketches[name].project_gradients(g) for name, g in grads.items()}

    def sums(self, module: nn.Module, activation, backprops, weights: torch.Tensor) -> Grads:
        """``{local name: [K, *shape]}``: ``S_k = sum_i sum_m W[i, m, k] g_{i,m}`` for weights
        ``W [B, d, K]`` (see :mod:`nnsim_hooks.exact.dataset_kernel`)."""
        f = self.factors(module, activation, backprops)
        if f is None:
            return sums_of_grads(self.grad_sample(module, activation, backprops), weights)
        cols, rows = f
        out: Grads = {}
        if trains(module, "weight"):
            out["weight"] = factored_sums(cols, rows, weights).reshape(weights.shape[2], *module.weight.shape)
        if trains(module, "bias"):
            out["bias"] = mix(rows.sum(-1), weights).sum(1)
        return out

    def dots(self, module: nn.Module, activation, backprops, sums: Grads) -> Optional[torch.Tensor]:
        """``[B, d, K]``: ``g_{i,m} . S_k`` for accumulators ``sums`` ``{local name: [K, *shape]}``
        (absent parameters count as zero; None when none is there)."""
        f = self.factors(module, activation, backprops)
        if f is None:
            return dots_of_grads(self.grad_sample(module, activation, backprops), sums)
        cols, rows = f
        total = None
        if "weight" in sums:
            s = sums["weight"]
            total = factored_dots(cols, rows, s.reshape(s.shape[0], rows.shape[2], cols.shape[1]))
        if "bias" in sums:
            part = torch.einsum("mbr,kr->bmk", rows.sum(-1), sums["bias"].to(rows.dtype))
            total = part if total is None else total + part
        return total

    def parts(self, module: nn.Module, activation, backprops) -> Optional[List[Part]]:
        """For a rule of the whole call: the call as simpler layers' calls (:class:`Part`)
        whose operands, unlike the call's, concatenate across batches; the exact Gram then
        keeps those between batches. None (the default): not split."""
        return None


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
