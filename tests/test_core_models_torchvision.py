"""Per-sample gradients on stock torchvision models (``weights=None``, eval mode), for every
``output=``, against torch.func.

One Jacobian of the logits per model (``vmap`` of ``jacrev``) is the oracle for all output
functions: the gradient of ``f(z(x))`` is ``J(x)^T df/dz``, with ``df/dz`` taken by torch.func
from the definitions in ``core_oracles`` (written from the paper, not from the library).
"""

from __future__ import annotations

import functools

import pytest
import torch
import torchvision

import nnsim_hooks
from core_oracles import REFERENCE_OUTPUTS, assert_grads_close, chain_rule, output_jacobian, ref_two_outputs, two_outputs

CLASSES = 3

pytestmark = pytest.mark.slow  # each model's Jacobian, then a pass per output function (seconds each)


def _vit():
    model = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=CLASSES
    )
    # torchvision initialises the head to zeros: every other gradient would be zero and the
    # test could not fail. Random weights instead.
    torch.nn.init.normal_(model.heads.head.weight, std=0.5)
    return model


MODELS = {
    # resnet18: in-place ReLU and `out += identity`, BatchNorm in eval mode.
    "resnet18": (lambda: torchvision.models.resnet18(weights=None, num_classes=CLASSES), 16),
    # mobilenet_v3_small: depthwise convs, Hardswish, squeeze-excitation.
    "mobilenet_v3_small": (lambda: torchvision.models.mobilenet_v3_small(weights=None, num_classes=CLASSES), 16),
    # VisionTransformer: class_token and pos_embedding (bare parameters), nn.MultiheadAttention.
    "vit": (_vit, 32),
}


@functools.lru_cache(maxsize=None)
def _setup(name):
    """Model, inputs, targets, logits and the logits' per-sample Jacobian (cached per model)."""
    torch.manual_seed(0)
    factory, size = MODELS[name]
    model = factory().eval()
    x = torch.randn(3, 3, size, size)
    y = torch.tensor([2, 0, 1])
    with torch.no_grad():
        logits = model(x)
    return model, x, y, logits, output_jacobian(model, x)


OUTPUTS = ["contrast", "contrast-labels", "logit", "loss", "sum", "full", "callable"]
# resnet18 holds 11M parameters: materialising them per sample for every output function
# costs seconds each, and the output functions act on the logits alone (the other two models,
# mobilenet with in-place activations and BatchNorm too, cover all of them), so resnet18 runs
# the default output only.
CASES = [(name, out) for name in MODELS for out in OUTPUTS if name != "resnet18" or out == "contrast"]


@pytest.mark.parametrize("name, output", CASES)
def test_per_sample_gradients(name, output):
    model, x, y, logits, jacobian = _setup(name)
    if output == "callable":
        spec, ref_fn, targets = two_outputs, ref_two_outputs, None
    elif output == "contrast-labels":
        spec, ref_fn, targets = "contrast", REFERENCE_OUTPUTS["contrast"], y
    else:
        spec, ref_fn = output, REFERENCE_OUTPUTS[output]
        targets = y if output == "loss" else None
    with nnsim_hooks.attach(model, output=spec) as h:
        got = h.per_sample_gradients(x, targets)
    ref = chain_rule(jacobian, logits, ref_fn, targets)
    # Every parameter tensor must get some gradient, or a bug there would go unseen.
    assert all(bool(r.abs().max() > 0) for r in ref.values()), [n for n, r in ref.items() if not r.abs().max() > 0]
    assert_grads_close(got, ref, rtol=1e-3, atol=2e-5)
