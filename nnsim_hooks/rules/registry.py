"""The table of per-layer rules, looked up by exact module type.

Exact type, never ``isinstance``: timm's ``StdConv2d`` subclasses ``nn.Conv2d`` but
standardises its weight in ``forward``, so the plain conv rule would be silently wrong
for it. Modules whose type is not in the table fall back to torch.func (see
:mod:`nnsim_hooks.rules.fallback`).
"""

from __future__ import annotations

import logging
import warnings
from typing import Callable, Dict, Iterable, Optional, Type, TypeVar

import torch.nn as nn

from .base import LayerRule

logger = logging.getLogger(__name__)

RULES: Dict[Type[nn.Module], LayerRule] = {}

R = TypeVar("R", bound=LayerRule)


def register_rule(*module_types: Type[nn.Module]) -> Callable[[Type[R]], Type[R]]:
    """Class decorator: ``@register_rule(nn.Linear)`` registers one instance for each type.

    Registering a type twice replaces the earlier rule and warns, so that an
    integration can knowingly override a built-in rule.
    """

    def decorator(rule_cls: Type[R]) -> Type[R]:
        rule = rule_cls()
        for module_type in module_types:
            add_rule(module_type, rule)
        return rule_cls

    return decorator


def add_rule(module_type: Type[nn.Module], rule: LayerRule) -> None:
    """Register ``rule`` for modules whose type is exactly ``module_type``."""
    previous = RULES.get(module_type)
    if previous is not None and type(previous) is not type(rule):
        warnings.warn(
            f"nnsim_hooks: the rule for {module_type.__qualname__} "
            f"({type(previous).__name__}) is replaced by {type(rule).__name__}",
            stacklevel=3,
        )
    RULES[module_type] = rule


def rule_for(module: nn.Module) -> Optional[LayerRule]:
    """The fast rule registered for ``type(module)`` exactly, or None."""
    return RULES.get(type(module))


def registered_types() -> Iterable[Type[nn.Module]]:
    return tuple(RULES)
