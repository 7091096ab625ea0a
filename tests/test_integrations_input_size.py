"""``--image-size`` / ``--spatial-size`` (issue 20, item 5): small images stay small when
the model takes them, models with a fixed grid are built for the size, and a size the
model refuses is an error naming it and the smallest one it accepts."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from nnsim_hooks.cli import commands as cli
from nnsim_hooks.errors import InputError
from nnsim_hooks.integrations import load_dataset, load_model, with_input_size
from nnsim_hooks.integrations.input_size import accepts, parse_size
from nnsim_hooks.integrations.synthetic import make_image_folder

TINY_DENSENET = {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "init_features": 4, "growth_rate": 2,
                 "block_config": [1, 1]}


@pytest.mark.parametrize("text, dims, expected", [
    ("64", 2, (64, 64)), (64, 2, (64, 64)), ("64,48", 2, (64, 48)), ("32x32x16", 3, (32, 32, 16)), ([8], 3, (8, 8, 8)),
])
def test_sizes_are_read(text, dims, expected):
    assert parse_size(text, dims, "--spatial-size") == expected


@pytest.mark.parametrize("text, words", [
    ("big", "'big' is not a size"), ("64,64,64", "gives 3 sides but the model takes 2-D"), ("0", "positive"),
])
def test_unreadable_sizes_name_the_value(text, words):
    with pytest.raises(InputError, match=words):
        parse_size(text, 2, "--image-size")


@pytest.mark.slow
def test_a_cnn_keeps_small_images_small(tmp_path):
    """timm's resnet18 takes no img_size (a ModelError before): its inputs are resized to
    the requested size, and 64x64 files at --image-size 64 reach it pixel for pixel."""
    pytest.importorskip("timm")
    from PIL import Image

    loaded = load_model("timm:resnet18", num_classes=3)
    assert loaded.data_config.spatial_size == (224, 224)
    sized = with_input_size(loaded, 64, "--image-size")
    assert sized.model is loaded.model  # a CNN is not rebuilt
    assert sized.data_config.spatial_size == (64, 64) and sized.data_config.crop_pct == 1.0
    data = tmp_path / "images"
    make_image_folder(str(data), classes=("circle", "square"), per_class=2, size=(64, 64))
    dataset = load_dataset(str(data), sized)
    x, _ = dataset[0]
    assert tuple(x.shape) == (3, 64, 64)
    # oracle: the file's pixels, scaled and normalised by hand
    pixels = np.asarray(Image.open(dataset.paths[0]).convert("RGB"), dtype=np.float64) / 255.0
    mean, std = np.array(sized.data_config.mean), np.array(sized.data_config.std)
    np.testing.assert_allclose(x.numpy().transpose(1, 2, 0), (pixels - mean) / std, atol=1e-5)


def test_a_vit_is_built_for_the_size_and_its_patches_must_tile_it():
    pytest.importorskip("timm")
    loaded = load_model("timm:test_vit", num_classes=3)
    sized = with_input_size(loaded, 32, "--image-size")
    assert tuple(sized.model.patch_embed.img_size) == (32, 32)
    assert sized.model(torch.zeros(2, 3, 32, 32)).shape == (2, 3)
    for bad in (24, 8):
        with pytest.raises(InputError, match=rf"--image-size {bad}x{bad}: .*16x16.* at least 16"):
            with_input_size(loaded, bad, "--image-size")


@pytest.mark.slow
def test_a_volume_smaller_than_the_network_accepts_names_the_minimum():
    pytest.importorskip("monai")
    loaded = load_model("monai:DenseNet121", model_kwargs=TINY_DENSENET)
    with pytest.raises(InputError) as info:
        with_input_size(loaded, 4, "--spatial-size")
    words = str(info.value)
    assert "--spatial-size 4x4x4 is smaller than monai:DenseNet121 accepts" in words
    smallest = int(words.rsplit("give --spatial-size ", 1)[1].split()[0])
    # oracle: the network itself, at the minimum and one below
    assert accepts(loaded.model, 1, (smallest,) * 3) is None
    assert accepts(loaded.model, 1, (smallest - 1,) * 3) is not None
    assert with_input_size(loaded, smallest, "--spatial-size").data_config.spatial_size == (smallest,) * 3
    with pytest.raises(InputError, match="--image-size is for 2-D image models.*use --spatial-size"):
        with_input_size(loaded, 32, "--image-size")


def nnsim(*args):
    return cli.main(["audit", *map(str, args)])


FAST = ["--no-progress", "--k", "3", "--sketch-dim", "64", "--batch-size", "8", "--output", "contrast"]


@pytest.mark.slow
def test_cli_small_images_with_paths_and_names(tmp_path, capsys):
    pytest.importorskip("timm")
    data = tmp_path / "shapes"
    make_image_folder(str(data), classes=("circle", "square"), per_class=5, size=(32, 32))
    out = tmp_path / "audit"
    code = nnsim("--data", data, "--model", "timm:test_resnet", "--num-classes", 2, "--image-size", 32, "--out", out,
                 *FAST)
    assert code == 0, capsys.readouterr().err
    table = pd.read_csv(out / "table.csv", index_col="sample")
    assert table["path"].tolist() == [f"{c}/{p.name}" for c in ("circle", "square")
                                      for p in sorted((data / c).iterdir())]
    assert table["label_name"].tolist() == [p.split("/")[0] for p in table["path"]]
    assert set(table["prediction_name"]) <= {"circle", "square"}
    marker = json.loads((out / "nnsim-audit.json").read_text())
    assert marker["config"]["input_size"] == [32, 32]


@pytest.mark.slow
def test_cli_bad_sizes_and_budgets_are_clear_errors(tmp_path, capsys):
    pytest.importorskip("timm")
    data = tmp_path / "shapes"
    make_image_folder(str(data), classes=("circle", "square"), per_class=2, size=(16, 16))
    assert nnsim("--data", data, "--model", "timm:test_vit", "--num-classes", 2, "--image-size", 8,
                 "--out", tmp_path / "a", *FAST) == 1
    assert "--image-size 8x8: timm:test_vit cuts its input into 16x16-pixel patches" in capsys.readouterr().err
    assert nnsim("--data", data, "--model", "timm:test_resnet", "--num-classes", 2, "--image-size", 16,
                 "--max-memory", "1KB", "--out", tmp_path / "b", *FAST) == 1
    err = capsys.readouterr().err
    assert "one sample needs about" in err and "budget of 1 KB (--max-memory 1KB)" in err
    assert nnsim("--data", data, "--model", "timm:test_resnet", "--max-memory", "plenty", "--out", tmp_path / "c",
                 *FAST) == 1
    assert "--max-memory 'plenty' is not a memory size" in capsys.readouterr().err
    assert nnsim("--image-size", 16, "--out", tmp_path / "d", *FAST) == 1
    assert "--image-size given without --data" in capsys.readouterr().err


def test_a_model_of_one_fixed_size_says_so():
    """torchvision's ViT fixes its size at construction and takes no img_size."""
    tv = pytest.importorskip("torchvision")
    from nnsim_hooks.integrations import DataConfig, LoadedModel

    vit = tv.models.VisionTransformer(image_size=32, patch_size=16, num_layers=1, num_heads=1, hidden_dim=8,
                                      mlp_dim=8, num_classes=2)
    loaded = LoadedModel(model=vit.eval(), data_config=DataConfig(spatial_size=(32, 32)), source="torchvision",
                         name="vit")
    with pytest.raises(InputError, match=r"--image-size 48x48: torchvision:vit takes only inputs of 32x32"):
        with_input_size(loaded, 48, "--image-size")
    assert with_input_size(loaded, 32, "--image-size").data_config.spatial_size == (32, 32)


DENSENET_32 = dict(TINY_DENSENET, block_config=[1, 1, 1, 1])  # four poolings: DenseNet121's minimum of about 32³


@pytest.mark.slow
def test_cli_spatial_size_brings_small_volumes_up_to_what_a_3d_network_needs(tmp_path, capsys):
    pytest.importorskip("monai")
    pytest.importorskip("nibabel")
    from nnsim_hooks.integrations.synthetic import make_nifti_folder
    from nnsim_hooks.integrations.volumes import load_volume

    data = tmp_path / "volumes"
    paths = make_nifti_folder(str(data), per_class=3, shape=(16, 16, 16))
    args = ["--data", data, "--model", "monai:DenseNet121", "--model-kwargs", json.dumps(DENSENET_32),
            "--num-classes", 2, *FAST[:-2], "--batch-size", 4]
    assert nnsim(*args, "--out", tmp_path / "a") == 1
    err = capsys.readouterr().err
    smallest = int(err.rsplit("give --spatial-size ", 1)[1].split()[0])
    assert "the samples are 16x16x16, smaller than monai:DenseNet121 accepts" in err and 17 <= smallest <= 32
    assert nnsim(*args, "--spatial-size", 32, "--out", tmp_path / "b") == 0, capsys.readouterr().err
    marker = json.loads((tmp_path / "b" / "nnsim-audit.json").read_text())
    assert marker["config"]["input_size"] == [32, 32, 32]
    # what the network saw: the volume scaled to [0, 1] (MONAI's ScaleIntensity) and resized trilinearly
    loaded = with_input_size(load_model("monai:DenseNet121", model_kwargs=DENSENET_32), 32, "--spatial-size")
    raw = torch.as_tensor(np.asarray(load_volume(paths[0]), dtype=np.float32))
    scaled = (raw - raw.min()) / (raw.max() - raw.min())
    expected = torch.nn.functional.interpolate(scaled[None], size=(32, 32, 32), mode="trilinear")[0]
    assert torch.allclose(load_dataset(str(data), loaded)[0][0], expected, atol=1e-5)


def test_data_too_small_for_the_network_name_the_size_that_works():
    from nnsim_hooks.integrations import DataConfig, LoadedModel, check_data_size

    def loaded(model):
        return LoadedModel(model=model, data_config=DataConfig(channels=1), source="callable", name="net")

    conv = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 8), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    check_data_size(loaded(conv), (1, 8, 8))  # big enough: nothing to say
    with pytest.raises(InputError, match=r"the samples are 5x5, smaller than .* the smallest it accepts is 8x8: "
                                         r"give --image-size 8 \(or more\)"):
        check_data_size(loaded(conv), (1, 5, 5))
    # a model that takes one size only is not a size problem here: the audit's own checks explain it
    fixed = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16 * 16, 2))
    check_data_size(loaded(fixed), (1, 32, 32))
