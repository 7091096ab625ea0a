"""load_model: torchvision, MONAI networks and bundles, package.module:function, checkpoints."""

from __future__ import annotations

import json
import os
import sys
import textwrap

import pytest
import torch
import torch.nn as nn

from nnsim_hooks.errors import DataError, InputError, ModelError
from nnsim_hooks.integrations import DataConfig, LoadedModel, load_checkpoint, load_model, parse_model_kwargs
from nnsim_hooks.oracle import per_sample_loop

TINY_DENSENET = {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "init_features": 4, "growth_rate": 2,
                 "block_config": [1, 1]}


# -- checkpoints ------------------------------------------------------------------------------


class Small(nn.Module):
    def __init__(self, classes=3):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, classes)

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))


def test_checkpoint_round_trip_and_wrappers(tmp_path):
    source = Small()
    for i, content in enumerate([
        source.state_dict(),
        {"state_dict": source.state_dict(), "epoch": 3},
        {"model": {f"module.{k}": v for k, v in source.state_dict().items()}},
    ]):
        path = tmp_path / f"ckpt{i}.pt"
        torch.save(content, path)
        target = load_checkpoint(Small(), str(path))
        for k, v in source.state_dict().items():
            assert torch.equal(target.state_dict()[k], v)


def test_checkpoint_mismatch_names_the_keys(tmp_path):
    state = Small(classes=5).state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["conv.bias"]
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    with pytest.raises(ModelError) as info:
        load_checkpoint(Small(classes=3), str(path))
    message = str(info.value)
    assert "missing key(s): conv.bias" in message
    assert "unexpected key(s): extra.weight" in message
    assert "fc.weight (checkpoint (5, 4), model (3, 4))" in message
    assert "--num-classes" in message


def test_checkpoint_with_pickled_objects_is_refused(tmp_path):
    path = tmp_path / "module.pt"
    torch.save(Small(), path)  # a whole pickled module, not a state_dict
    with pytest.raises(DataError, match="weights_only=True"):
        load_checkpoint(Small(), str(path))
    with pytest.raises(DataError, match="does not exist"):
        load_checkpoint(Small(), str(tmp_path / "nope.pt"))


# -- spec parsing ------------------------------------------------------------------------------


def test_model_kwargs_parsing():
    assert parse_model_kwargs('{"a": 1}') == {"a": 1}
    assert parse_model_kwargs(None) == {} and parse_model_kwargs({"b": 2}) == {"b": 2}
    with pytest.raises(InputError, match="not valid JSON"):
        parse_model_kwargs("{spatial_dims: 3}")
    with pytest.raises(InputError, match="JSON object"):
        parse_model_kwargs("[1, 2]")


def test_unclear_spec_says_what_is_accepted():
    with pytest.raises(InputError, match="timm:NAME, torchvision:NAME, monai:NAME"):
        load_model("resnet18")
    with pytest.raises(ModelError, match="cannot be imported"):
        load_model("no_such_package.models:build")


# -- torchvision ------------------------------------------------------------------------------


def test_torchvision_resnet_with_checkpoint(tmp_path):
    pytest.importorskip("torchvision")
    first = load_model("torchvision:resnet18", num_classes=4)
    assert first.source == "torchvision" and not first.model.training
    config = first.data_config
    assert config.spatial_size == (224, 224) and config.crop_pct == pytest.approx(224 / 256)
    assert config.mean == pytest.approx((0.485, 0.456, 0.406))
    path = tmp_path / "resnet18.pt"
    torch.save(first.model.state_dict(), path)
    second = load_model("torchvision:resnet18", num_classes=4, checkpoint=str(path))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(first.model(x), second.model(x))
    with pytest.raises(ModelError, match="fc.weight"):
        load_model("torchvision:resnet18", num_classes=7, checkpoint=str(path))


def test_torchvision_unknown_name_and_unsupported_family():
    pytest.importorskip("torchvision")
    with pytest.raises(ModelError, match="did you mean.*resnet18"):
        load_model("torchvision:resnet181")
    with pytest.raises(ModelError, match="detection models"):
        load_model("torchvision:fasterrcnn_resnet50_fpn")


def test_torchvision_segmentation_uses_foreground_sum_on_dict_outputs():
    pytest.importorskip("torchvision")
    loaded = load_model("torchvision:lraspp_mobilenet_v3_large", num_classes=3)
    assert loaded.task == "segmentation"
    assert loaded.output.__name__ == "foreground_sum(background=0, key='out')"
    x = torch.randn(2, 3, 32, 32)
    with loaded.attach(layers=["classifier"]) as handle:
        grads = handle.per_sample_gradients(x)
    reference = per_sample_loop(loaded.model, x, output=loaded.output, names=set(grads))
    for name, ref in reference.items():
        assert torch.allclose(grads[name], ref, rtol=1e-4, atol=1e-6 * ref.abs().max().item())


# -- MONAI ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def monai():
    return pytest.importorskip("monai")


@pytest.mark.slow
def test_monai_densenet_3d_and_2d(monai):
    loaded = load_model("monai:DenseNet121", model_kwargs=json.dumps(TINY_DENSENET))
    assert loaded.data_config.spatial_dims == 3 and loaded.data_config.channels == 1
    assert loaded.output == "auto" and loaded.task == "classification"
    flat = dict(TINY_DENSENET, spatial_dims=2, in_channels=3)
    loaded2 = load_model("monai:densenet121", model_kwargs=flat, num_classes=5)  # case-insensitive
    assert loaded2.data_config.spatial_dims == 2 and loaded2.data_config.channels == 3
    assert loaded2.num_classes == 5
    with torch.no_grad():
        assert loaded2.model(torch.randn(1, 3, 16, 16)).shape == (1, 5)


def test_monai_resnet_function_and_num_classes(monai):
    loaded = load_model("monai:resnet10", model_kwargs={"spatial_dims": 3, "n_input_channels": 1,
                                                       "widen_factor": 0.25}, num_classes=2)
    assert loaded.data_config.channels == 1 and loaded.data_config.spatial_dims == 3
    with torch.no_grad():
        assert loaded.model(torch.randn(1, 1, 16, 16, 16)).shape == (1, 2)


@pytest.mark.parametrize("name,kwargs,shape", [
    ("UNet", {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "channels": [4, 8], "strides": [2],
              "num_res_units": 1}, (2, 1, 8, 8, 8)),
    ("SegResNet", {"spatial_dims": 2, "in_channels": 1, "out_channels": 3, "init_filters": 4, "num_groups": 2,
                   "norm": ["GROUP", {"num_groups": 2}], "blocks_down": [1, 1], "blocks_up": [1]}, (2, 1, 8, 8)),
    ("BasicUNet", {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "features": [2, 2, 2, 2, 2, 2]},
     (2, 1, 32, 32, 32)),
])
def test_monai_segmentation_nets_match_the_oracle(monai, name, kwargs, shape):
    loaded = load_model(f"monai:{name}", model_kwargs=kwargs)
    assert loaded.task == "segmentation" and loaded.output.__name__.startswith("foreground_sum")
    assert loaded.data_config.spatial_dims == kwargs["spatial_dims"]
    torch.manual_seed(0)
    model = loaded.model.double()
    x = torch.randn(*shape, dtype=torch.float64)
    with loaded.attach() as handle:
        grads = handle.per_sample_gradients(x)
    reference = per_sample_loop(model, x, output=loaded.output)
    assert set(grads) == set(reference)
    floor = 1e-6 * max(r.abs().max().item() for r in reference.values())
    for key, ref in reference.items():
        err = (grads[key] - ref).abs().max().item() / max(ref.abs().max().item(), floor)
        assert err < 1e-8, f"{key}: {err:.1e}"


def test_monai_missing_arguments_and_unknown_names(monai):
    with pytest.raises(ModelError, match=r"needs the arguments \['spatial_dims', 'in_channels', 'out_channels'\]"):
        load_model("monai:DenseNet121")
    with pytest.raises(ModelError, match="did you mean.*DenseNet121"):
        load_model("monai:DenseNet12")
    with pytest.raises(ModelError, match="rejected model_kwargs"):
        load_model("monai:DenseNet121", model_kwargs=dict(TINY_DENSENET, no_such_argument=1))


def test_monai_never_downloads(monai):
    loaded = load_model("monai:EfficientNetBN", model_kwargs={"model_name": "efficientnet-b0", "spatial_dims": 2,
                                                             "in_channels": 1, "pretrained": True}, num_classes=2)
    assert loaded.info["model_kwargs"]["pretrained"] is False


# -- bundles ----------------------------------------------------------------------------------


def test_bundle_loads_network_weights_and_metadata(monai, tmp_path):
    from nnsim_hooks.integrations.synthetic import make_bundle

    root = make_bundle(str(tmp_path / "bundle"), spatial_shape=(12, 12, 12))
    loaded = load_model(root)
    assert loaded.source == "bundle" and loaded.task == "classification"
    assert loaded.data_config.spatial_size == (12, 12, 12) and loaded.data_config.channels == 1
    assert loaded.info["preprocess"] is not None
    saved = torch.load(os.path.join(root, "models", "model.pt"), weights_only=True)
    for key, value in saved.items():
        assert torch.equal(loaded.model.state_dict()[key], value)
    # bundle:PATH works too; num_classes overrides network_def, so the weights no longer fit
    with pytest.raises(ModelError, match="shape mismatch"):
        load_model(f"bundle:{root}", num_classes=3)


def test_bundle_segmentation_and_bad_folders(monai, tmp_path):
    from nnsim_hooks.integrations.synthetic import make_bundle

    unet = {"_target_": "UNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 2, "channels": [4, 8],
            "strides": [2]}
    root = make_bundle(str(tmp_path / "seg"), network_def=unet, output_format="segmentation", spatial_shape=None)
    loaded = load_model(root)
    assert loaded.task == "segmentation" and loaded.data_config.spatial_size is None
    with pytest.raises(DataError, match="not a MONAI bundle"):
        load_model(str(tmp_path))
    os.remove(os.path.join(root, "configs", "inference.json"))
    with pytest.raises(DataError, match="no configs/inference.json"):
        load_model(root)


# -- package.module:function ------------------------------------------------------------------


@pytest.fixture()
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_models.py").write_text(textwrap.dedent("""
        import torch.nn as nn

        def small(num_classes=3, width=4):
            return nn.Sequential(nn.Conv2d(1, width, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                 nn.Linear(width, num_classes))

        def with_config(num_classes=2):
            net = small(num_classes)
            net.data_config = {"channels": 1, "spatial_dims": 2, "spatial_size": [20, 20], "intensity": "scale"}
            return net

        def not_a_model():
            return 42
    """))
    monkeypatch.chdir(tmp_path)
    yield "my_models"
    sys.modules.pop("my_models", None)


def test_callable_models(user_module):
    loaded = load_model(f"{user_module}:small", model_kwargs={"width": 5}, num_classes=4)
    assert isinstance(loaded, LoadedModel) and loaded.source == "callable"
    assert loaded.model[0].out_channels == 5 and loaded.model[-1].out_features == 4
    assert loaded.data_config == DataConfig(channels=1, spatial_dims=2, intensity="normalize")
    configured = load_model(f"{user_module}:with_config")
    assert configured.data_config.spatial_size == (20, 20) and configured.data_config.intensity == "scale"
    with pytest.raises(ModelError, match="did you mean small"):
        load_model(f"{user_module}:smal")
    with pytest.raises(ModelError, match="not a torch.nn.Module"):
        load_model(f"{user_module}:not_a_model")
    with pytest.raises(ModelError, match="width2"):
        load_model(f"{user_module}:small", model_kwargs={"width2": 1})


def test_module_instances_are_wrapped():
    loaded = load_model(Small())
    assert loaded.source == "module" and loaded.data_config.channels == 3 and not loaded.model.training


def test_core_instance_norm_before_inplace_activation():
    """F.instance_norm returns a view; an in-place ReLU on it must not hide the norm's gradient."""
    from nnsim_hooks.oracle import check_per_sample_gradients

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.InstanceNorm2d(2, affine=True), nn.ReLU(inplace=True),
                        nn.Flatten(), nn.Linear(2 * 6 * 6, 3)).double().eval()
    check_per_sample_gradients(net, torch.randn(2, 1, 8, 8, dtype=torch.float64))


def test_monai_unet_with_inplace_activations_matches_loop(monai):
    """BasicUNet keeps its in-place LeakyReLUs after InstanceNorm; gradients still match."""
    from nnsim_hooks.integrations.monai import prepare_monai_model
    from nnsim_hooks.oracle import check_per_sample_gradients
    from monai.networks.nets import BasicUNet

    torch.manual_seed(0)
    net = BasicUNet(spatial_dims=2, in_channels=1, out_channels=2, features=(2, 2, 2, 2, 2, 2)).double()
    prepare_monai_model(net)
    assert any(getattr(m, "inplace", False) for m in net.modules())  # the model is left as built
    check_per_sample_gradients(net, torch.randn(2, 1, 32, 32, dtype=torch.float64), output="sum")


def test_core_torchvision_vit_multihead_attention_out_proj():
    from torchvision.models import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(image_size=32, patch_size=16, num_layers=1, num_heads=2, hidden_dim=8, mlp_dim=16,
                              num_classes=3).double().eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    from nnsim_hooks import attach

    with attach(model) as handle:
        grads = handle.per_sample_gradients(x)
    assert set(grads) == set(per_sample_loop(model, x))
