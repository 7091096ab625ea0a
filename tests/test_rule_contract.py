"""The LayerRule contract: a rule that implements only ``grad_sample`` (and, optionally,
``factors``) gets every other form from the base class, and those forms match the ones
computed from its materialised per-sample gradients, directly and through attach."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import nnsim_hooks
from nnsim_hooks.engine.sketch import SketchRecipe, Sketcher
from nnsim_hooks.rules.base import LayerRule, dots_of_grads, gram_of_grads, self_gram_of_grads, sums_of_grads
from nnsim_hooks.rules.registry import RULES
from core_oracles import REFERENCE_OUTPUTS, brute_cosine, flatten_grads, func_per_sample_grads


class TokenLinear(nn.Linear):
    """A module type no built-in rule knows (the registry matches exact types)."""


class PatchConv(nn.Conv1d):
    """The same for a convolution: a 3-D weight, so sums and products reshape."""


class GradOnlyRule(LayerRule):
    """One file's worth: per-sample gradients, nothing else."""

    name = "grad-only"

    def grad_sample(self, module, activation, backprops):
        a = activation.reshape(activation.shape[0], -1, activation.shape[-1]).to(backprops.dtype)
        g = backprops.reshape(backprops.shape[0], backprops.shape[1], -1, backprops.shape[-1])
        out = {"weight": torch.einsum("mbto,bti->bmoi", g, a)}
        if module.bias is not None and module.bias.requires_grad:
            out["bias"] = g.sum(2).transpose(0, 1)
        return out


class FactorsRule(GradOnlyRule):
    """Plus the two factors of ``sum_t delta_t a_t^T``."""

    name = "factors"

    def factors(self, module, activation, backprops):
        a = activation.reshape(activation.shape[0], -1, activation.shape[-1]).to(backprops.dtype)
        g = backprops.reshape(backprops.shape[0], backprops.shape[1], -1, backprops.shape[-1])
        return a.transpose(1, 2), g.transpose(2, 3)


class ConvFactorsRule(LayerRule):
    """A 1-D convolution (stride 1, no padding) through factors: patches and output gradients."""

    name = "conv-factors"

    def factors(self, module, activation, backprops):
        k = module.kernel_size[0]
        cols = activation.to(backprops.dtype).unfold(2, k, 1)  # [B, C, L, k]
        cols = cols.permute(0, 1, 3, 2).reshape(activation.shape[0], -1, cols.shape[2])  # [B, C*k, L]
        return cols, backprops

    def grad_sample(self, module, activation, backprops):
        cols, rows = self.factors(module, activation, backprops)
        b, d = cols.shape[0], rows.shape[0]
        out = {"weight": torch.einsum("mbrl,bcl->bmrc", rows, cols).reshape(b, d, *module.weight.shape)}
        if module.bias is not None:
            out["bias"] = rows.sum(-1).transpose(0, 1)
        return out


def _operands(module, d=2, b=5):
    torch.manual_seed(0)
    if isinstance(module, nn.Conv1d):
        x = torch.randn(b, module.in_channels, 9, dtype=torch.float64)
    else:
        x = torch.randn(b, 4, module.in_features, dtype=torch.float64)
    out = module(x)
    return x, torch.randn(d, *out.shape, dtype=torch.float64)


CASES = [
    (FactorsRule(), lambda: TokenLinear(6, 3)),
    (FactorsRule(), lambda: TokenLinear(6, 3, bias=False)),
    (GradOnlyRule(), lambda: TokenLinear(6, 3)),
    (ConvFactorsRule(), lambda: PatchConv(3, 4, 3)),
]


@pytest.mark.parametrize("rule, make", CASES, ids=["factors", "factors-no-bias", "grad-only", "conv-factors"])
def test_defaults_match_the_materialised_gradients(rule, make):
    module = make().double()
    x, bp = _operands(module)
    grads = rule.grad_sample(module, x, bp)
    b, d = x.shape[0], bp.shape[0]
    flat = torch.cat([g.reshape(b * d, -1) for g in grads.values()], 1)
    torch.testing.assert_close(rule.gram(module, x, bp), flat @ flat.T)
    torch.testing.assert_close(rule.gram(module, x, bp), gram_of_grads(grads))
    torch.testing.assert_close(rule.self_gram(module, x, bp), self_gram_of_grads(grads))
    weights = torch.randn(b, d, 3, dtype=torch.float64)
    sums = rule.sums(module, x, bp, weights)
    assert sums.keys() == grads.keys()
    for name, g in grads.items():  # S_k = sum_i sum_m W[i, m, k] g_{i,m}, by a loop
        ref = sum(weights[i, m, k] * g[i, m] for i in range(b) for m in range(d) for k in [0])
        torch.testing.assert_close(sums[name][0], ref)
    torch.testing.assert_close(sums, sums_of_grads(grads, weights))
    ref = torch.einsum("bmp,kp->bmk", flat.reshape(b, d, -1),
                       torch.cat([s.reshape(3, -1) for s in sums.values()], 1))
    torch.testing.assert_close(rule.dots(module, x, bp, sums), ref)
    only_first = {k: v for k, v in list(sums.items())[:1]}
    torch.testing.assert_close(rule.dots(module, x, bp, only_first), dots_of_grads(grads, only_first))
    shapes = {n: tuple(g.shape[2:]) for n, g in grads.items()}
    sketcher = Sketcher(SketchRecipe(16, stage1_dim=48, exact_limit=0, block=2), shapes)
    sketches = sketcher.param_sketches(list(shapes), "cpu", torch.float64)
    got = rule.sketch(module, x, bp, sketches)
    for name, g in grads.items():
        torch.testing.assert_close(got[name], sketches[name].project_gradients(g))


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = PatchConv(2, 3, 3)
        self.lin = TokenLinear(3, 4)

    def forward(self, x):
        h = torch.tanh(self.conv(x)).transpose(1, 2)  # [B, L, 3]
        return self.lin(h).mean(1)


def test_a_new_rule_is_one_class_and_one_registration(monkeypatch):
    """Registered for its exact type, the rule runs every query; the numbers match torch.func."""
    monkeypatch.setitem(RULES, TokenLinear, FactorsRule())
    monkeypatch.setitem(RULES, PatchConv, ConvFactorsRule())
    torch.manual_seed(1)
    model = _Net().double().eval()
    x = torch.randn(7, 2, 10, dtype=torch.float64)
    ref = flatten_grads(func_per_sample_grads(model, x, REFERENCE_OUTPUTS["contrast"]))
    with nnsim_hooks.attach(model, output="contrast", batch_size=7) as h:
        assert h.coverage.fast == ["conv", "lin"]
        got = h.similarity(x, progress=False)
        density = h.density(x, progress=False)
    cos = brute_cosine(ref, ref)
    torch.testing.assert_close(torch.as_tensor(got), cos, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(torch.as_tensor(density), cos.sum(1), rtol=1e-6, atol=1e-9)
