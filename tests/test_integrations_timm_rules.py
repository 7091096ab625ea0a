"""timm's layer subclasses: each registered rule against the per-sample loop oracle, on
all three paths (per-sample gradients, the exact Gram matrix, the sketch)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

timm = pytest.importorskip("timm")

from timm import layers as L  # noqa: E402

from nnsim_hooks import attach  # noqa: E402
from nnsim_hooks.errors import ModelError  # noqa: E402
from nnsim_hooks.oracle import per_sample_loop  # noqa: E402
from nnsim_hooks.rules import RULES, add_rule  # noqa: E402
from nnsim_hooks.rules.norm import BatchNormRule  # noqa: E402
from nnsim_hooks.integrations.timm_rules import register_timm_rules  # noqa: E402

C = 6


@pytest.fixture(scope="module", autouse=True)
def rules():
    return register_timm_rules()


def _randomize(model: nn.Module) -> nn.Module:
    """Random affine parameters and running statistics: the default ones (ones, zeros)
    would hide a rule that confuses weight and bias, or mean and variance."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.5 + 0.3)
        for name, b in model.named_buffers():
            if name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=gen, dtype=b.dtype) + 0.5)
            elif name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=gen, dtype=b.dtype))
    return model


class Around(nn.Module):
    """conv -> the layer under test (channels first, or channels last on tokens) -> head."""

    def __init__(self, inner: nn.Module, channels_last: bool = False):
        super().__init__()
        self.pre = nn.Conv2d(3, C, 3, padding=1)
        self.inner = inner
        self.channels_last = channels_last
        self.head = nn.Linear(C, 4)

    def forward(self, x):
        y = self.pre(x)
        if self.channels_last:
            y = y.permute(0, 2, 3, 1)
        y = self.inner(y)
        pooled = y.mean((1, 2)) if self.channels_last else y.mean((2, 3))
        return self.head(pooled)


def _layers():
    from timm.layers.grn import GlobalResponseNorm
    from timm.models.fastvit import LayerScale2d as FastVitLayerScale2d
    from timm.models.hgnet import LearnableAffineBlock
    from timm.models.metaformer import GroupNorm1NoBias, LayerNorm2dNoBias, LayerNormNoBias, Scale, StarReLU
    from timm.models.mlp_mixer import Affine

    return {
        "Linear": (lambda: L.Linear(C, C), True),
        "LayerNorm": (lambda: L.LayerNorm(C), True),
        "LayerNormFp32": (lambda: L.norm.LayerNormFp32(C), True),
        "LayerNorm2d": (lambda: L.LayerNorm2d(C), False),
        "LayerNorm2dFp32": (lambda: L.norm.LayerNorm2dFp32(C), False),
        "RmsNormFp32": (lambda: L.norm.RmsNormFp32(C), True),
        "RmsNorm2dFp32": (lambda: L.norm.RmsNorm2dFp32(C), False),
        "SimpleNormFp32": (lambda: L.norm.SimpleNormFp32(C), True),
        "SimpleNorm2dFp32": (lambda: L.norm.SimpleNorm2dFp32(C), False),
        "LayerNormActFp32": (lambda: L.norm_act.LayerNormActFp32(C, act_layer=nn.GELU), True),
        "LayerNormAct2dFp32": (lambda: L.norm_act.LayerNormAct2dFp32(C, act_layer=nn.SiLU), False),
        "RmsNormActFp32": (lambda: L.norm_act.RmsNormActFp32(C, act_layer=nn.GELU), True),
        "RmsNormAct2dFp32": (lambda: L.norm_act.RmsNormAct2dFp32(C, act_layer=nn.GELU), False),
        "LayerNormExp2d": (lambda: L.norm.LayerNormExp2d(C), False),
        "GroupNorm": (lambda: L.GroupNorm(C, 3), False),
        "GroupNorm1": (lambda: L.GroupNorm1(C), False),
        "RmsNorm": (lambda: L.RmsNorm(C), True),
        "RmsNorm2d": (lambda: L.RmsNorm2d(C), False),
        "SimpleNorm": (lambda: L.SimpleNorm(C), True),
        "SimpleNorm2d": (lambda: L.SimpleNorm2d(C), False),
        "LayerScale": (lambda: L.LayerScale(C), True),
        "LayerScale2d": (lambda: L.LayerScale2d(C), False),
        "GlobalResponseNorm": (lambda: GlobalResponseNorm(C), True),
        "GlobalResponseNorm_nchw": (lambda: GlobalResponseNorm(C, channels_last=False), False),
        "Conv2dSame_s2": (lambda: L.Conv2dSame(C, C, 3, stride=2), False),
        "Conv2dSame_k4_s3_d2": (lambda: L.Conv2dSame(C, C, 4, stride=3, dilation=2), False),
        "Conv2dSame_depthwise": (lambda: L.Conv2dSame(C, C, 3, stride=2, groups=C), False),
        "BatchNormAct2d_relu": (lambda: L.BatchNormAct2d(C), False),
        "BatchNormAct2d_silu": (lambda: L.BatchNormAct2d(C, act_layer=nn.SiLU), False),
        "BatchNormAct2d_gelu": (lambda: L.BatchNormAct2d(C, act_layer=nn.GELU, inplace=False), False),
        "BatchNormAct2d_prelu": (lambda: L.BatchNormAct2d(C, act_layer=nn.PReLU, inplace=False), False),
        "BatchNormAct2d_noact": (lambda: L.BatchNormAct2d(C, apply_act=False), False),
        "GroupNormAct": (lambda: L.GroupNormAct(C, 3, act_layer=nn.SiLU), False),
        "GroupNorm1Act": (lambda: L.GroupNorm1Act(C, act_layer=nn.Hardswish), False),
        "LayerNormAct": (lambda: L.LayerNormAct(C, act_layer=nn.GELU), True),
        "LayerNormAct2d": (lambda: L.LayerNormAct2d(C, act_layer=nn.SiLU), False),
        "RmsNormAct": (lambda: L.RmsNormAct(C, act_layer=nn.GELU), True),
        "RmsNormAct2d": (lambda: L.RmsNormAct2d(C, act_layer=nn.GELU), False),
        "metaformer.Scale": (lambda: Scale(C), False),
        "metaformer.Scale_nhwc": (lambda: Scale(C, use_nchw=False), True),
        "metaformer.StarReLU_inplace": (lambda: StarReLU(inplace=True), False),
        "metaformer.GroupNorm1NoBias": (lambda: GroupNorm1NoBias(C), False),
        "metaformer.LayerNorm2dNoBias": (lambda: LayerNorm2dNoBias(C), False),
        "metaformer.LayerNormNoBias": (lambda: LayerNormNoBias(C), True),
        "hgnet.LearnableAffineBlock": (lambda: LearnableAffineBlock(), False),
        "fastvit.LayerScale2d": (lambda: FastVitLayerScale2d(C), False),
        "mlp_mixer.Affine": (lambda: Affine(C), True),
    }


LAYERS = _layers()


def _similarity_from(reference, batch, d):
    jac = torch.cat([g.reshape(batch, d, -1) for g in reference.values()], -1)  # [B, d, p]
    white = []
    for i in range(batch):
        evals, evecs = torch.linalg.eigh(jac[i] @ jac[i].T)
        white.append(evecs @ torch.diag(evals.rsqrt()) @ evecs.T @ jac[i])
    white = torch.stack(white)
    return torch.einsum("adp,bdp->ab", white, white) / d


def _compare(model, x, output, check_similarity=True):
    # sketch_dim above the model's size (and each parameter under exact_limit): the sketch is exact (no random
    # matrices), so features() must give the exact similarity through each rule's sketch path; the exact density
    # (each rule's weighted sums and products) must give its row sums.
    with attach(model, output=output, sketch_dim=4096) as handle:
        status = {r.module: r.status for r in handle.coverage.rows}
        hooked = handle.per_sample_gradients(x)
        exact = handle.similarity(x).detach()
        features = handle.features(x).detach()
        density = torch.as_tensor(handle.density(x, progress=False))  # each rule's sums and dots
        assert handle.sketcher.exact
    reference = per_sample_loop(model, x, output=output)
    assert set(hooked) == set(reference)
    errors = {}
    for name, ref in reference.items():
        scale = ref.abs().max().item()
        errors[name] = (hooked[name] - ref).abs().max().item() / (scale or 1.0)
    d = 1 if output != "full" else next(iter(reference.values())).shape[1]
    if check_similarity:
        expected = _similarity_from(reference, x.shape[0], d)
        assert torch.allclose(exact, expected, atol=1e-8), "gram path"
        assert torch.allclose((features @ features.T).double(), expected, atol=1e-8), "sketch path"
        assert torch.allclose(density, expected.sum(1), atol=1e-7), "exact density path"
    return status, errors


@pytest.mark.parametrize("output", ["auto", "full"])
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_rule_matches_per_sample_loop(name, output):
    factory, channels_last = LAYERS[name]
    torch.manual_seed(0)
    model = _randomize(Around(factory(), channels_last)).double().eval()
    x = torch.randn(3, 3, 5, 7, dtype=torch.float64)
    status, errors = _compare(model, x, output)
    assert status["inner"] == "fast", f"{name} is not on a fast rule"
    # The Fp32 variants compute in float32 inside a float64 model: float32 precision.
    tolerance = 1e-5 if "Fp32" in name else 1e-10
    worst = max(v for k, v in errors.items() if k.startswith("inner."))
    assert worst < tolerance, f"{name}: relative error {worst:.2e}"
    assert max(errors.values()) < tolerance


def test_plain_batchnorm_rule_on_batchnorm_act_is_wrong():
    """Why BatchNormAct2d needs its own rule: the hook sees the gradient after the
    activation, so nn.BatchNorm2d's rule applied to it disagrees with the oracle."""
    model = _randomize(Around(L.BatchNormAct2d(C, act_layer=nn.SiLU))).double().eval()
    x = torch.randn(3, 3, 7, 9, dtype=torch.float64)
    previous = RULES[L.BatchNormAct2d]
    with pytest.warns(UserWarning, match="replaced"):  # registering over the timm rule warns
        add_rule(L.BatchNormAct2d, BatchNormRule())
    try:
        _, errors = _compare(model, x, "auto", check_similarity=False)
    finally:
        with pytest.warns(UserWarning):
            add_rule(L.BatchNormAct2d, previous)
    assert errors["inner.weight"] > 1e-3


@pytest.mark.parametrize(
    "factory",
    [
        lambda: L.StdConv2d(C, C, 3, padding=1),
        lambda: L.ScaledStdConv2d(C, C, 3, padding=1),
        lambda: L.StdConv2dSame(C, C, 3, stride=2),
        lambda: L.std_conv.ScaledStdConv2dSame(C, C, 3, stride=2),
    ],
    ids=["StdConv2d", "ScaledStdConv2d", "StdConv2dSame", "ScaledStdConv2dSame"],
)
def test_forward_changing_subclasses_use_the_fallback_and_are_exact(factory):
    torch.manual_seed(0)
    model = _randomize(Around(factory())).double().eval()
    x = torch.randn(2, 3, 7, 9, dtype=torch.float64)
    status, errors = _compare(model, x, "auto")
    assert status["inner"] == "fallback"
    assert max(errors.values()) < 1e-10


def test_registration_is_idempotent_and_covers_the_table(rules):
    from timm.layers.conv2d_same import Conv2dSameExport

    again = register_timm_rules()
    assert again == rules
    for layer in (L.Linear, L.LayerNorm, L.LayerNorm2d, L.BatchNormAct2d, L.GroupNormAct, L.Conv2dSame):
        assert layer in RULES and RULES[layer] is rules[layer]
    for layer in (L.StdConv2d, L.ScaledStdConv2d, L.std_conv.StdConv2dSame, Conv2dSameExport):
        assert layer not in RULES


def test_registration_is_restored_after_the_registry_was_reset(rules):
    # conftest restores the registry after every test: a later call must register again,
    # not trust that the first call's rules are still there.
    for layer in rules:
        RULES.pop(layer, None)
    assert L.Linear not in RULES
    register_timm_rules()
    assert all(RULES.get(layer) is rule for layer, rule in rules.items())


def test_inplace_layerscale_is_not_claimed_by_the_rule():
    model = Around(L.LayerScale(C, inplace=True), channels_last=True).eval()
    with attach(model) as handle:
        status = {r.module: r.status for r in handle.coverage.rows}
    assert status["inner"] == "fallback"


def test_active_drop_layer_inside_norm_act_is_refused():
    layer = L.BatchNormAct2d(C, drop_layer=lambda: nn.Dropout(0.5))
    model = Around(layer).eval()
    layer.drop.train()
    with attach(model) as handle:
        with pytest.raises(ModelError, match="model.eval"):
            handle.per_sample_gradients(torch.randn(2, 3, 5, 5))
