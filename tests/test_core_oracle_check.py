"""``nnsim_hooks.oracle.check_per_sample_gradients``: the public check users run on their own
model. It must pass on a correct model and catch a wrong rule."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import nnsim_hooks
from nnsim_hooks.oracle import check_per_sample_gradients
from nnsim_hooks.rules import RULES, LayerRule


class Scale(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(channels))

    def forward(self, x):
        return x * self.weight


class CorrectScaleRule(LayerRule):
    name = "scale"

    def grad_sample(self, module, activation, backprops):
        # backprops [d, B, ..., C], activation [B, ..., C] -> [B, d, C]
        prod = backprops * activation.unsqueeze(0)
        return {"weight": prod.reshape(*prod.shape[:2], -1, prod.shape[-1]).sum(2).transpose(0, 1)}


class WrongScaleRule(CorrectScaleRule):
    """Forgets the activation: a plausible slip with the right shape."""

    def grad_sample(self, module, activation, backprops):
        return {"weight": backprops.reshape(*backprops.shape[:2], -1, backprops.shape[-1]).sum(2).transpose(0, 1)}


def model():
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), Scale(5), nn.Linear(5, 3)).eval()


@pytest.fixture
def scale_rule():
    """Register a rule for Scale for one test, and remove it afterwards."""

    def register(rule):
        nnsim_hooks.add_rule(Scale, rule)

    yield register
    RULES.pop(Scale, None)


def test_passes_on_a_correct_model():
    errors = check_per_sample_gradients(model(), torch.randn(4, 4))
    assert set(errors) == {"0.weight", "0.bias", "2.weight", "3.weight", "3.bias"}
    assert max(errors.values()) < 1e-5


def test_passes_with_a_correct_custom_rule(scale_rule):
    scale_rule(CorrectScaleRule())
    m = model()
    with nnsim_hooks.attach(m) as h:
        assert "2" in h.coverage.fast
    errors = check_per_sample_gradients(m, torch.randn(4, 2, 4), output="full")
    assert max(errors.values()) < 1e-5


def test_catches_a_wrong_rule(scale_rule):
    scale_rule(WrongScaleRule())
    with pytest.raises(AssertionError, match=r"2\.weight: relative error") as info:
        check_per_sample_gradients(model(), torch.randn(4, 4), output="sum")
    assert "0.weight" not in str(info.value)  # only the wrong one is named


def test_rule_registry_is_clean_after_the_fixture():
    assert Scale not in RULES


def test_replacing_a_builtin_rule_warns():
    before = RULES[nn.Linear]
    try:
        with pytest.warns(UserWarning, match="Linear.*replaced by CorrectScaleRule"):
            nnsim_hooks.add_rule(nn.Linear, CorrectScaleRule())
    finally:
        RULES[nn.Linear] = before
