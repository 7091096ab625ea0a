"""Every PIL mode reaches the model with its full range and one documented rule (issue 11,
item 6): 16/32-bit grey and float keep their values, palette/CMYK/LA/RGBA are converted,
alpha dropped. Oracles are computed here from the arrays the files were made from."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from nnsim_hooks.integrations import DataConfig, load_dataset

MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.2, 0.1)
RGB = DataConfig(channels=3, spatial_dims=2, mean=MEAN, std=STD)
GREY = DataConfig(channels=1, spatial_dims=2, mean=(0.5,), std=(0.25,))


def normalised(values01: np.ndarray, mean, std) -> torch.Tensor:
    """[H, W, C] or [H, W] in [0, 1] -> the normalised [C, H, W] tensor, by hand."""
    a = values01[..., None] if values01.ndim == 2 else values01
    a = a.transpose(2, 0, 1).astype(np.float64)
    m = np.asarray(mean, np.float64)[:, None, None]
    s = np.asarray(std, np.float64)[:, None, None]
    return torch.from_numpy((a - m) / s).float()


def one_image_folder(tmp_path, image: Image.Image, name: str = "x.png") -> str:
    (tmp_path / "c").mkdir(parents=True)
    image.save(tmp_path / "c" / name)
    return str(tmp_path)


def ramp(dtype, top: float) -> np.ndarray:
    """A 16 x 32 ramp over the whole range [0, top], every value distinct."""
    return np.linspace(0, top, 16 * 32).reshape(16, 32).astype(dtype)


def test_16_bit_grey_png_keeps_its_full_range(tmp_path):
    array = ramp(np.uint16, 65535)
    root = one_image_folder(tmp_path, Image.fromarray(array))
    assert Image.open(f"{root}/c/x.png").mode == "I;16"
    x, _ = load_dataset(root, GREY)[0]
    assert torch.allclose(x, normalised(array / 65535.0, GREY.mean, GREY.std), atol=1e-5)
    assert len(torch.unique(x)) == 16 * 32  # not a constant (clipped to 8 bits) image
    x3, _ = load_dataset(root, RGB)[0]  # a 3-channel model gets the grey value three times
    assert torch.allclose(x3, normalised(np.repeat((array / 65535.0)[..., None], 3, -1), MEAN, STD), atol=1e-5)


def test_16_bit_big_endian_tiff_and_resize_keep_the_range(tmp_path):
    array = ramp(np.uint16, 65535)
    root = one_image_folder(tmp_path, Image.frombytes("I;16B", (32, 16), array.astype(">u2").tobytes()), "x.tif")
    assert Image.open(f"{root}/c/x.tif").mode == "I;16B"
    x, _ = load_dataset(root, GREY)[0]
    assert torch.allclose(x, normalised(array / 65535.0, GREY.mean, GREY.std), atol=1e-5)
    # resized in float: values spread over the range, close to a float resize of the same ramp
    small, _ = load_dataset(root, DataConfig(channels=1, spatial_size=(8, 16), mean=(0.0,), std=(1.0,)))[0]
    expected = torch.nn.functional.interpolate(torch.from_numpy(array / 65535.0)[None, None].float(), size=(8, 16),
                                               mode="bilinear", antialias=True, align_corners=False)[0]
    assert small.shape == (1, 8, 16) and len(torch.unique(small)) > 100
    assert torch.allclose(small, expected, atol=0.02)


def test_32_bit_integer_and_float_tiffs(tmp_path):
    ints = ramp(np.int64, 2 ** 31 - 1).astype(np.int32)
    root = one_image_folder(tmp_path / "i", Image.fromarray(ints), "x.tif")
    assert Image.open(f"{root}/c/x.tif").mode == "I"
    x, _ = load_dataset(root, GREY)[0]
    assert torch.allclose(x, normalised(ints / (2 ** 31 - 1), GREY.mean, GREY.std), atol=1e-5)
    floats = ramp(np.float32, 1.0)
    root = one_image_folder(tmp_path / "f", Image.fromarray(floats), "x.tif")
    assert Image.open(f"{root}/c/x.tif").mode == "F"
    x, _ = load_dataset(root, GREY)[0]
    assert torch.allclose(x, normalised(floats, GREY.mean, GREY.std), atol=1e-5)  # as they are


def test_palette_with_transparency_gives_its_colours(tmp_path):
    palette = np.random.default_rng(0).integers(0, 256, (256, 3)).astype(np.uint8)
    indices = (np.arange(16 * 32).reshape(16, 32) % 256).astype(np.uint8)
    image = Image.frombytes("P", (32, 16), indices.tobytes())
    image.putpalette(palette.ravel().tolist())
    image.info["transparency"] = 7
    root = one_image_folder(tmp_path, image)
    opened = Image.open(f"{root}/c/x.png")
    assert opened.mode == "P" and "transparency" in opened.info
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL warns when such a palette goes straight to RGB
        x, _ = load_dataset(root, RGB)[0]
    assert torch.allclose(x, normalised(palette[indices] / 255.0, MEAN, STD), atol=1e-5)


def test_rgba_and_la_drop_alpha(tmp_path):
    rng = np.random.default_rng(1)
    rgba = rng.integers(0, 256, (16, 32, 4)).astype(np.uint8)
    rgba[:4, :, 3] = 0  # fully transparent rows keep their colour: alpha is dropped
    root = one_image_folder(tmp_path / "rgba", Image.fromarray(rgba))
    x, _ = load_dataset(root, RGB)[0]
    assert torch.allclose(x, normalised(rgba[..., :3] / 255.0, MEAN, STD), atol=1e-5)
    la = rng.integers(0, 256, (16, 32, 2)).astype(np.uint8)
    root = one_image_folder(tmp_path / "la", Image.frombytes("LA", (32, 16), la.tobytes()))
    assert Image.open(f"{root}/c/x.png").mode == "LA"
    x, _ = load_dataset(root, GREY)[0]
    assert torch.allclose(x, normalised(la[..., 0] / 255.0, GREY.mean, GREY.std), atol=1e-5)
    x3, _ = load_dataset(root, RGB)[0]
    assert torch.allclose(x3, normalised(np.repeat(la[..., :1], 3, -1) / 255.0, MEAN, STD), atol=1e-5)


def test_cmyk_becomes_rgb(tmp_path):
    cmyk = np.random.default_rng(2).integers(0, 256, (16, 32, 4)).astype(np.uint8)
    root = one_image_folder(tmp_path, Image.frombytes("CMYK", (32, 16), cmyk.tobytes()), "x.tif")
    assert Image.open(f"{root}/c/x.tif").mode == "CMYK"
    x, _ = load_dataset(root, RGB)[0]
    c = cmyk / 255.0
    rgb = (1 - c[..., :3]) * (1 - c[..., 3:])  # the usual naive conversion
    assert torch.allclose(x, normalised(rgb, MEAN, STD), atol=1.01 / 255 / min(STD))


@pytest.mark.parametrize("mode", ["I;16", "RGBA", "P", "CMYK", "LA"])
def test_thumbnails_of_every_mode(tmp_path, mode):
    rng = np.random.default_rng(3)
    if mode == "I;16":
        image = Image.fromarray(ramp(np.uint16, 65535))
    else:
        image = Image.fromarray(rng.integers(0, 256, (16, 32, 3)).astype(np.uint8)).convert(mode)
    root = one_image_folder(tmp_path, image, "x.tif" if mode == "CMYK" else "x.png")
    thumb = load_dataset(root, RGB).thumbnail(0, size=16)
    assert thumb.dtype == np.uint8 and thumb.shape[:2] == (8, 16) and len(np.unique(thumb)) > 8


def test_scale_intensity_is_min_max_per_image_for_8_and_16_bit(tmp_path):
    """intensity="scale" (MONAI models) means min-max per sample, for 2-D images as for volumes."""
    scale = DataConfig(channels=1, spatial_dims=2, intensity="scale")
    for bits, dtype, low, high in ((8, np.uint8, 50, 150), (16, np.uint16, 1000, 40000)):
        array = np.linspace(low, high, 16 * 32).reshape(16, 32).astype(dtype)
        root = one_image_folder(tmp_path / str(bits), Image.fromarray(array))
        x, _ = load_dataset(root, scale)[0]
        expected = (array.astype(np.float64) - array.min()) / (array.max() - array.min())
        assert torch.allclose(x[0], torch.from_numpy(expected).float(), atol=1e-5), bits
    constant = one_image_folder(tmp_path / "flat", Image.fromarray(np.full((4, 4), 9, np.uint8)))
    assert torch.equal(load_dataset(constant, scale)[0][0], torch.zeros(1, 4, 4))


def test_reports_draw_16_bit_images_stretched_not_clipped(tmp_path):
    from nnsim_hooks.audit.thumbnails import raw_sample, to_image

    root = one_image_folder(tmp_path, Image.fromarray(ramp(np.uint16, 65535)))
    data = load_dataset(root, GREY)
    picture = to_image(raw_sample(data, 0))  # what the audit report draws
    assert picture.dtype == np.uint8 and picture.shape == (16, 32)
    assert len(np.unique(picture)) > 200  # clipped to 8 bits it would be almost all white
