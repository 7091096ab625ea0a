"""Per-sample gradients on MONAI networks against the per-sample autograd loop:
DenseNet121 in 3-D (Conv3d, BatchNorm3d in eval mode, dense concatenations) and a 2-D UNet
(strided convs, ConvTranspose2d, InstanceNorm, PReLU, residual units) with ``output="sum"``.
"""

from __future__ import annotations

import pytest
import torch

import nnsim_hooks
from nnsim_hooks.oracle import per_sample_loop
from core_oracles import assert_grads_close

nets = pytest.importorskip("monai.networks.nets")


def test_densenet121_3d():
    model = nets.DenseNet121(spatial_dims=3, in_channels=1, out_channels=2).eval()
    x = torch.randn(2, 1, 32, 32, 32)  # the smallest cube its five poolings accept
    with nnsim_hooks.attach(model, output="contrast") as h:
        got = h.per_sample_gradients(x)
        assert not h.coverage.fallback and not h.coverage.excluded
    ref = per_sample_loop(model, x, output="contrast")
    assert_grads_close(got, ref, rtol=1e-3, atol=2e-5)


def test_unet_2d_sum():
    model = nets.UNet(
        spatial_dims=2, in_channels=1, out_channels=2, channels=(4, 8, 16), strides=(2, 2), num_res_units=1
    ).eval()
    x = torch.randn(3, 1, 16, 16)
    with nnsim_hooks.attach(model, output="sum") as h:
        got = h.per_sample_gradients(x)
        sim = h.similarity(x)
    ref = per_sample_loop(model, x, output="sum")
    assert_grads_close(got, ref, rtol=1e-3, atol=2e-5)
    flat = torch.cat([g.reshape(3, -1).double() for g in ref.values()], 1)
    flat = flat / flat.norm(dim=1, keepdim=True)
    torch.testing.assert_close(sim, flat @ flat.T, rtol=1e-4, atol=1e-5)
