"""load_dataset: ImageFolder, CSV, MONAI datalist of NIfTI volumes; thumbnails; bad input."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from nnsim_hooks.errors import DataError
from nnsim_hooks.integrations import DataConfig, LoadedModel, load_dataset, thumbnail_of
from nnsim_hooks.integrations.synthetic import make_image_folder, make_nifti_datalist
from nnsim_hooks.audit.thumbnails import central_slice, from_channels_first, to_uint8

RGB_32 = DataConfig(channels=3, spatial_dims=2, spatial_size=(32, 32), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
VOLUME = DataConfig(channels=1, spatial_dims=3, spatial_size=(8, 10, 12), intensity="scale")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagefolder")
    make_image_folder(str(root), classes=("b_square", "a_circle"), per_class=3, size=(40, 50))
    return str(root)


@pytest.fixture(scope="module")
def datalist(tmp_path_factory):
    pytest.importorskip("monai")
    pytest.importorskip("nibabel")
    root = tmp_path_factory.mktemp("nifti")
    return make_nifti_datalist(str(root), n=4, shape=(12, 14, 10), with_masks=True)


# -- ImageFolder ------------------------------------------------------------------------------


def test_image_folder_labels_classes_and_transform(folder):
    data = load_dataset(folder, RGB_32)
    assert data.layout == "imagefolder" and len(data) == 6
    assert data.classes == ["a_circle", "b_square"]  # sorted folder names, like torchvision
    assert data.labels == [0, 0, 0, 1, 1, 1] and data.targets == data.labels
    assert all(p.startswith(os.path.join(folder, "a_circle")) for p in data.paths[:3])
    x, y = data[4]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y == 1
    # the transform is resize + centre crop + normalise: check it against a hand-made one
    image = Image.open(data.paths[4]).convert("RGB")
    from torchvision import transforms as T

    expected = T.Compose([T.Resize((32, 32)), T.CenterCrop((32, 32)), T.ToTensor(), T.Normalize(RGB_32.mean, RGB_32.std)])
    assert torch.allclose(x, expected(image), atol=1e-6)
    # torchvision-style attributes that reports read
    assert data.samples[0] == (data.paths[0], 0)
    assert data.loader(data.paths[0]).size == (50, 40)


def test_image_folder_grey_model_and_unlabelled_folder(tmp_path, folder):
    grey = load_dataset(folder, DataConfig(channels=1, spatial_size=(16, 16), mean=(0.5,), std=(0.5,)))
    assert grey[0][0].shape == (1, 16, 16)
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(2):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(flat / f"{i}.png")
    (flat / "notes.txt").write_text("ignored")
    data = load_dataset(str(flat), RGB_32)
    assert data.layout == "folder" and data.labels == [-1, -1] and len(data) == 2


def test_timm_models_use_timms_own_transform(folder):
    timm = pytest.importorskip("timm")
    from nnsim_hooks.integrations import load_model

    loaded = load_model("timm:test_resnet", num_classes=2)
    data = load_dataset(folder, loaded, spatial_size=48)
    transform = timm.data.create_transform(input_size=(3, 48, 48), mean=loaded.data_config.mean,
                                           std=loaded.data_config.std, crop_pct=loaded.data_config.crop_pct,
                                           interpolation=loaded.data_config.interpolation)
    expected = transform(Image.open(data.paths[0]).convert("RGB"))
    assert torch.allclose(data[0][0], expected)


# -- CSV --------------------------------------------------------------------------------------


def test_csv_with_header_and_class_names(tmp_path, folder):
    rel = [os.path.relpath(p, tmp_path) for p in load_dataset(folder, RGB_32).paths]
    csv_path = tmp_path / "list.csv"
    csv_path.write_text("image,target\n" + "\n".join(f"{p},{'cat' if i % 2 else 'dog'}" for i, p in enumerate(rel)))
    data = load_dataset(str(csv_path), RGB_32)
    assert data.layout == "csv" and data.classes == ["cat", "dog"] and data.labels == [1, 0, 1, 0, 1, 0]
    plain = tmp_path / "plain.csv"
    plain.write_text("\n".join(f"{p},{i}" for i, p in enumerate(rel[:3])) + "\n" + f"{rel[3]},\n")
    data = load_dataset(str(plain), RGB_32)
    assert data.labels == [0, 1, 2, -1] and data.classes == []


def test_csv_missing_files_are_listed(tmp_path):
    csv_path = tmp_path / "list.csv"
    csv_path.write_text("path,label\n" + "\n".join(f"missing_{i}.png,0" for i in range(9)))
    with pytest.raises(DataError) as info:
        load_dataset(str(csv_path), RGB_32)
    message = str(info.value)
    assert "9 of the 9 files" in message and "missing_0.png" in message and "missing_4.png" in message
    assert "missing_5.png" not in message  # only the first few


# -- MONAI datalist of NIfTI volumes ---------------------------------------------------------------


@pytest.mark.slow
def test_datalist_of_nifti_volumes(datalist):
    data = load_dataset(datalist, VOLUME)
    assert data.layout == "datalist" and data.labels == [0, 1, 0, 1]
    x, y = data[1]
    assert x.shape == (1, 8, 10, 12) and y == 1
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0  # ScaleIntensity
    assert all(m and m.endswith("_mask.nii.gz") for m in data.masks)
    free = load_dataset(datalist, DataConfig(channels=1, spatial_dims=3, intensity="scale"))
    assert free[0][0].shape == (1, 12, 14, 10)  # no spatial_size: the files' own


def test_datalist_label_files_become_masks_and_sections(tmp_path, datalist):
    content = json.load(open(datalist))
    items = [{"image": os.path.join(os.path.dirname(datalist), it["image"]),
              "label": os.path.join(os.path.dirname(datalist), it["mask"])} for it in content["training"]]
    path = tmp_path / "seg.json"
    path.write_text(json.dumps({"validation": items}))
    data = load_dataset(str(path), VOLUME)
    assert data.labels == [-1] * 4 and all(m.endswith("_mask.nii.gz") for m in data.masks)
    with pytest.raises(DataError, match="no section 'test'"):
        load_dataset(str(path), VOLUME, section="test")


def test_datalist_missing_paths_are_listed(tmp_path):
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps({"training": [{"image": f"vol_{i}.nii.gz", "label": 0} for i in range(7)]}))
    with pytest.raises(DataError, match=r"7 of the 7 files.*vol_0.nii.gz.*vol_4.nii.gz"):
        load_dataset(str(path), VOLUME)


def test_dimension_mismatch_is_said_plainly(folder, datalist):
    spec = LoadedModel(model=torch.nn.Identity(), data_config=VOLUME, source="monai", name="DenseNet121")
    with pytest.raises(DataError, match=r"monai:DenseNet121 is a 3-D model .* is 2-D.*3-D volumes"):
        load_dataset(folder, spec)
    with pytest.raises(DataError, match=r"is a 2-D model .* is 3-D.*2-D images"):
        load_dataset(datalist, DataConfig(channels=1, spatial_dims=2, spatial_size=(16, 16), intensity="scale"))
    with pytest.raises(DataError, match="expects 3 input channel"):
        load_dataset(datalist, DataConfig(channels=3, spatial_dims=3, intensity="scale"))


def test_samples_of_different_sizes_need_a_spatial_size(tmp_path):
    for i, shape in enumerate([(8, 8), (9, 8)]):
        (tmp_path / "c").mkdir(exist_ok=True)
        Image.fromarray(np.zeros(shape, np.uint8)).save(tmp_path / "c" / f"{i}.png")
    data = load_dataset(str(tmp_path), DataConfig(channels=1, mean=None, std=None))
    data[0]
    with pytest.raises(DataError, match="spatial_size"):
        data[1]


def test_unreadable_file_is_named_and_left_to_the_caller(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a_broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="a_broken.png"):
        load_dataset(str(tmp_path), RGB_32)  # nothing readable at all
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "c" / "b_fine.png")
    data = load_dataset(str(tmp_path), RGB_32)  # the check reads the first readable one
    with pytest.raises(DataError, match="sample 0: cannot read"):
        data[0]
    with pytest.raises(Exception):
        data.loader(data.paths[0]).load()  # what audits use to skip unreadable files
    assert data[1][0].shape == (3, 32, 32)


# -- thumbnails -------------------------------------------------------------------------------


def test_thumbnails_of_images_and_volume_central_slices(folder, datalist):
    images = load_dataset(folder, RGB_32)
    thumb = thumbnail_of(images, 0, size=20)
    assert thumb.dtype == np.uint8 and thumb.shape == (16, 20, 3)  # 40x50 fitted in 20, aspect kept
    volumes = load_dataset(datalist, VOLUME)
    thumb = volumes.thumbnail(0, size=64)
    assert thumb.dtype == np.uint8 and thumb.ndim == 2
    assert thumb.shape == (14, 12)  # the raw volume's central axial slice, rotated for display
    assert volumes.loader(volumes.paths[0]).shape == thumb.shape


def test_central_slice_and_scaling_are_exact():
    volume = np.zeros((4, 5, 6))
    volume[:, :, 3] = np.arange(20).reshape(4, 5)
    assert np.array_equal(central_slice(volume), np.rot90(volume[:, :, 3]))
    assert to_uint8(np.array([0.0, 1.0]), 0, 100).tolist() == [0, 255]
    assert to_uint8(np.ones((2, 2))).tolist() == [[128, 128], [128, 128]]
    rgb = from_channels_first(np.random.rand(3, 6, 7))
    assert rgb.shape == (6, 7, 3)
    grey3d = from_channels_first(np.random.rand(1, 4, 6, 8))
    assert grey3d.shape == (6, 4)  # slice [4, 6] rotated


def test_thumbnail_of_plain_tensor_datasets():
    data = torch.utils.data.TensorDataset(torch.randn(2, 1, 6, 8, 10), torch.tensor([0, 1]))
    assert thumbnail_of(data, 1).shape == (8, 6)


def test_the_first_sample_check_finds_the_first_readable_file(tmp_path):
    (tmp_path / "c").mkdir()
    for i in range(7):  # more broken files than the old check's five tries, sorted first
        (tmp_path / "c" / f"a_broken_{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "c" / "b_fine.png")
    data = load_dataset(str(tmp_path), DataConfig(channels=3, spatial_dims=3, intensity="scale"), check=False)
    with pytest.raises(DataError, match=r"3-D model .* sample 7 '.*b_fine.png' is 2-D"):
        data.check()  # the mismatch is found on the first readable file
    data = load_dataset(str(tmp_path), RGB_32)
    assert data.check() == 7 and data[7][0].shape == (3, 32, 32)
    os.remove(tmp_path / "c" / "b_fine.png")
    with pytest.raises(DataError, match=r"none of the 7 files .* can be read.*a_broken_0.png.*a_broken_4.png"):
        load_dataset(str(tmp_path), RGB_32)
