"""The engine's plan: which rule takes each hooked module, and who holds each parameter.

It changes only when a pass finds a parameter used outside its module (the module that
used it moves to the generic rule, see :func:`~nnsim_hooks.capture.targets.promote`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterator, List, Set, Tuple

import torch.nn as nn

from ..capture.hooks import LayerCall
from ..capture.targets import Target, shared_parameters


@dataclass
class Plan:
    targets: Dict[str, Target]
    #: id(module) -> its target
    by_module: Dict[int, Target]
    #: global names of parameters held by several targets (tied weights)
    shared: Set[str]
    #: ids of the modules on the generic rule
    generic: Set[int]
    #: id(parameter) -> ids of the hooked modules that hold it
    holders: Dict[int, Set[int]]

    @classmethod
    def of(cls, targets: List[Target]) -> "Plan":
        holders: Dict[int, Set[int]] = {}
        for t in targets:
            for local in t.param_names:
                holders.setdefault(id(t.module.get_parameter(local)), set()).add(id(t.module))
        return cls(
            targets={t.name: t for t in targets},
            by_module={id(t.module): t for t in targets},
            shared=shared_parameters(targets),
            generic={id(t.module) for t in targets if t.rule is None},
            holders=holders,
        )

    def target_of(self, module: nn.Module) -> Target:
        return self.by_module[id(module)]

    def params_of(self, module: nn.Module) -> List[nn.Parameter]:
        """The parameters a hooked module is differentiated for (its own, plus those of
        children it uses directly once it is on the generic rule)."""
        target = self.target_of(module)
        return [module.get_parameter(local) for local in target.param_names]

    def is_fast(self, call: LayerCall) -> bool:
        """Whether this call goes to its module's fast rule (a rule that reads only one
        output sends calls with several to the generic rule)."""
        rule = self.target_of(call.module).rule
        return rule is not None and (len(call.out_leaves) == 1 or rule.multi_output)

    def units(self, calls: List[LayerCall]) -> Iterator[Tuple[Target, List[LayerCall]]]:
        """Fast-rule calls one by one, then each generic-rule module with all its calls."""
        generic: Dict[str, List[LayerCall]] = {}
        for call in calls:
            target = self.target_of(call.module)
            if self.is_fast(call):
                yield target, [call]
            else:
                generic.setdefault(target.name, []).append(call)
        for name, group in generic.items():
            yield self.targets[name], group

    def call_counts(self, calls: List[LayerCall]) -> Dict[int, int]:
        """id(module) -> how many times it was called in the pass."""
        counts: Dict[int, int] = {}
        for call in calls:
            counts[id(call.module)] = counts.get(id(call.module), 0) + 1
        return counts
