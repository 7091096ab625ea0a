"""Segmentation output reductions, and what a 3-D network's features() materialises."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from nnsim_hooks import attach
from nnsim_hooks.errors import OutputSpecError
from nnsim_hooks.integrations import foreground_sum, per_class, region_sum
from nnsim_hooks.oracle import per_sample_loop


def test_reductions_compute_what_they_say():
    torch.manual_seed(0)
    out = torch.randn(2, 3, 4, 5, 6)
    assert torch.allclose(foreground_sum()(out), out[:, 1:].sum((1, 2, 3, 4)))
    assert torch.allclose(foreground_sum(channels=[0, 2])(out), out[:, [0, 2]].sum((1, 2, 3, 4)))
    assert torch.allclose(foreground_sum(background=None)(out), out.sum((1, 2, 3, 4)))
    assert torch.allclose(per_class()(out), out[:, 1:].sum((2, 3, 4)))
    assert per_class(background=None)(out).shape == (2, 3)
    box = region_sum(box=[(1, 3), (0, 2), (2, 6)])
    assert torch.allclose(box(out), out[:, 1:, 1:3, 0:2, 2:6].sum((1, 2, 3, 4)))
    mask = torch.zeros(4, 5, 6)
    mask[2, 3, 4] = 1
    assert torch.allclose(region_sum(mask=mask)(out), out[:, 1:, 2, 3, 4].sum(1))
    single = torch.randn(2, 1, 4, 4)  # a sigmoid output: its one channel is the foreground
    assert torch.allclose(foreground_sum()(single), single.sum((1, 2, 3)))
    assert torch.allclose(foreground_sum(key="out")({"out": out, "aux": out * 0}), foreground_sum()(out))
    assert torch.allclose(foreground_sum()([out, out * 2]), foreground_sum()(out))  # deep supervision


def test_reduction_names_are_descriptive_for_fingerprints():
    assert foreground_sum().__name__ == "foreground_sum(background=0)"
    assert per_class(channels=[1, 2]).__name__ == "per_class(channels=[1, 2])"
    assert region_sum(box=[(0, 2)]).__name__ == "region_sum(background=0, box=[(0, 2)])"
    assert foreground_sum().__name__ != foreground_sum(background=None).__name__


def test_reduction_errors_say_what_is_wrong():
    out = torch.randn(2, 3, 4, 4)
    with pytest.raises(OutputSpecError, match="mask has shape"):
        region_sum(mask=torch.ones(3, 3))(out)
    with pytest.raises(OutputSpecError, match="box has 3 axes"):
        region_sum(box=[(0, 1)] * 3)(out)
    with pytest.raises(OutputSpecError, match="selects nothing"):
        region_sum(box=[(5, 6), (0, 1)])(out)
    with pytest.raises(OutputSpecError, match="exactly one of mask= or box="):
        region_sum()
    with pytest.raises(OutputSpecError, match="channels \\[7\\] do not exist"):
        foreground_sum(channels=[7])(out)
    with pytest.raises(OutputSpecError, match="keys"):
        foreground_sum()({"logits": out})
    with pytest.raises(OutputSpecError, match=r"\[B, C, \*spatial\]"):
        foreground_sum()(torch.randn(4))


class TinySeg3d(nn.Module):
    """conv -> GroupNorm -> ReLU -> transposed conv -> 1x1 conv: 3 classes per voxel."""

    def __init__(self):
        super().__init__()
        self.down = nn.Conv3d(1, 4, 3, stride=2, padding=1)
        self.norm = nn.GroupNorm(2, 4)
        self.up = nn.ConvTranspose3d(4, 4, 2, stride=2)
        self.head = nn.Conv3d(4, 3, 1)

    def forward(self, x):
        return self.head(torch.relu(self.up(torch.relu(self.norm(self.down(x))))))


@pytest.mark.parametrize("output", [
    foreground_sum(), region_sum(box=[(1, 5), (0, 3), (2, 6)]), per_class(), per_class(background=None),
], ids=lambda o: o.__name__)
def test_reductions_through_attach_match_the_oracle(output):
    torch.manual_seed(0)
    model = TinySeg3d().double().eval()
    x = torch.randn(3, 1, 6, 6, 8, dtype=torch.float64)
    with attach(model, output=output) as handle:
        grads = handle.per_sample_gradients(x)
        sims = handle.similarity(x)
    reference = per_sample_loop(model, x, output=output)
    for name, ref in reference.items():
        assert torch.allclose(grads[name], ref, rtol=1e-9, atol=1e-12), name
    # similarity from the oracle's gradients: cosine (d = 1) or Tr(K_C)/d (d > 1)
    d = output(model(x)).shape[1] if isinstance(output, per_class) else 1
    flat = torch.cat([g.reshape(3, d, -1) for g in reference.values()], -1)  # [B, d, p]
    whitened = []
    for i in range(3):
        jac = flat[i]  # [d, p]
        evals, evecs = torch.linalg.eigh(jac @ jac.T)
        whitened.append(evecs @ torch.diag(evals.rsqrt()) @ evecs.T @ jac)
    expected = torch.stack([torch.stack([(whitened[i] * whitened[j]).sum() / d for j in range(3)]) for i in range(3)])
    assert torch.allclose(sims.detach(), expected, atol=1e-8)


def test_3d_conv_features_never_materialise_per_sample_weight_gradients(monkeypatch):
    """features() on a 3-D network goes through the factored sketch: the conv rule's
    grad_sample (a [B, d, C_out, C_in, k, k, k] tensor) must not be called."""
    from nnsim_hooks.rules import conv

    def forbidden(*args, **kwargs):
        raise AssertionError("a per-sample 3-D conv weight gradient was materialised")

    monkeypatch.setattr(conv.ConvRule, "grad_sample", forbidden)
    monkeypatch.setattr(conv.ConvTransposeRule, "grad_sample", forbidden)
    torch.manual_seed(0)
    model = TinySeg3d().eval()
    x = torch.randn(4, 1, 8, 8, 8)
    with attach(model, output=foreground_sum(), sketch_dim=64, exact_limit=16) as handle:
        features = handle.features(x)
    assert features.shape == (4, 64) and torch.isfinite(features).all()
