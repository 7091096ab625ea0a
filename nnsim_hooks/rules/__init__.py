"""Per-layer rules. Importing this package registers the built-in ones."""

from . import attention, conv, embedding, embedding_bag, linear, norm, prelu  # noqa: F401  (registration side effects)
from .base import LayerRule, trainable
from .registry import RULES, add_rule, register_rule, rule_for

__all__ = ["LayerRule", "RULES", "add_rule", "register_rule", "rule_for", "trainable"]
