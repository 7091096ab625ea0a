"""One captured forward/backward pass and what is computed from it.

:meth:`Engine.backprop` runs the model once with the hooks active (see
:mod:`nnsim_hooks.engine.captured_pass`). From what was captured:

- :meth:`Engine.grads`: per-sample gradients, keyed by the model's parameter names;
- :meth:`Engine.gram`: the Gram matrix of all per-sample gradients (ghost inner products
  where the layer allows), one layer at a time;
- :meth:`Engine.self_kernels`, :meth:`Engine.weighted_sums`, :meth:`Engine.dots`: what the
  exact density needs (see :mod:`nnsim_hooks.exact.dataset_kernel`);
- :meth:`Engine.sketch`: sketched per-sample gradients, never materialised for layers
  with a factored rule.

Each goes through one loop over the pass's units (:mod:`nnsim_hooks.engine.units`): a call
of a module on a fast rule asks the rule (:class:`~nnsim_hooks.rules.base.LayerRule`); a
module on the generic rule is handled whole (:mod:`nnsim_hooks.engine.generic`).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn
from torch.utils._pytree import tree_map

from ..capture.hooks import LayerCall
from ..capture.targets import CoverageReport, Target
from ..exact.gram_blocks import GramTerm
from ..rules.base import Grads, dots_of_grads, sums_of_grads
from .captured_pass import MANY_OUTPUTS, Pass, PassRunner  # noqa: F401 - Pass and MANY_OUTPUTS: part of this module's API
from .generic import GenericRule
from .outputs import OutputSpec
from .sketch import Sketcher
from .units import check_finite, each_unit, sum_by_parameter, unit_grads


class Engine:
    def __init__(self, model: nn.Module, targets: List[Target], output: OutputSpec, coverage: CoverageReport):
        self.model = model
        self.coverage = coverage
        self.passes = PassRunner(model, targets, output, coverage)
        self.generic = GenericRule()

    # -- the captured pass -------------------------------------------------------------

    @property
    def output(self) -> OutputSpec:
        return self.passes.output

    @output.setter
    def output(self, spec: OutputSpec) -> None:
        self.passes.output = spec

    @property
    def targets(self) -> Dict[str, Target]:
        return self.passes.plan.targets

    @property
    def capture(self):
        return self.passes.capture

    @property
    def fallback_methods(self) -> Dict[str, str]:
        """How the generic rule ran for each module: "vmap", "loop" or "direct uses"."""
        return self.generic.methods

    def backprop(self, inputs, targets=None, create_graph: bool = False) -> Pass:
        """One captured pass; ``create_graph=True`` keeps the captured gradients in the
        autograd graph (the training term differentiates through them)."""
        return self.passes.run(inputs, targets, create_graph)

    def _fallback(self, target: Target, calls: List[LayerCall], p: Pass) -> Grads:
        return self.generic.grads(target, calls, p)

    def _generic_grads(self, target: Target, calls: List[LayerCall], p: Pass) -> Grads:
        """A generic-rule unit's per-sample gradients, kept for reuse within ``p`` when
        :meth:`reuse_generic` asked for it."""
        if p.reused is None:
            return self._fallback(target, calls, p)
        key = tuple(id(c) for c in calls)
        if key not in p.reused:
            grads = self._fallback(target, calls, p)
            size = sum(g.numel() * g.element_size() for g in grads.values())
            if size > p.reuse_bytes:
                return grads
            p.reuse_bytes -= size
            p.reused[key] = grads
        return p.reused[key]

    @staticmethod
    def reuse_generic(p: Pass, max_bytes: int) -> None:
        """Keep the generic-rule modules' per-sample gradients of ``p`` (up to ``max_bytes``)
        for the next uses of the same pass (the exact density's self kernels, then its
        sums), instead of re-running torch.func for each."""
        p.reused, p.reuse_bytes = {}, max_bytes

    def _each_unit(self, p: Pass, fast, materialised, fast_when=None):
        return each_unit(self.passes.plan, p, fast, materialised, self._generic_grads, fast_when)

    def unit_grads(self, target: Target, calls: List[LayerCall], p: Pass) -> Grads:
        """Per-sample gradients ``[B, d, *shape]`` of one unit, keyed by local parameter name."""
        return unit_grads(self.passes.plan, target, calls, p, self._generic_grads)

    # -- per-sample gradients ------------------------------------------------------------

    @torch.no_grad()
    def grads(self, p: Pass) -> Grads:
        """Per-sample gradients keyed by ``model.named_parameters()`` names: ``[B, *shape]``
        for a scalar output, ``[B, d, *shape]`` when the output function returns ``[B, d]``."""
        parts = self._each_unit(
            p,
            fast=lambda target, call, activation, backprops: target.rule.grad_sample(call.module, activation, backprops),
            materialised=lambda target, grads: grads,
        )
        total = sum_by_parameter(self.passes.plan, parts, check=True)
        # Parameters no call reached (an unused branch) have zero gradients.
        for t in self.targets.values():
            for local, name in t.param_names.items():
                if name not in total:
                    param = t.module.get_parameter(local)
                    total[name] = torch.zeros(p.batch, p.d, *param.shape, dtype=p.values.dtype, device=p.values.device)
        order = {n: i for i, (n, _) in enumerate(self.model.named_parameters())}
        out = {n: total[n] for n in sorted(total, key=order.__getitem__)}
        return out if p.vector else {n: g[:, 0] for n, g in out.items()}

    # -- Gram matrices -------------------------------------------------------------------

    @torch.no_grad()
    def gram(self, p: Pass) -> torch.Tensor:
        """``[B*d, B*d]`` float64 Gram matrix of all per-sample gradients (sample-major)."""
        return self.gram_of_terms(self.gram_terms(p))

    @torch.no_grad()
    def gram_of_terms(self, terms: List[GramTerm]) -> torch.Tensor:
        return self._sum_of_terms(terms, GramTerm.gram)

    def _sum_of_terms(self, terms: List[GramTerm], part_of) -> torch.Tensor:
        """``sum(part_of(term))``; the parts computed from factors are checked for NaN/Inf
        (materialised gradients were checked when they were formed)."""
        total = None
        checks = []
        for term in terms:
            part = part_of(term)
            if term.grads is None:
                checks.append((term.owner, part))
            total = part if total is None else total + part
        check_finite(self.passes.plan, checks)
        return total

    @torch.no_grad()
    def gram_terms(self, p: Pass, keep: bool = False) -> List[GramTerm]:
        """The additive parts of :meth:`gram` (see :mod:`nnsim_hooks.exact.gram_blocks`): a fast
        rule's factors for a module called once, else materialised per-sample gradients
        (summed first over the calls of modules called twice and over tied weights).
        ``keep=True`` (the parts are stored) materialises a fast rule's gradients too
        where they are smaller than its factors (norms, depthwise convolutions)."""
        plan = self.passes.plan
        counts = plan.call_counts(p.calls)
        seen: Dict[str, int] = {}
        checks = []

        def key_of(target: Target) -> str:
            number = seen[target.name] = seen.get(target.name, -1) + 1
            return f"{target.name}#{number}"

        def alone(target: Target) -> bool:
            return counts[id(target.module)] == 1 and not (set(target.param_names.values()) & plan.shared)

        def fast(target, call, activation, backprops) -> List[GramTerm]:
            key, rule = key_of(target), target.rule
            parts = rule.parts(call.module, activation, backprops)
            if parts:  # a rule of the whole call split into simpler layers: their factors
                return [GramTerm(f"{key}/{part.suffix}", target.name, rule=part.rule, module=part.module,
                                 activation=part.activation, backprops=part.backprops) for part in parts]
            if not torch.is_tensor(activation):
                # A rule of the whole call (attention): its own Gram within this pass; kept
                # across batches as per-sample gradients (its operands do not concatenate).
                if keep:
                    grads = rule.grad_sample(call.module, activation, backprops)
                    checks.extend((target.name, g) for g in grads.values())
                    return [GramTerm.of_grads(key, target.name, grads)]
                # computed (and checked) in gram_of_terms
                return [GramTerm(key, target.name, rule=rule, module=call.module, activation=activation,
                                 backprops=backprops, whole_call=True)]
            term = GramTerm(key, target.name, rule=rule, module=call.module, activation=activation,
                            backprops=backprops)
            if keep and self._grad_bytes(target, p) <= term.nbytes():
                grads = rule.grad_sample(call.module, activation, term.backprops)
                checks.extend((target.name, g) for g in grads.values())
                term = GramTerm.of_grads(key, target.name, grads)
            return [term]

        def materialised(target, grads) -> Grads:
            checks.extend((target.name, g) for g in grads.values())
            return grads

        terms: List[GramTerm] = []
        pending: Grads = {}  # summed gradients of modules called twice / tied weights
        for target, took_fast, part in self._each_unit(
            p, fast, materialised, fast_when=lambda target, call: alone(target) and not call.skip
        ):
            if took_fast:
                terms.extend(part)
                continue
            key = key_of(target)
            for local, g in part.items():
                name = target.param_names[local]
                if alone(target) or target.rule is None and name not in plan.shared:
                    terms.append(GramTerm.of_grads(f"{key}/{local}", target.name, {name: g}))
                else:
                    pending[name] = pending[name] + g if name in pending else g
        if pending:
            terms.append(GramTerm.of_grads("shared:" + ",".join(sorted(pending)), "shared parameters", pending))
        check_finite(plan, checks)
        if not terms:
            raise ValueError("no trainable parameters in this pass")  # pragma: no cover - find_targets refuses
        return terms

    def _grad_bytes(self, target: Target, p: Pass) -> int:
        numel = sum(target.module.get_parameter(local).numel() for local in target.param_names)
        return p.batch * p.d * numel * p.values.element_size()

    # -- weighted sums of per-sample gradients (exact density, consistency) -------------

    @torch.no_grad()
    def self_kernels(self, p: Pass) -> torch.Tensor:
        """``K(x_i, x_i) = J_i J_i^T``, ``[B, d, d]`` float64 (the Gram's diagonal blocks)."""
        return self._sum_of_terms(self.gram_terms(p), lambda term: term.self_gram(p.d))

    @torch.no_grad()
    def weighted_sums(self, p: Pass, weights: torch.Tensor) -> Grads:
        """``S_k = sum_j sum_m W[j, m, k] g_{j,m}`` for ``W [B, d, K]``: ``{name: [K, *shape]}``
        keyed by the model's parameter names (see :mod:`nnsim_hooks.exact.dataset_kernel`)."""
        parts = self._each_unit(
            p,
            fast=lambda target, call, activation, backprops: target.rule.sums(call.module, activation, backprops, weights),
            materialised=lambda target, grads: sums_of_grads(grads, weights),
        )
        return sum_by_parameter(self.passes.plan, parts, check=False)

    @torch.no_grad()
    def dots(self, p: Pass, sums: Grads) -> torch.Tensor:
        """``P[i, m, k] = g_{i,m} . S_k`` ``[B, d, K]`` float64, for accumulators ``sums`` from
        :meth:`weighted_sums` (parameters missing from ``sums`` count as zero)."""
        k = next(iter(sums.values())).shape[0]

        def local_sums(target: Target, skip=()) -> Grads:
            return {n: sums[g] for n, g in target.param_names.items() if g in sums and n not in skip}

        def fast(target, call, activation, backprops) -> Optional[torch.Tensor]:
            local = local_sums(target, call.skip)
            return target.rule.dots(call.module, activation, backprops, local) if local else None

        total = torch.zeros(p.batch, p.d, k, dtype=torch.float64, device=p.values.device)
        for _, _, part in self._each_unit(
            p, fast, materialised=lambda target, grads: dots_of_grads(grads, local_sums(target))
        ):
            if part is not None:
                total += part.double()
        return total

    # -- sketches ----------------------------------------------------------------------

    @torch.no_grad()
    def sketch(self, p: Pass, sketcher: Sketcher) -> torch.Tensor:
        """Sketched gradients ``[B, d, dim]`` (not normalised), in float32 at least: a
        bfloat16 or float16 model (or autocast) has its captured activations and output
        gradients cast up before they are multiplied by the sketch matrices, so that the
        sums over positions and over the ``M`` stage-1 coordinates are not rounded to 8 bits."""
        dtype, device = sketch_dtype(p.values.dtype), p.values.device

        def local_sketches(target: Target):
            sketches = sketcher.param_sketches(list(target.param_names.values()), device, dtype)
            return {k: sketches[g] for k, g in target.param_names.items()}

        parts = self._each_unit(
            p,
            fast=lambda target, call, activation, backprops: target.rule.sketch(
                call.module, cast_up(activation, dtype), cast_up(backprops, dtype), local_sketches(target)),
            materialised=lambda target, grads: {
                k: sketch.project_gradients(cast_up(grads[k], dtype))
                for k, sketch in _pick(local_sketches(target), grads).items()
            },
        )
        return sketcher.combine(sum_by_parameter(self.passes.plan, parts, check=True), p.batch, p.d, device, dtype)

    def close(self) -> None:
        self.passes.close()


def sketch_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype sketches are computed in: the captured one, or float32 when that is a
    16-bit float (float64 stays float64)."""
    return torch.promote_types(dtype, torch.float32) if dtype.is_floating_point else torch.float32


def cast_up(x: Any, dtype: torch.dtype) -> Any:
    """``x`` (a tensor or a nest of them) with its floating tensors of lower precision than
    ``dtype`` cast to it; the rest unchanged (no copy when nothing is cast)."""
    def one(t):
        if torch.is_tensor(t) and t.is_floating_point() and t.dtype != dtype and torch.finfo(t.dtype).bits < torch.finfo(dtype).bits:
            return t.to(dtype)
        return t

    return tree_map(one, x)


def _pick(sketches: Dict, grads: Grads) -> Dict:
    """``sketches`` for the parameters of ``grads``, in the order of ``grads``."""
    return {k: sketches[k] for k in grads}

