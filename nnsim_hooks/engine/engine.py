"""One captured forward/backward pass and the three things computed from it.

:meth:`Engine.backprop` runs the model once with the hooks active and back-propagates
each of the d differentiated outputs, stopping at the hooked modules' inputs so that no
weight gradient is formed. From what was captured:

- :meth:`Engine.grads`: per-sample gradients, keyed by the model's parameter names;
- :meth:`Engine.gram`: the Gram matrix of all per-sample gradients (ghost inner products
  where the layer allows), one layer at a time;
- :meth:`Engine.sketch`: sketched per-sample gradients, never materialised for layers
  with a factored rule.

Modules with a fast rule are handled call by call. Modules on the generic rule are
handled whole: from the direct uses of their parameters when that split has been
checked (:mod:`nnsim_hooks.capture.direct_uses`), else by re-running them under torch.func.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Set, Tuple

import torch
import torch.nn as nn

from ..capture.hooks import Capture, LayerCall
from ..exact import gradient_sums
from ..capture.direct_uses import split_grads
from ..exact.gram_blocks import GramTerm
from ..capture.batch_mixing import Trace, gradient_mixing, not_batch_first
from ..errors import BatchCouplingError, ModelError, NonFiniteGradientError
from .outputs import OutputSpec, check_no_mixing
from ..rules.fallback import fallback_grad_sample
from ..rules.linear import LinearRule
from ..rules.norm import batch_coupling_message, uses_batch_statistics
from .sketch import Sketcher
from ..capture.targets import CoverageReport, Target, promote, shared_parameters
from ..capture.param_uses import DirectUse, ModuleStack, ParamUseRecorder
from ..validation import call_model, check_inputs, check_targets, model_device_dtype

logger = logging.getLogger(__name__)

# Above this many differentiated values per sample, warn: one backward pass each.
MANY_OUTPUTS = 64

Grads = Dict[str, torch.Tensor]


@dataclass
class Pass:
    """What one captured batch left behind."""

    calls: List[LayerCall]
    outputs: Any  # the model's outputs, detached
    values: torch.Tensor  # the differentiated values, [B, d]
    vector: bool  # True when the output function returned [B, d] rather than [B]
    batch: int
    uses: List[DirectUse] = field(default_factory=list)
    unsplittable: Set[int] = field(default_factory=set)
    #: generic-rule gradients kept for reuse within this pass (see Engine.reuse_generic)
    reused: Optional[Dict[Tuple[int, ...], Grads]] = None
    reuse_bytes: int = 0

    @property
    def d(self) -> int:
        return self.values.shape[1]


class _Replan(Exception):
    """Raised inside a pass when the plan changed and the pass must be run again."""


class Engine:
    def __init__(self, model: nn.Module, targets: List[Target], output: OutputSpec, coverage: CoverageReport):
        self.model = model
        self.output = output
        self.coverage = coverage
        self._batchnorms = [
            (n, m) for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
        ]
        self._dropouts = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
        #: how the generic rule ran for each module: "vmap", "loop" or "direct uses"
        self.fallback_methods: Dict[str, str] = {}
        #: per generic-rule module: True once its direct-use split matched a full re-run
        self._split_checked: Dict[str, bool] = {}
        #: batch sizes whose layout was checked (see layout.py), and the modules found
        #: to get inputs without the batch first
        self._layout_checked: Set[int] = set()
        self._warned_many = False
        self._not_batch_first: Set[int] = set()
        self._gradient_layout_checked: Set[int] = set()
        self.capture = Capture({}, self._check_module)
        self._stack: Optional[ModuleStack] = None
        try:
            self._set_targets(targets)
            self._stack = ModuleStack(model)
        except Exception:
            self.close()
            raise

    def _set_targets(self, targets: List[Target]) -> None:
        self.targets = {t.name: t for t in targets}
        self._by_module = {id(t.module): t for t in targets}
        self._shared = shared_parameters(targets)
        self._generic = {id(t.module) for t in targets if t.rule is None}
        self._holders: Dict[int, set] = {}
        for t in targets:
            for local in t.param_names:
                self._holders.setdefault(id(t.module.get_parameter(local)), set()).add(id(t.module))
        for t in targets:
            if t.name not in self.capture.modules:
                self.capture.add(t.name, t.module)

    # -- the captured pass -------------------------------------------------------------

    def _check_module(self, name: str, module: nn.Module) -> None:
        target = self.targets[name]
        if target.rule is not None:
            target.rule.check(module, name)

    def _check_model_state(self) -> None:
        for name, module in self._batchnorms:
            if uses_batch_statistics(module):
                raise BatchCouplingError(batch_coupling_message(name, module))
        generic_roots = [t.name for t in self.targets.values() if t.rule is None]
        for name, module in self._dropouts:
            if module.training and module.p > 0 and any(
                r == "" or name == r or name.startswith(r + ".") for r in generic_roots
            ):
                raise ModelError(
                    f"dropout '{name}' is active (training mode) inside module handled by the generic rule, "
                    "which re-runs that module and would draw other dropout masks. Call model.eval()."
                )

    def backprop(self, inputs, targets=None) -> Pass:
        batch = check_inputs(self.model, inputs)
        device, _ = model_device_dtype(self.model)
        targets = check_targets(targets, batch, device)
        self._check_model_state()
        # A parameter used outside its module's forward hands the module that used it
        # to the generic rule; the pass is then run again with the new plan.
        for _ in range(len(self.targets) + 2):
            try:
                return self._backprop(inputs, targets, batch)
            except _Replan:
                continue
        raise ModelError("the set of modules using parameters keeps changing between passes")  # pragma: no cover

    def _backprop(self, inputs, targets, batch: int) -> Pass:
        check_layout = batch >= 2 and batch not in self._layout_checked
        capture = self.capture
        capture.clear()
        capture.batch = batch
        recorder = ParamUseRecorder(
            self._holders, self._generic, self._stack, lambda: capture.pass_index, batch, self._not_batch_first
        )
        recorder.mark_batch(inputs)
        capture.on_batch = recorder.on_batch
        capture.derives_from_batch = recorder.derives_from_batch
        capture.rule_of = lambda module: self._by_module[id(module)].rule
        capture.on_unbatched = lambda module: recorder.unbatched_call(module, self._params_of(module))
        capture.covered = self._covered
        capture.params_of = self._params_of
        capture.active = True
        self._stack.clear()
        self._stack.recorder = recorder
        self._stack.trace = Trace(leaves=True) if check_layout else None
        self._stack.active = True
        try:
            # Our hooks go on the model for this pass only (capture first: its forward
            # hooks then run while the module is still on the stack).
            capture.install()
            self._stack.install()
            with torch.enable_grad():
                with recorder:
                    outputs = call_model(self.model, inputs)
                capture.active = False
                self._stack.active = False
                if check_layout:
                    bad = not_batch_first(self.model, inputs, batch, self._stack.trace, outputs) - self._not_batch_first
                    self._layout_checked.add(batch)  # after: a model that mixes samples is refused every time
                    if bad:  # this pass took those modules as batch first: run it again
                        self._not_batch_first |= bad
                        raise _Replan()
                if recorder.strays:
                    self._set_targets(
                        promote(self.model, list(self.targets.values()), recorder.strays, self.coverage, recorder.shared)
                    )
                    raise _Replan()
                if self.output.name == "auto":
                    self.output = self.output.resolve(outputs)
                values = self.output(outputs, targets, batch)
                vector = values.dim() == 2
                if vector and values.shape[1] > MANY_OUTPUTS and not self._warned_many:
                    self._warned_many = True
                    warnings.warn(
                        f"nnsim_hooks: output '{self.output.name}' gives {values.shape[1]} values per sample, so each "
                        f"batch takes {values.shape[1]} backward passes; for dense outputs reduce them first "
                        "(output='sum', a region of interest, or a callable)",
                        RuntimeWarning,
                        stacklevel=4,
                    )
                values = values if vector else values.unsqueeze(1)
                check_no_mixing(self.output, outputs, targets, values if vector else values[:, 0])
                if not bool(torch.isfinite(values).all()):
                    bad = (~torch.isfinite(values)).any(1).nonzero().flatten()[:10].tolist()
                    raise NonFiniteGradientError(f"the model's outputs are NaN or Inf for samples {bad}")
                if not values.requires_grad:
                    raise ModelError(
                        "the differentiated output does not depend on any selected trainable parameter; "
                        "check layers= and requires_grad"
                    )
                if not capture.calls:
                    raise ModelError(
                        "none of the selected modules ran on the batch during the model's forward pass. A module "
                        "some of whose outputs do not have the batch first (a recurrent layer's h_n [layers, B, H]) "
                        "is computed by the module that calls it: if it is the whole model, wrap it in a module "
                        "that returns only batch-first outputs"
                    )
                grad_inputs = capture.grad_inputs()
                seen = {id(t) for t in grad_inputs}
                # Reach the ops that use generic-rule parameters directly, too.
                grad_inputs += [u.param for u in recorder.uses if id(u.param) not in seen and not seen.add(id(u.param))]
                for j in range(values.shape[1]):
                    capture.pass_index = j
                    torch.autograd.grad(
                        values[:, j].sum(), grad_inputs, retain_graph=j < values.shape[1] - 1, allow_unused=True
                    )
            calls = list(capture.calls)
            for call in calls:
                call.check_unchanged()
        finally:
            capture.active = False
            self._stack.active = False
            self._stack.clear()
            self._stack.recorder = None
            self._stack.trace = None
            recorder.remove_hooks()
            capture.remove()
            self._stack.remove()
        if batch >= 2 and batch not in self._gradient_layout_checked:
            self._gradient_layout_checked.add(batch)
            self._check_gradient_layout(inputs, targets, batch)
        detached = outputs.detach() if torch.is_tensor(outputs) else outputs
        return Pass(calls, detached, values.detach(), vector, batch, recorder.uses, recorder.unsplittable)

    def _check_gradient_layout(self, inputs, targets, batch: int) -> None:
        """Once per batch size: samples mixed in the backward only (see layout.py).

        A warning, not an error: some models' backward kernels give gradients that differ
        by batch size (timm's efficientformer_l1 on CPU, about 1% in float64) while the
        per-sample gradients still match a per-sample loop, so this check cannot tell
        such rounding from mixing for sure."""
        modules = [t.module for t in self.targets.values()]
        try:
            culprit = gradient_mixing(self.model, modules, inputs, targets, batch, self.output, self._not_batch_first)
        except Exception as exc:  # the check itself must never break a model that works
            logger.debug("gradient layout check skipped: %s", exc)
            return
        if culprit is not None:
            warnings.warn(
                f"nnsim_hooks: the gradient reaching module '{culprit}' for one sample changes when the other "
                "samples of the batch change, although the forward values do not. Either a later layer mixes the "
                "samples in a way the values hide (attention across the batch dimension: per-sample gradients are "
                "then not defined and these numbers are wrong), or the model's backward rounds differently by batch "
                "size. Check with nnsim_hooks.oracle.check_per_sample_gradients(model, inputs).",
                RuntimeWarning,
                stacklevel=5,
            )

    def _covered(self, module: nn.Module) -> Set[str]:
        """Parameters of ``module`` that a running generic-rule ancestor also holds: its
        re-run includes this call, so counting them here too would count them twice."""
        target = self._by_module[id(module)]
        running = [m for m in self._stack.stack if m is not module and id(m) in self._generic]
        if not running:
            return set()
        ids = {id(m) for m in running}
        return {local for local in target.param_names if self._holders[id(module.get_parameter(local))] & ids}

    def _params_of(self, module: nn.Module) -> List[nn.Parameter]:
        target = self._by_module[id(module)]
        return [module.get_parameter(local) for local in target.param_names]

    # -- per-target results ------------------------------------------------------------

    def _fast(self, call: LayerCall) -> bool:
        target = self._by_module[id(call.module)]
        return target.rule is not None and (len(call.out_leaves) == 1 or target.rule.multi_output)

    def _units(self, p: Pass) -> Iterator[Tuple[Target, List[LayerCall]]]:
        """Fast-rule calls one by one, then each generic-rule module with all its calls."""
        generic: Dict[str, List[LayerCall]] = {}
        for call in p.calls:
            target = self._by_module[id(call.module)]
            if self._fast(call):
                yield target, [call]
            else:
                generic.setdefault(target.name, []).append(call)
        for name, calls in generic.items():
            yield self.targets[name], calls

    def _unit_grads(self, target: Target, calls: List[LayerCall], p: Pass) -> Grads:
        """Per-sample gradients ``[B, d, *shape]`` keyed by local parameter name."""
        if len(calls) == 1 and self._fast(calls[0]):
            call = calls[0]
            grads = target.rule.grad_sample(call.module, *target.rule.operands(call, p.d))
            return {k: v for k, v in grads.items() if k not in call.skip}
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

    def _fallback(self, target: Target, calls: List[LayerCall], p: Pass) -> Grads:
        names = list(target.param_names)
        params = {n: target.module.get_parameter(n) for n in names}
        splittable = (
            target.rule is None
            and not any(id(q) in p.unsplittable for q in params.values())
            and not any(call.skip for call in calls)
        )
        checked = self._split_checked.get(target.name)
        if splittable and checked:
            split = split_grads(p.uses, params, p.d, p.batch, p.values.dtype, p.values.device)
            if split is not None:
                self.fallback_methods[target.name] = "direct uses"
                return split
        out: Grads = {}
        for call in calls:
            wanted = [n for n in names if n not in call.skip]
            if not wanted:
                continue
            grads, method = fallback_grad_sample(call, p.d, wanted)
            self.fallback_methods[target.name] = method
            for n, g in grads.items():
                out[n] = out[n] + g if n in out else g
        if splittable and checked is None and p.batch >= 2:
            split = split_grads(p.uses, params, p.d, p.batch, p.values.dtype, p.values.device)
            if split is not None:
                ok = all(_close(split[n], out[n]) for n in out)
                self._split_checked[target.name] = ok
                logger.debug("direct-use split for %r %s the full re-run", target.name, "matches" if ok else "differs from")
        return out

    def _check_finite(self, results: List[Tuple[str, torch.Tensor]]) -> None:
        if not results:
            return
        # A NaN or Inf anywhere makes the sum non-finite: one reduction in the tensor's own
        # dtype (no copy, no mask as large as the per-sample gradients). A sum that merely
        # overflows is confirmed element-wise below before anything is raised.
        flags = torch.isfinite(torch.stack([r.sum().to(torch.float64) for _, r in results]))
        if bool(flags.all()):
            return
        # Backward visits the modules in reverse; the first non-finite one from the output
        # end is where the problem starts.
        for (name, r), ok in reversed(list(zip(results, flags.tolist()))):
            if not ok:
                target = self.targets[name]
                bad = (~torch.isfinite(r.reshape(r.shape[0], -1))).any(1).nonzero().flatten()[:10].tolist()
                if not bad:
                    continue  # the sum overflowed; every entry is finite
                raise NonFiniteGradientError(
                    f"the per-sample gradient of module '{name}' ({type(target.module).__name__}) is NaN or Inf "
                    f"for samples {bad}; check the inputs for NaN/Inf and the model for overflow there"
                )

    @torch.no_grad()
    def grads(self, p: Pass) -> Grads:
        """Per-sample gradients keyed by ``model.named_parameters()`` names: ``[B, *shape]``
        for a scalar output, ``[B, d, *shape]`` when the output function returns ``[B, d]``."""
        total: Grads = {}
        checks = []
        for target, calls in self._units(p):
            for local, g in self._unit_grads(target, calls, p).items():
                name = target.param_names[local]
                total[name] = total[name] + g if name in total else g
                checks.append((target.name, g))
        self._check_finite(checks)
        # Parameters no call reached (an unused branch) have zero gradients.
        for t in self.targets.values():
            for local, name in t.param_names.items():
                if name not in total:
                    param = t.module.get_parameter(local)
                    total[name] = torch.zeros(p.batch, p.d, *param.shape, dtype=p.values.dtype, device=p.values.device)
        order = {n: i for i, (n, _) in enumerate(self.model.named_parameters())}
        out = {n: total[n] for n in sorted(total, key=order.__getitem__)}
        return out if p.vector else {n: g[:, 0] for n, g in out.items()}

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
        self._check_finite(checks)
        return total

    @torch.no_grad()
    def gram_terms(self, p: Pass, keep: bool = False) -> List[GramTerm]:
        """The additive parts of :meth:`gram` (see :mod:`nnsim_hooks.exact.gram_blocks`): a fast
        rule's factors for a module called once, else materialised per-sample gradients
        (summed first over the calls of modules called twice and over tied weights).
        ``keep=True`` (the parts are stored) materialises a fast rule's gradients too
        where they are smaller than its factors (norms, depthwise convolutions)."""
        counts: Dict[int, int] = {}
        for call in p.calls:
            counts[id(call.module)] = counts.get(id(call.module), 0) + 1
        terms: List[GramTerm] = []
        seen: Dict[str, int] = {}
        pending: Grads = {}  # summed gradients of modules called twice / tied weights
        checks = []
        for target, calls in self._units(p):
            number = seen[target.name] = seen.get(target.name, -1) + 1
            key = f"{target.name}#{number}"
            alone = counts[id(target.module)] == 1 and not (set(target.param_names.values()) & self._shared)
            if alone and len(calls) == 1 and self._fast(calls[0]) and not calls[0].skip:
                call = calls[0]
                activation, backprops = target.rule.operands(call, p.d)
                parts = None if torch.is_tensor(activation) else getattr(target.rule, "linear_parts", None)
                parts = parts and parts(call.module, activation, backprops)
                if parts:  # a rule of the whole call that splits into Linear layers: their factors
                    for suffix, view, x, delta in parts:
                        terms.append(GramTerm(f"{key}/{suffix}", target.name, rule=_LINEAR, module=view,
                                              activation=x, backprops=delta))
                    continue
                if not torch.is_tensor(activation):
                    # A rule of the whole call (attention): its own Gram within this pass; kept
                    # across batches as per-sample gradients (its operands do not concatenate).
                    if keep:
                        grads = target.rule.grad_sample(call.module, activation, backprops)
                        checks.extend((target.name, g) for g in grads.values())
                        terms.append(GramTerm.of_grads(key, target.name, grads))
                    else:  # computed (and checked) in gram_of_terms
                        terms.append(GramTerm(key, target.name, rule=target.rule, module=call.module,
                                              activation=activation, backprops=backprops, whole_call=True))
                    continue
                term = GramTerm(key, target.name, rule=target.rule, module=call.module, activation=activation,
                                backprops=backprops)
                if keep and self._grad_bytes(target, p) <= term.nbytes():
                    grads = target.rule.grad_sample(call.module, activation, term.backprops)
                    checks.extend((target.name, g) for g in grads.values())
                    term = GramTerm.of_grads(key, target.name, grads)
                terms.append(term)
                continue
            for local, g in self._unit_grads(target, calls, p).items():
                name = target.param_names[local]
                checks.append((target.name, g))
                if alone or target.rule is None and name not in self._shared:
                    terms.append(GramTerm.of_grads(f"{key}/{local}", target.name, {name: g}))
                else:
                    pending[name] = pending[name] + g if name in pending else g
        if pending:
            terms.append(GramTerm.of_grads("shared:" + ",".join(sorted(pending)), "shared parameters", pending))
        self._check_finite(checks)
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
        keyed by the model's parameter names (see :mod:`nnsim_hooks.exact.gradient_sums`)."""
        total: Grads = {}
        for target, calls in self._units(p):
            if len(calls) == 1 and self._fast(calls[0]):
                call = calls[0]
                part = gradient_sums.rule_sums(target.rule, call.module, *target.rule.operands(call, p.d), weights)
                part = {k: v for k, v in part.items() if k not in call.skip}
            else:
                part = gradient_sums.sums_of_grads(self._unit_grads(target, calls, p), weights)
            for local, s in part.items():
                name = target.param_names[local]
                total[name] = total[name] + s if name in total else s
        return total

    @torch.no_grad()
    def dots(self, p: Pass, sums: Grads) -> torch.Tensor:
        """``P[i, m, k] = g_{i,m} . S_k`` ``[B, d, K]`` float64, for accumulators ``sums`` from
        :meth:`weighted_sums` (parameters missing from ``sums`` count as zero)."""
        k = next(iter(sums.values())).shape[0]
        total = torch.zeros(p.batch, p.d, k, dtype=torch.float64, device=p.values.device)
        for target, calls in self._units(p):
            if len(calls) == 1 and self._fast(calls[0]):
                call = calls[0]
                local = {n: sums[g] for n, g in target.param_names.items() if g in sums and n not in call.skip}
                part = gradient_sums.rule_dots(target.rule, call.module, *target.rule.operands(call, p.d), local)
            else:
                local = {n: sums[g] for n, g in target.param_names.items() if g in sums}
                part = gradient_sums.dots_of_grads(self._unit_grads(target, calls, p), local)
            if part is not None:
                total += part.double()
        return total

    @torch.no_grad()
    def sketch(self, p: Pass, sketcher: Sketcher) -> torch.Tensor:
        """Sketched gradients ``[B, d, dim]`` (not normalised)."""
        parts: Grads = {}
        checks = []
        dtype, device = p.values.dtype, p.values.device
        for target, calls in self._units(p):
            sketches = sketcher.param_sketches(list(target.param_names.values()), device, dtype)
            local = {k: sketches[g] for k, g in target.param_names.items()}
            if len(calls) == 1 and self._fast(calls[0]):
                call = calls[0]
                result = target.rule.sketch(call.module, *target.rule.operands(call, p.d), local)
                result = {k: v for k, v in result.items() if k not in call.skip}
            else:
                grads = self._unit_grads(target, calls, p)
                result = {k: local[k].project_gradients(g) for k, g in grads.items()}
            for k, s in result.items():
                name = target.param_names[k]
                checks.append((target.name, s))
                parts[name] = parts[name] + s if name in parts else s
        self._check_finite(checks)
        return sketcher.combine(parts, p.batch, p.d, device, dtype)

    def close(self) -> None:
        self.capture.remove()
        if self._stack is not None:
            self._stack.remove()
            self._stack = None


#: the rule of the Linear layers a whole-call rule splits into (see MultiheadAttentionRule.linear_parts)
_LINEAR = LinearRule()


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    scale = b.abs().max().item() if b.numel() else 0.0
    return bool(torch.allclose(a, b, rtol=1e-3, atol=1e-5 * max(scale, 1e-12) + 1e-12))
