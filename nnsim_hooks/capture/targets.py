"""Which modules are hooked, with which rule, and the coverage report.

A module is a target when it holds trainable parameters of its own (not counting its
children's) and is selected by ``layers=``. Its rule is the fast rule registered for
its exact type, or the torch.func fallback.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Union

import torch.nn as nn

from ..errors import ModelError
from ..rules import LayerRule, rule_for

LayerSelector = Union[None, str, Sequence[str], Callable[[str, nn.Module], bool]]

FALLBACK = "fallback (torch.func)"


@dataclass
class Target:
    """One hooked module: its rule (None = fallback) and its parameters' global names."""

    name: str
    module: nn.Module
    rule: Optional[LayerRule]
    #: local parameter name (as in module.named_parameters(recurse=False)) -> model-level name
    param_names: Dict[str, str]

    @property
    def rule_name(self) -> str:
        return FALLBACK if self.rule is None else self.rule.name


@dataclass
class CoverageRow:
    module: str
    type: str
    parameters: int
    rule: str
    status: str  # "fast", "fallback" or "excluded: ..."
    note: str = ""


class CoverageReport:
    """Which modules use a fast rule, which the fallback, which are excluded."""

    def __init__(self, rows: List[CoverageRow]):
        self.rows = rows

    def _names(self, status: str) -> List[str]:
        return [r.module for r in self.rows if r.status.startswith(status)]

    @property
    def fast(self) -> List[str]:
        return self._names("fast")

    @property
    def fallback(self) -> List[str]:
        return self._names("fallback")

    @property
    def excluded(self) -> List[str]:
        return self._names("excluded")

    def to_pandas(self):
        from ..optional import require

        pd = require("pandas", "CoverageReport.to_pandas()")
        return pd.DataFrame([r.__dict__ for r in self.rows])

    def summary(self) -> str:
        count = lambda s: sum(r.parameters for r in self.rows if r.status.startswith(s))  # noqa: E731
        return (
            f"{len(self.fast)} modules on fast rules ({count('fast'):,} parameters), "
            f"{len(self.fallback)} on the torch.func fallback ({count('fallback'):,}), "
            f"{len(self.excluded)} excluded ({count('excluded'):,})"
        )

    def __str__(self) -> str:
        header = ("module", "type", "parameters", "rule", "status", "note")
        body = [(r.module or "<model>", r.type, f"{r.parameters:,}", r.rule, r.status, r.note) for r in self.rows]
        widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(header)]
        line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
        return "\n".join([line(header), line(["-" * w for w in widths])] + [line(b) for b in body] + [self.summary()])

    def __repr__(self) -> str:
        return f"CoverageReport({self.summary()})"


def _selector(layers: LayerSelector) -> Callable[[str, nn.Module], bool]:
    if layers is None:
        return lambda name, module: True
    if callable(layers):
        return layers
    patterns = [layers] if isinstance(layers, str) else list(layers)

    def selected(name: str, module: nn.Module) -> bool:
        # A pattern selects the modules it names and everything inside them.
        parts = name.split(".") if name else []
        prefixes = [".".join(parts[: i + 1]) for i in range(len(parts))] or [""]
        return any(fnmatch.fnmatchcase(p, pat) for pat in patterns for p in prefixes)

    return selected


def find_targets(model: nn.Module, layers: LayerSelector = None):
    """The targets and the coverage report for ``model``."""
    select = _selector(layers)
    global_names = {}
    for name, param in model.named_parameters():
        global_names.setdefault(id(param), name)
    targets: List[Target] = []
    rows: List[CoverageRow] = []
    matched_any = False
    claimed: Dict[int, str] = {}  # id(param) -> the module whose rule computes it
    by_parent_rule: Dict[str, str] = {}
    for mod_name, module in model.named_modules():
        own = [(n, p) for n, p in module.named_parameters(recurse=False) if id(p) not in claimed]
        taken = [p for _, p in module.named_parameters(recurse=False) if id(p) in claimed]
        if taken and select(mod_name, module):
            owner = claimed[id(taken[0])]
            rows.append(CoverageRow(mod_name, type(module).__name__, sum(p.numel() for p in taken if p.requires_grad),
                                    by_parent_rule[owner], "fast", f"handled by '{owner or '<model>'}'"))
        if not own:
            continue
        count = sum(p.numel() for _, p in own)
        kind = type(module).__name__
        trainable = [(n, p) for n, p in own if p.requires_grad]
        rule = rule_for(module)
        if rule is not None and not rule.supports(module):
            rule = None
        rule_name = FALLBACK if rule is None else rule.name
        if not select(mod_name, module):
            rows.append(CoverageRow(mod_name, kind, count, rule_name, "excluded: not selected"))
            continue
        matched_any = True
        if not trainable:
            rows.append(CoverageRow(mod_name, kind, count, rule_name, "excluded: frozen (requires_grad=False)"))
            continue
        names = {n: global_names[id(p)] for n, p in trainable}
        if rule is not None:
            # Children's parameters the rule computes (nn.MultiheadAttention's out_proj,
            # whose forward never runs): this module is their target.
            for local in rule.child_parameters(module):
                param = module.get_parameter(local)
                claimed[id(param)] = mod_name
                if param.requires_grad:
                    names[local] = global_names[id(param)]
            by_parent_rule[mod_name] = rule.name
        targets.append(Target(mod_name, module, rule, names))
        rows.append(CoverageRow(mod_name, kind, sum(p.numel() for _, p in trainable), rule_name,
                                "fallback" if rule is None else "fast"))
    if layers is not None and not matched_any:
        raise ModelError(
            f"layers={layers!r} selects no module that holds parameters; module names look like "
            f"{[r.module for r in rows[:5]]}"
        )
    if not targets:
        raise ModelError(
            "no trainable parameters to differentiate: every selected parameter has requires_grad=False. "
            "Unfreeze the parameters you want (param.requires_grad_(True)) or select other layers."
        )
    return targets, CoverageReport(rows)


def shared_parameters(targets: Iterable[Target]) -> set:
    """Global names of parameters that more than one target holds (tied weights)."""
    seen, shared = set(), set()
    for t in targets:
        for g in t.param_names.values():
            (shared if g in seen else seen).add(g)
    return shared


def promote(model: nn.Module, targets: List[Target], strays, coverage: CoverageReport, shared=()) -> List[Target]:
    """Hand each module that used a parameter outside its holder's forward to the
    generic rule, with that parameter (``strays``: ``{(id(param), id(module)): module}``;
    those in ``shared`` come from a holder run without the batch first). The coverage
    report is updated in place."""
    holder_of = {}
    for t in targets:
        for local in t.param_names:
            holder_of.setdefault(id(t.module.get_parameter(local)), t.name)
    names = {id(m): n for n, m in model.named_modules()}
    by_module = {id(t.module): t for t in targets}
    global_names = {}
    for t in targets:
        for local, g in t.param_names.items():
            global_names[id(t.module.get_parameter(local))] = g
    out = list(targets)
    for (param_id, module_id), module in strays.items():
        relative = {id(p): n for n, p in module.named_parameters()}
        if param_id not in relative:
            raise ModelError(
                f"parameter '{global_names[param_id]}' is used by module '{names.get(module_id, '?')}' "
                f"({type(module).__name__}), which does not hold it among its parameters, so its per-sample "
                "gradient cannot be computed from hooks. Register the module that owns it as a submodule of "
                "the one that uses it, or exclude the parameter with layers=..."
            )
        local = relative[param_id]
        from_shared = (param_id, module_id) in shared
        target = by_module.get(module_id)
        if target is None:
            target = Target(names[module_id], module, None, {})
            by_module[module_id] = target
            out.append(target)
        target.rule = None
        target.param_names[local] = global_names[param_id]
        holder = holder_of.get(param_id, "?")
        note = f"takes {local} (its module runs without the batch first)" if from_shared else f"uses {local} directly"
        if from_shared:
            for row in coverage.rows:
                if row.module == holder and row.status == "fast":
                    row.rule, row.status, row.note = FALLBACK, "fallback", f"handled by '{target.name or '<model>'}'"
        for row in coverage.rows:
            if row.module == target.name:
                row.rule, row.status = FALLBACK, "fallback"
                row.note = "; ".join(x for x in (row.note, note) if x and note not in row.note)
                break
        else:
            coverage.rows.append(CoverageRow(target.name, type(module).__name__, 0, FALLBACK, "fallback", note))
    return out
