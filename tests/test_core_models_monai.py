"""Per-sample gradients on MONAI networks against the per-sample autograd loop:
DenseNet121 in 3-D (Conv3d, BatchNorm3d in eval mode, dense concatenations) and a 2-D UNet
(strided convs, ConvTranspose2d, InstanceNorm, PReLU, residual units) with ``output="sum"``.

The truth is the loop in float64; the hooks must match it to float64 rounding in float64,
and in float32 to a tolerance derived from the float64 truth (see
``core_oracles.assert_grads_match_float64_truth``).
"""

from __future__ import annotations

import pytest
import torch

import nnsim_hooks
from nnsim_hooks.oracle import per_sample_loop
from core_oracles import assert_grads_match_float64_truth, brute_cosine, flatten_grads, parameterised_depth
from core_oracles import rounding_tolerance

nets = pytest.importorskip("monai.networks.nets")

pytestmark = pytest.mark.slow


def hooked(output):
    def grads_of(model, x):
        with nnsim_hooks.attach(model, output=output) as h:
            assert not h.coverage.fallback and not h.coverage.excluded
            return h.per_sample_gradients(x)

    return grads_of


def looped(output):
    return lambda model, x: per_sample_loop(model, x, output=output)


def test_densenet121_3d():
    torch.manual_seed(0)
    model = nets.DenseNet121(spatial_dims=3, in_channels=1, out_channels=2).eval()
    x = torch.randn(2, 1, 32, 32, 32)  # the smallest cube its five poolings accept
    assert_grads_match_float64_truth(hooked("contrast"), looped("contrast"), model, x, "contrast")


def test_unet_2d_sum():
    torch.manual_seed(0)
    model = nets.UNet(
        spatial_dims=2, in_channels=1, out_channels=2, channels=(4, 8, 16), strides=(2, 2), num_res_units=1
    ).eval()
    x = torch.randn(3, 1, 16, 16)
    truth = assert_grads_match_float64_truth(hooked("sum"), looped("sum"), model, x, "sum")
    flat = flatten_grads(truth)
    with nnsim_hooks.attach(model, output="sum") as h:
        sim = h.similarity(x)
    tolerance = rounding_tolerance(torch.float32, parameterised_depth(model))
    torch.testing.assert_close(sim, brute_cosine(flat, flat), rtol=0, atol=tolerance)
