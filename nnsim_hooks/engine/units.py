"""The one loop over a pass's units, and the finite check of what it gives.

A unit is one call of a module on a fast rule (multi-output calls on a single-output
rule excepted), or a module on the generic rule with all its calls of the pass. Each
dispatcher of :class:`~nnsim_hooks.engine.engine.Engine` says what it wants from a fast
rule's call (``fast``) and from materialised per-sample gradients (``materialised``);
:func:`each_unit` takes the branch, :func:`sum_by_parameter` adds the parts up by the
model's parameter names.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import torch

from ..capture.hooks import LayerCall
from ..capture.targets import Target
from ..errors import NonFiniteGradientError
from ..rules.base import Grads
from .captured_pass import Pass
from .plan import Plan

#: fast(target, call, activation, backprops): what the dispatcher wants from one call of a fast rule
Fast = Callable[[Target, LayerCall, Any, Any], Any]
#: materialised(target, grads): the same from the unit's per-sample gradients {local: [B, d, *shape]}
Materialised = Callable[[Target, Grads], Any]
#: unit_grads(target, calls, pass): a generic-rule unit's per-sample gradients
UnitGrads = Callable[[Target, List[LayerCall], Pass], Grads]


def fast_call(plan: Plan, calls: List[LayerCall]) -> Optional[LayerCall]:
    """The unit's one call when it goes to a fast rule, else None."""
    return calls[0] if len(calls) == 1 and plan.is_fast(calls[0]) else None


def unit_grads(plan: Plan, target: Target, calls: List[LayerCall], p: Pass, generic: UnitGrads) -> Grads:
    """Per-sample gradients ``[B, d, *shape]`` of one unit, keyed by local parameter name."""
    call = fast_call(plan, calls)
    if call is None:
        return generic(target, calls, p)
    grads = target.rule.grad_sample(call.module, *target.rule.operands(call, p.d))
    return drop_skipped(grads, call)


def drop_skipped(part: Dict[str, Any], call: LayerCall) -> Dict[str, Any]:
    """Without the parameters a running generic-rule ancestor already counts (``call.skip``)."""
    return {k: v for k, v in part.items() if k not in call.skip} if call.skip else part


def each_unit(plan: Plan, p: Pass, fast: Fast, materialised: Materialised, generic: UnitGrads,
              fast_when: Optional[Callable[[Target, LayerCall], bool]] = None) -> Iterator[Tuple[Target, bool, Any]]:
    """For each unit: ``(target, took_fast, part)``, ``part`` from ``fast`` for a fast rule's
    call (and ``fast_when(target, call)``, if given), else from ``materialised``. A dict
    part from ``fast`` loses the parameters in ``call.skip``."""
    for target, calls in plan.units(p.calls):
        call = fast_call(plan, calls)
        if call is not None and (fast_when is None or fast_when(target, call)):
            part = fast(target, call, *target.rule.operands(call, p.d))
            yield target, True, drop_skipped(part, call) if isinstance(part, dict) else part
        else:
            yield target, False, materialised(target, unit_grads(plan, target, calls, p, generic))


def sum_by_parameter(plan: Plan, parts: Iterable[Tuple[Target, bool, Dict[str, torch.Tensor]]],
                     check: bool) -> Dict[str, torch.Tensor]:
    """The parts ``{local: tensor}`` summed by the model's parameter names; with ``check``,
    each part checked for NaN/Inf first (naming the module where they start)."""
    total: Dict[str, torch.Tensor] = {}
    checks = []
    for target, _, part in parts:
        for local, value in part.items():
            name = target.param_names[local]
            total[name] = total[name] + value if name in total else value
            if check:
                checks.append((target.name, value))
    if check:
        check_finite(plan, checks)
    return total


def check_finite(plan: Plan, results: List[Tuple[str, torch.Tensor]]) -> None:
    """Raise :class:`NonFiniteGradientError` naming the first module, from the output end,
    whose results hold a NaN or Inf. ``results``: ``(module name, tensor [B, ...])``."""
    if not results:
        return
    # A NaN or Inf anywhere makes the sum non-finite: one reduction in the tensor's own
    # dtype (no copy, no mask as large as the per-sample gradients). A sum that merely
    # overflows is confirmed element-wise below before anything is raised.
    flags = torch.isfinite(torch.stack([r.detach().sum().to(torch.float64) for _, r in results]))
    if bool(flags.all()):
        return
    # Backward visits the modules in reverse; the first non-finite one from the output
    # end is where the problem starts.
    for (name, r), ok in reversed(list(zip(results, flags.tolist()))):
        if not ok:
            target = plan.targets[name]
            r = r.detach()
            bad = (~torch.isfinite(r.reshape(r.shape[0], -1))).any(1).nonzero().flatten().tolist()
            if not bad:
                continue  # the sum overflowed; every entry is finite
            raise NonFiniteGradientError(
                f"the per-sample gradient of module '{name}' ({type(target.module).__name__}) is NaN or Inf "
                f"for samples {bad[:10]}; check the inputs for NaN/Inf and the model for overflow there", bad
            )

