"""The captured pass: the model run once with the hooks active, then one backward per
differentiated output, stopping at the hooked modules' inputs so that no weight
gradient is formed.

:class:`PassRunner` owns the capture, the stack of running modules and the plan, and
re-runs a pass when that pass changed the plan (a parameter used outside its module, a
module found to get inputs without the batch first).
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Set, Tuple

import torch
import torch.nn as nn

from ..capture.batch_mixing import Trace, gradient_mixing, not_batch_first
from ..capture.hooks import Capture, LayerCall
from ..capture.param_uses import DirectUse, ModuleStack, ParamUseRecorder
from ..capture.targets import CoverageReport, Target, promote
from ..errors import BatchCouplingError, ModelError, NonFiniteGradientError
from ..rules.base import Grads
from ..rules.norm import batch_coupling_message, uses_batch_statistics
from ..model_device import model_device_dtype
from ..validation import call_model, check_inputs, check_targets
from .outputs import OutputSpec, check_no_mixing
from .plan import Plan
from .policy import EnginePolicy

logger = logging.getLogger(__name__)

# Above this many differentiated values per sample, warn: one backward pass each.
MANY_OUTPUTS = 64

#: what the training term adds to the BatchNorm refusal
TERM_BATCHNORM = (
    " For the training term: compute it with BatchNorm on its running statistics, "
    "`with nnsim_hooks.training.batchnorm_running_stats(model): h.pair_similarity(a, b)`, or use GroupNorm."
)


@dataclass
class Pass:
    """What one captured batch left behind."""

    calls: List[LayerCall]
    outputs: Any  # the model's outputs, detached
    values: torch.Tensor  # the differentiated values, [B, d] (in the graph for create_graph)
    vector: bool  # True when the output function returned [B, d] rather than [B]
    batch: int
    uses: List[DirectUse] = field(default_factory=list)
    unsplittable: Set[int] = field(default_factory=set)
    #: generic-rule gradients kept for reuse within this pass (see Engine.reuse_generic)
    reused: Optional[Dict[Tuple[int, ...], Grads]] = None
    reuse_bytes: int = 0
    #: True: the captured gradients are part of the autograd graph (the training term)
    create_graph: bool = False

    @property
    def d(self) -> int:
        return self.values.shape[1]


class _Replan(Exception):
    """Raised inside a pass when the plan changed and the pass must be run again."""


class PassRunner:
    def __init__(self, model: nn.Module, targets: List[Target], output: OutputSpec, coverage: CoverageReport):
        self.model = model
        self.output = output
        self.coverage = coverage
        self._batchnorms = [
            (n, m) for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
        ]
        self._dropouts = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
        #: batch sizes whose layout was checked (see batch_mixing.py), and the modules found
        #: to get inputs without the batch first
        self._layout_checked: Set[int] = set()
        self._warned_many = False
        self._not_batch_first: Set[int] = set()
        self._gradient_layout_checked: Set[int] = set()
        self._stack: Optional[ModuleStack] = None
        self.plan = Plan.of([])
        self.policy = EnginePolicy(self.plan, None)
        self.capture = Capture(self.policy)
        try:
            self.set_targets(targets)
            self._stack = self.policy.stack = ModuleStack(model)
        except Exception:
            self.close()
            raise

    def set_targets(self, targets: List[Target]) -> None:
        self.plan = self.policy.plan = Plan.of(targets)
        for t in targets:
            if t.name not in self.capture.modules:
                self.capture.add(t.name, t.module)

    def check_model_state(self, create_graph: bool = False) -> None:
        """Refuse what makes per-sample gradients undefined: BatchNorm on batch statistics;
        for a plain pass also active dropout inside a module that the generic rule re-runs
        (it would draw other masks). The training term (``create_graph``) documents that
        such modules draw each sample's masks anew, and its message names its way out."""
        for name, module in self._batchnorms:
            if uses_batch_statistics(module):
                raise BatchCouplingError(batch_coupling_message(name, module) + (TERM_BATCHNORM if create_graph else ""))
        if create_graph:
            return
        generic_roots = [t.name for t in self.plan.targets.values() if t.rule is None]
        for name, module in self._dropouts:
            if module.training and module.p > 0 and any(
                r == "" or name == r or name.startswith(r + ".") for r in generic_roots
            ):
                raise ModelError(
                    f"dropout '{name}' is active (training mode) inside module handled by the generic rule, "
                    "which re-runs that module and would draw other dropout masks. Call model.eval()."
                )

    def run(self, inputs, targets=None, create_graph: bool = False) -> Pass:
        batch = check_inputs(self.model, inputs)
        device, _ = model_device_dtype(self.model)
        targets = check_targets(targets, batch, device)
        self.check_model_state(create_graph)
        # A parameter used outside its module's forward hands the module that used it
        # to the generic rule; the pass is then run again with the new plan.
        for _ in range(len(self.plan.targets) + 2):
            try:
                return self._run_once(inputs, targets, batch, create_graph)
            except _Replan:
                continue
        raise ModelError("the set of modules using parameters keeps changing between passes")  # pragma: no cover

    def _run_once(self, inputs, targets, batch: int, create_graph: bool) -> Pass:
        # The layout checks re-run the model on parts of the batch and compare: active
        # dropout (the training term runs in training mode) would fail them. That pass
        # uses what plain passes found, and the checks run on the next plain pass.
        check_layout = not create_graph and batch >= 2 and batch not in self._layout_checked
        capture, stack, plan = self.capture, self._stack, self.plan
        capture.clear()
        capture.batch = batch
        recorder = ParamUseRecorder(
            plan.holders, plan.generic, stack, lambda: capture.pass_index, batch, self._not_batch_first
        )
        recorder.mark_batch(inputs)
        self.policy.recorder = recorder
        capture.active = True
        stack.clear()
        stack.recorder = recorder
        stack.trace = Trace(leaves=True) if check_layout else None
        stack.active = True
        try:
            # Our hooks go on the model for this pass only (capture first: its forward
            # hooks then run while the module is still on the stack).
            capture.install()
            stack.install()
            with torch.enable_grad():
                with recorder:
                    outputs = call_model(self.model, inputs)
                capture.active = False
                stack.active = False
                if check_layout:
                    bad = not_batch_first(self.model, inputs, batch, stack.trace, outputs) - self._not_batch_first
                    self._layout_checked.add(batch)  # after: a model that mixes samples is refused every time
                    if bad:  # this pass took those modules as batch first: run it again
                        self._not_batch_first |= bad
                        raise _Replan()
                if recorder.strays:
                    self.set_targets(
                        promote(self.model, list(plan.targets.values()), recorder.strays, self.coverage, recorder.shared)
                    )
                    raise _Replan()
                values, vector = self.values_of(outputs, targets, batch)
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
                        values[:, j].sum(), grad_inputs, retain_graph=create_graph or j < values.shape[1] - 1,
                        create_graph=create_graph, allow_unused=True,
                    )
            calls = list(capture.calls)
            for call in calls:
                call.check_unchanged()
        finally:
            capture.active = False
            stack.active = False
            stack.clear()
            stack.recorder = None
            stack.trace = None
            self.policy.recorder = None
            recorder.remove_hooks()
            capture.remove()
            stack.remove()
        if not create_graph and batch >= 2 and batch not in self._gradient_layout_checked:
            self._gradient_layout_checked.add(batch)
            self._check_gradient_layout(inputs, targets, batch)
        detached = outputs.detach() if torch.is_tensor(outputs) else outputs
        return Pass(calls, detached, values if create_graph else values.detach(), vector, batch, recorder.uses,
                    recorder.unsplittable, create_graph=create_graph)

    def values_of(self, outputs, targets, batch: int) -> Tuple[torch.Tensor, bool]:
        """The differentiated values ``[B, d]``, checked, and whether the output function
        gave ``[B, d]`` (rather than ``[B]``)."""
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
                stacklevel=6,
            )
        values = values if vector else values.unsqueeze(1)
        check_no_mixing(self.output, outputs, targets, values if vector else values[:, 0])
        if not bool(torch.isfinite(values).all()):
            bad = (~torch.isfinite(values)).any(1).nonzero().flatten().tolist()
            raise NonFiniteGradientError(f"the model's outputs are NaN or Inf for samples {bad[:10]}", bad)
        if not values.requires_grad:
            raise ModelError(
                "the differentiated output does not depend on any selected trainable parameter; "
                "check layers= and requires_grad"
            )
        return values, vector

    def _check_gradient_layout(self, inputs, targets, batch: int) -> None:
        """Once per batch size: samples mixed in the backward only (see batch_mixing.py).

        A warning, not an error: some models' backward kernels give gradients that differ
        by batch size (timm's efficientformer_l1 on CPU, about 1% in float64) while the
        per-sample gradients still match a per-sample loop, so this check cannot tell
        such rounding from mixing for sure."""
        modules = [t.module for t in self.plan.targets.values()]
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
                stacklevel=6,
            )

    def close(self) -> None:
        self.capture.remove()
        if self._stack is not None:
            self._stack.remove()
            self._stack = None
