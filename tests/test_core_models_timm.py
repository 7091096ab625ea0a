"""Per-sample gradients on timm's tiny ``test_*`` models (``pretrained=False``) against the
per-sample autograd loop of ``nnsim_hooks.oracle``.

Between them these models hold the cases hooks get wrong most easily: timm's own layer
subclasses (StdConv2d / ScaledStdConv2d in nfnet, LayerNorm2d, fast-norm LayerNorm),
layer-scale gammas, cls_token / pos_embed, relative-position MLPs evaluated outside the
module's forward (vit_relpos), and attention on windows folded into the batch (maxvit).
"""

from __future__ import annotations

import pytest
import torch

import nnsim_hooks
from nnsim_hooks.oracle import per_sample_loop
from core_oracles import assert_grads_close

timm = pytest.importorskip("timm")

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
    with nnsim_hooks.attach(model) as h:  # output="auto": contrast for a classifier
        got = h.per_sample_gradients(x)
        assert h.output_name == "contrast"
        coverage = h.coverage
    ref = per_sample_loop(model, x, output="contrast")
    assert_grads_close(got, ref, rtol=1e-3, atol=2e-5)
    assert not coverage.excluded
    assert set(coverage.fast), "no module used a fast rule"
