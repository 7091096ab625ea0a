"""Per-sample gradients on timm's tiny ``test_*`` models (``pretrained=False``) against the
per-sample autograd loop of ``nnsim_hooks.oracle``.

Between them these models hold the cases hooks get wrong most easily: timm's own layer
subclasses (StdConv2d / ScaledStdConv2d in nfnet, LayerNorm2d, fast-norm LayerNorm),
layer-scale gammas, cls_token / pos_embed, relative-position MLPs evaluated outside the
module's forward (vit_relpos), and attention on windows folded into the batch (maxvit).

The truth is the loop in float64; the hooks must match it to float64 rounding in float64,
and in float32 to a tolerance derived from the float64 truth (see
``core_oracles.assert_grads_match_float64_truth``).
"""

from __future__ import annotations

import pytest
import torch

import nnsim_hooks
from nnsim_hooks.oracle import per_sample_loop
from core_oracles import assert_grads_match_float64_truth

timm = pytest.importorskip("timm")

pytestmark = pytest.mark.slow  # seconds per model (a float64 and a float32 pass, a float64 loop)

MODELS = [
    "test_resnet",
    "test_efficientnet",
    "test_convnext",
    "test_byobnet",
    "test_nfnet",
    "test_vit",
    "test_vit_relpos",
    "test_maxvit",
]
# Transformers take img_size; the CNNs are fully convolutional.
SIZED = ("test_vit", "test_vit_relpos", "test_maxvit")


@pytest.mark.parametrize("name", MODELS)
def test_per_sample_gradients_match_loop(name):
    kwargs = {"img_size": 32} if name in SIZED else {}
    model = timm.create_model(name, pretrained=False, num_classes=4, **kwargs).eval()
    x = torch.randn(2, 3, 32, 32)

    def hooked(model, x):
        with nnsim_hooks.attach(model) as h:  # output="auto": contrast for a classifier
            grads = h.per_sample_gradients(x)
            assert h.output_name == "contrast"
            assert not h.coverage.excluded
            assert set(h.coverage.fast), "no module used a fast rule"
        return grads

    def looped(model, x):
        return per_sample_loop(model, x, output="contrast")

    assert_grads_match_float64_truth(hooked, looped, model, x, "contrast")
