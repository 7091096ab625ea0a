"""What ``attach`` must not change: parameter names, state_dict values, outputs, ``.grad``,
module attributes and every hook table, before, during and after use; hooks gone after
``detach()`` and after an exception leaves a ``with`` block; train mode without BatchNorm;
in-place ops in the model."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn as nn
import torchvision

import nnsim_hooks
from nnsim_hooks.errors import AttachError, InputError
from nnsim_hooks.oracle import per_sample_loop
from core_oracles import assert_grads_close, assert_same_snapshot, snapshot


class InPlaceNet(nn.Module):
    """In-place ops right after hooked modules: ReLU(inplace=True) and `out += identity`."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        identity = self.relu(self.conv1(x))
        out = self.conv2(identity)
        out += identity
        out = self.relu(out)
        return self.head(out.mean((2, 3)))


def _every_use(model, x, batch_size):
    """Attach, run every exact method, detach."""
    with nnsim_hooks.attach(model, batch_size=batch_size) as h:
        h.per_sample_gradients(x)
        h.similarity(x[:1], x[1:2])
        h.similarity(x)  # several passes when batch_size < len(x)
        repr(h), str(h.coverage), h.coverage.summary()


@pytest.mark.parametrize("make_model, batch_size", [
    pytest.param(lambda: torchvision.models.resnet18(weights=None, num_classes=3).eval(), 64, id="resnet18",
                 marks=pytest.mark.slow),
    pytest.param(lambda: InPlaceNet().train(), 2, id="inplace-train-mode-multi-pass"),
])
def test_model_unchanged_by_attach_use_detach(make_model, batch_size):
    model = make_model()
    x = torch.randn(3, 3, 16, 16)
    before = snapshot(model)
    with torch.no_grad():
        out_before = model(x)
    _every_use(model, x, batch_size)
    assert_same_snapshot(before, snapshot(model))
    with torch.no_grad():
        assert torch.equal(model(x), out_before)


def test_outputs_identical_while_attached():
    model = InPlaceNet().eval()
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        expected = model(x)
    with nnsim_hooks.attach(model) as h:
        h.per_sample_gradients(x)
        with torch.no_grad():
            assert torch.equal(model(x), expected)
        # plain training steps still work and see the usual gradients
        model.zero_grad(set_to_none=True)
        model(x).sum().backward()
        grads_attached = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    model(x).sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads_attached[n], p.grad)


def test_inplace_ops_and_train_mode_match_loop():
    """The case that crashes Opacus's GradSampleModule; train mode is fine without BatchNorm."""
    model = InPlaceNet().train()
    x = torch.randn(3, 3, 8, 8)
    with nnsim_hooks.attach(model, output="sum") as h:
        got = h.per_sample_gradients(x)
    assert_grads_close(got, per_sample_loop(model, x, output="sum"))
    assert model.training


def test_hooks_removed_after_detach_and_reattach_works():
    model = InPlaceNet().eval()
    before = snapshot(model)
    h = nnsim_hooks.attach(model)
    assert h.attached
    h.per_sample_gradients(torch.randn(2, 3, 8, 8))
    # Hooks exist only while a pass runs: between passes the model carries nothing of ours,
    # so it can be deep-copied and saved while attached.
    assert_same_snapshot(before, snapshot(model))
    copy.deepcopy(model)
    torch.save(model, io.BytesIO())
    h.detach()
    h.detach()  # twice is fine
    assert not h.attached
    assert_same_snapshot(before, snapshot(model))
    with nnsim_hooks.attach(model) as again:
        again.per_sample_gradients(torch.randn(2, 3, 8, 8))


def test_hooks_removed_when_an_exception_escapes_the_with_block():
    model = InPlaceNet().eval()
    before = snapshot(model)
    with pytest.raises(ZeroDivisionError):
        with nnsim_hooks.attach(model) as h:
            h.per_sample_gradients(torch.randn(2, 3, 8, 8))
            1 / 0
    assert_same_snapshot(before, snapshot(model))
    assert not h.attached
    nnsim_hooks.attach(model).detach()  # not "already attached"


def test_failed_pass_leaves_no_tensor_hooks_and_next_pass_works():
    model = InPlaceNet().eval()
    x = torch.randn(2, 3, 8, 8)
    with nnsim_hooks.attach(model) as h:
        with pytest.raises(InputError):
            h.per_sample_gradients(torch.randn(2, 5, 8, 8))  # wrong channel count
        assert h.engine.capture.calls == [] and h.engine.capture._tensor_handles == []
        assert not h.engine.capture.active
        # a plain forward now records nothing
        model(x)
        assert h.engine.capture.calls == []
        got = h.per_sample_gradients(x)
    assert_grads_close(got, per_sample_loop(model, x))


def test_detached_handle_refuses_work():
    model = InPlaceNet().eval()
    h = nnsim_hooks.attach(model)
    h.detach()
    for call in (lambda: h.per_sample_gradients(torch.randn(2, 3, 8, 8)),
                 lambda: h.similarity(torch.randn(2, 3, 8, 8)),
                 lambda: h.output_name):
        with pytest.raises(AttachError, match="detached"):
            call()


def test_frozen_parameters_are_excluded_and_stay_frozen():
    model = InPlaceNet().eval()
    model.conv1.requires_grad_(False)
    x = torch.randn(3, 3, 8, 8)
    with nnsim_hooks.attach(model) as h:
        got = h.per_sample_gradients(x)
        assert h.coverage.excluded == ["conv1"]
    assert set(got) == {"conv2.weight", "conv2.bias", "head.weight", "head.bias"}
    assert not any(p.requires_grad for p in model.conv1.parameters())
    assert_grads_close(got, per_sample_loop(model, x))


def test_results_carry_no_autograd_graph():
    """Results must not hold the forward's graph (memory) nor record the rules' maths."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2)).eval()
    x = torch.randn(3, 4)
    with nnsim_hooks.attach(model) as h:
        grads = h.per_sample_gradients(x)
        sim = h.similarity(x)
        feats = h.extract(x)
    assert not any(g.requires_grad for g in grads.values()), [n for n, g in grads.items() if g.requires_grad]
    assert not sim.requires_grad
    assert not feats.features.requires_grad and not feats.norms.requires_grad


class WithSpareHead(nn.Module):
    """A module that exists but does not run in this forward (like an auxiliary head in eval)."""

    def __init__(self):
        super().__init__()
        self.used = nn.Linear(4, 3)
        self.spare = nn.Linear(4, 3)

    def forward(self, x):
        return self.used(x)


@pytest.mark.parametrize("output", ["sum", "full"])
def test_every_selected_parameter_has_a_gradient_entry(output):
    """Keys are the model's named_parameters(): a module that did not run has zero gradients."""
    model = WithSpareHead().eval()
    x = torch.randn(3, 4)
    with nnsim_hooks.attach(model, output=output) as h:
        got = h.per_sample_gradients(x)
    assert list(got) == [n for n, _ in model.named_parameters()]
    assert_grads_close(got, per_sample_loop(model, x, output=output))
    lead = (3,) if output == "sum" else (3, 3)
    assert got["spare.weight"].shape == lead + (3, 4) and not got["spare.weight"].any()


def test_a_lost_handle_can_be_detached_through_the_model():
    model = InPlaceNet().eval()
    nnsim_hooks.attach(model)  # handle dropped
    with pytest.raises(nnsim_hooks.AttachError, match=r"nnsim_hooks\.detach\(model\)"):
        nnsim_hooks.attach(model)
    assert nnsim_hooks.detach(model) is True
    assert nnsim_hooks.detach(model) is False
    with nnsim_hooks.attach(model) as h:
        h.per_sample_gradients(torch.randn(2, 3, 8, 8))
