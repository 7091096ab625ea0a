"""The coverage report: which modules use a fast rule, which the torch.func fallback, which
are excluded (frozen or not selected), known at attach time, before anything runs."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

import nnsim_hooks
from nnsim_hooks.oracle import per_sample_loop
from core_oracles import assert_grads_close


class WSConv2d(nn.Conv2d):
    def forward(self, x):
        w = self.weight - self.weight.mean(dim=(1, 2, 3), keepdim=True)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


class Gate(nn.Module):
    """A user module with a bare parameter."""

    def __init__(self, channels):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((channels, 1, 1), 0.5))

    def forward(self, x):
        return x * torch.sigmoid(self.gamma)


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)  # fast
        self.bn = nn.BatchNorm2d(4)  # fast (eval)
        self.ws = WSConv2d(4, 4, 3, padding=1)  # fallback: subclass changing the maths
        self.gate = Gate(4)  # fallback: user module
        self.frozen = nn.Conv2d(4, 4, 1)  # excluded: frozen
        self.aux = nn.Linear(4, 2)  # excluded: not selected below
        self.head = nn.Linear(4, 3)  # fast
        self.frozen.requires_grad_(False)

    def forward(self, x):
        x = self.gate(self.ws(torch.relu(self.bn(self.stem(x)))))
        x = self.frozen(x).mean((2, 3))
        return self.head(x) + self.aux(x).sum(1, keepdim=True)


def test_fast_fallback_excluded():
    model = Mixed().eval()
    with nnsim_hooks.attach(model, layers=lambda name, m: name != "aux") as h:
        cov = h.coverage
        assert cov.fast == ["stem", "bn", "head"]
        assert cov.fallback == ["ws", "gate"]
        assert cov.excluded == ["frozen", "aux"]
        rows = {r.module: r for r in cov.rows}
        assert rows["stem"].rule == "conv" and rows["bn"].rule == "batchnorm_eval" and rows["head"].rule == "linear"
        assert rows["ws"].type == "WSConv2d" and rows["ws"].rule == "fallback (torch.func)"
        assert rows["frozen"].status == "excluded: frozen (requires_grad=False)"
        assert rows["aux"].status == "excluded: not selected"
        assert rows["gate"].parameters == 4 and rows["head"].parameters == 15
        text = str(cov)
        for name in ("stem", "bn", "ws", "gate", "frozen", "aux", "head"):
            assert name in text
        assert cov.summary() == (
            "3 modules on fast rules (135 parameters), 2 on the torch.func fallback (152), 2 excluded (30)"
        )
        assert cov.summary() in repr(h)
        frame = cov.to_pandas()
        assert list(frame.columns)[:5] == ["module", "type", "parameters", "rule", "status"] and len(frame) == 7
        x = torch.randn(3, 3, 6, 6)
        got = h.per_sample_gradients(x)
    names = {n for n, _ in model.named_parameters() if not n.startswith(("frozen", "aux"))}
    assert set(got) == names
    ref = per_sample_loop(model, x, names=names)
    assert_grads_close(got, ref)


def test_layer_patterns_select_modules_and_everything_inside():
    model = Mixed().eval()
    with nnsim_hooks.attach(model, layers=["st*", "gate"]) as h:
        assert h.coverage.fast == ["stem"] and h.coverage.fallback == ["gate"]
        assert set(h.parameter_names) == {"stem.weight", "stem.bias", "gate.gamma"}
    outer = nn.Sequential(Mixed()).eval()
    with nnsim_hooks.attach(outer, layers="0") as h:  # a name includes the modules inside it
        assert h.coverage.fast == ["0.stem", "0.bn", "0.aux", "0.head"]


def test_parameters_moved_to_a_host_are_reported():
    """A subclass of nn.MultiheadAttention (generic rule: the attention rule matches the exact
    type) uses out_proj's weight itself: the report says where it went."""

    class MyAttention(nn.MultiheadAttention):
        pass

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = MyAttention(4, 2, batch_first=True)
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.attn(x, x, x, need_weights=False)[0])

    model = Block().eval()
    with nnsim_hooks.attach(model, output="sum") as h:
        assert h.coverage.fallback == ["attn", "attn.out_proj"]  # before the first batch
        h.per_sample_gradients(torch.randn(2, 3, 4))
        rows = {r.module: r for r in h.coverage.rows}
    assert "out_proj.weight" in rows["attn"].note and "out_proj.bias" in rows["attn"].note
    assert rows["attn"].status == "fallback" and rows["head"].status == "fast"
