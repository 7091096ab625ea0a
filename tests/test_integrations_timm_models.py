"""timm models end to end: loading, data config, layer selection, and a broad sample of
families against the per-sample loop oracle (float64, batch of 2, 32 px)."""

from __future__ import annotations

import pytest
import torch

timm = pytest.importorskip("timm")

from nnsim_hooks import attach  # noqa: E402
from nnsim_hooks.errors import ModelError  # noqa: E402
from nnsim_hooks.integrations import load_model  # noqa: E402
from nnsim_hooks.integrations.timm import prepare_timm_model, timm_layers  # noqa: E402
from nnsim_hooks.oracle import per_sample_loop  # noqa: E402

SIZE = 32

# The test_* models timm ships for CI, and two real families with layers the others
# lack: BatchNormAct2d (mobilenetv3) and Conv2dSame (tf_ variants). Every family is in
# benchmarks/timm_coverage.py; the layers themselves in test_integrations_timm_rules.py.
MODELS = [
    "test_byobnet", "test_coatnet", "test_convnext", "test_convnext2", "test_convnext3", "test_efficientnet",
    "test_efficientnet_evos", "test_efficientnet_gn", "test_efficientnet_ln", "test_mambaout", "test_nfnet",
    "test_resnet", "test_vit", "test_vit2", "test_vit3", "test_vit4",
    "mobilenetv3_small_050", "tf_mobilenetv3_small_minimal_100",
    # Parameters applied to a reshaped batch (test_maxvit's windows fold into the batch)
    # or to no batch (test_vit_relpos's bias MLP runs on a coordinate table): the core
    # hands them to the module that mixes them in.
    "test_maxvit", "test_vit_relpos",
]

def _create(name):
    try:
        model = timm.create_model(name, pretrained=False, num_classes=3, img_size=SIZE)
    except TypeError:
        model = timm.create_model(name, pretrained=False, num_classes=3)
    return prepare_timm_model(model.double())


def _max_relative_error(hooked, reference):
    # Relative to each parameter's largest gradient, floored at 1e-6 of the model's: a
    # parameter whose true gradient is zero (softmax over one key) holds only noise.
    floor = 1e-6 * max(r.abs().max().item() for r in reference.values())
    worst = 0.0
    for name, ref in reference.items():
        scale = max(ref.abs().max().item(), floor)
        worst = max(worst, (hooked[name] - ref).abs().max().item() / scale)
    return worst


def _check(name):
    from nnsim_hooks.integrations.timm_rules import register_timm_rules

    register_timm_rules()
    torch.manual_seed(0)
    model = _create(name)
    x = torch.randn(2, 3, SIZE, SIZE, dtype=torch.float64)
    with attach(model) as handle:
        hooked = handle.per_sample_gradients(x)
    reference = per_sample_loop(model, x)
    assert set(hooked) == set(reference), "every trainable parameter gets a per-sample gradient"
    for key, g in hooked.items():
        assert g.shape == reference[key].shape, f"{key}: {tuple(g.shape)} vs {tuple(reference[key].shape)}"
    return _max_relative_error(hooked, reference)


@pytest.mark.parametrize("name", MODELS)
def test_family_matches_the_per_sample_loop(name):
    assert _check(name) < 1e-8


def test_attention_bias_cache_would_break_gradients_without_prepare():
    """Without prepare_timm_model, timm's eval-mode cache reuses the first call's graph."""
    torch.manual_seed(0)
    model = timm.create_model("efficientformerv2_s0", pretrained=False, num_classes=3, img_size=SIZE).eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    model(x).sum().backward()  # fills the cache with a graph that is then freed
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        model(x).sum().backward()
    prepare_timm_model(model)
    model(x).sum().backward()
    model(x).sum().backward()


def test_load_model_timm_data_config_and_rules():
    loaded = load_model("timm:test_vit", num_classes=4, model_kwargs={"img_size": 64})
    assert not loaded.model.training
    assert loaded.num_classes == 4 and loaded.task == "classification"
    config = loaded.data_config
    assert config.input_size == (3, 64, 64)  # img_size overrides the pretrained config's 160
    assert config.spatial_dims == 2 and config.intensity == "normalize"
    assert config.mean == tuple(timm.data.resolve_model_data_config(loaded.model)["mean"])
    with loaded.attach() as handle:
        assert handle.coverage.fallback == [""]  # only the model-level cls_token / pos_embed


def test_load_model_timm_in_chans_sets_channels_and_statistics():
    loaded = load_model("timm:test_resnet", model_kwargs='{"in_chans": 1}')
    assert loaded.data_config.channels == 1 and len(loaded.data_config.mean) == 1


def test_unknown_timm_name_suggests_close_names():
    with pytest.raises(ModelError, match="did you mean.*resnet18"):
        load_model("timm:resnet18x")


def test_timm_never_downloads_pretrained_weights(monkeypatch):
    calls = []
    original = timm.create_model

    def spy(name, pretrained=False, **kwargs):
        calls.append(pretrained)
        return original(name, pretrained=pretrained, **kwargs)

    monkeypatch.setattr(timm, "create_model", spy)
    load_model("timm:test_resnet", model_kwargs={"pretrained": True})
    assert calls == [False]


def test_timm_layers_head_and_last_blocks():
    model = timm.create_model("test_resnet", pretrained=False)
    assert timm_layers(model) == ["fc"]
    last = timm_layers(model, blocks=1)
    assert last[-1] == "fc" and all(n.startswith("layer4.") for n in last[:-1])
    two = timm_layers(model, blocks=2, head=False)
    assert {n.split(".")[0] for n in two} == {"layer3", "layer4"} if len(model.layer4) == 1 else True
    # the selection plugs into attach and covers exactly those modules' parameters
    with attach(model.eval(), layers=last) as handle:
        selected = {r.module for r in handle.coverage.rows if r.status in ("fast", "fallback")}
    assert selected == set(last)
    vit = timm.create_model("test_vit", pretrained=False)
    names = timm_layers(vit, blocks=1)
    depth = len(vit.blocks)
    assert names[-2:] == ["norm", "head"] and all(n.startswith(f"blocks.{depth - 1}.") for n in names[:-2])


def test_timm_layers_rejects_impossible_selections():
    model = timm.create_model("test_resnet", pretrained=False)
    with pytest.raises(ModelError, match="block groups"):
        timm_layers(model, blocks=1000)
    headless = timm.create_model("test_resnet", pretrained=False, num_classes=0)
    with pytest.raises(ModelError, match="no classifier"):
        timm_layers(headless)
    assert timm_layers(headless, blocks=1, head=False)
