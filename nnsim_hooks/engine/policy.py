"""The engine's answers to the capture's questions (see :class:`~nnsim_hooks.capture.hooks.CapturePolicy`)."""

from __future__ import annotations

from typing import List, Optional, Set

import torch.nn as nn

from ..capture.hooks import CapturePolicy
from ..capture.param_uses import ModuleStack, ParamUseRecorder
from .plan import Plan


class EnginePolicy(CapturePolicy):
    """Answers from the engine's :class:`~nnsim_hooks.engine.plan.Plan`, the stack of running
    modules, and the parameter-use recorder of the pass under way (``recorder``, set by
    the pass that starts and cleared when it ends)."""

    def __init__(self, plan: Plan, stack: ModuleStack):
        self.plan = plan
        self.stack = stack
        self.recorder: Optional[ParamUseRecorder] = None

    def check(self, name: str, module: nn.Module) -> None:
        rule = self.plan.targets[name].rule
        if rule is not None:
            rule.check(module, name)

    def rule_of(self, module: nn.Module):
        return self.plan.target_of(module).rule

    def on_batch(self, args, kwargs, module: nn.Module) -> bool:
        return self.recorder.on_batch(args, kwargs, module)

    def derives_from_batch(self, args, kwargs, module: nn.Module) -> bool:
        return self.recorder.derives_from_batch(args, kwargs, module)

    def on_unbatched(self, module: nn.Module) -> None:
        self.recorder.unbatched_call(module, self.params_of(module))

    def covered(self, module: nn.Module) -> Set[str]:
        """Parameters of ``module`` that a running generic-rule ancestor also holds: its
        re-run includes this call, so counting them here too would count them twice."""
        plan = self.plan
        target = plan.target_of(module)
        running = {id(m) for m in self.stack.stack if m is not module and id(m) in plan.generic}
        if not running:
            return set()
        return {local for local in target.param_names if plan.holders[id(module.get_parameter(local))] & running}

    def params_of(self, module: nn.Module) -> List[nn.Parameter]:
        return self.plan.params_of(module)
