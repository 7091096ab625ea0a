"""Small generated datasets in the real layouts, for examples, tests and trying things out
where nothing can be downloaded.

- :func:`make_image_folder`: ``root/<class>/<i>.png``, classes told apart by colour and
  a shape, with optional exact duplicates;
- :func:`make_nifti_datalist`: NIfTI volumes (through nibabel) with a bright blob
  whose position depends on the class, and a MONAI datalist JSON listing them;
- :func:`make_nifti_folder`: the same volumes in ImageFolder layout;
- :func:`make_bundle`: a MONAI bundle folder (``configs/inference.json``,
  ``configs/metadata.json``, ``models/model.pt``) around a small network.
"""

from __future__ import annotations

import io
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from nnsim_hooks.atomic import write_bytes_atomic, write_json_atomic
from nnsim_hooks.optional import require
from nnsim_hooks.safe_files import make_folder


def _write_json(path: str, content: Any) -> None:
    write_json_atomic(path, content)


def _write_bytes(path: str, data: bytes) -> None:
    """Every file goes through nnsim_hooks.safe_files: atomic, never through a link."""
    write_bytes_atomic(path, data)


def _nifti_bytes(volume: np.ndarray, affine: np.ndarray) -> bytes:
    """A ``.nii.gz`` file's bytes (nibabel writes a path itself; we write the bytes)."""
    import gzip

    import nibabel as nib

    return gzip.compress(nib.Nifti1Image(volume, affine).to_bytes(), mtime=0)


def make_image_folder(
    root: str,
    classes: Sequence[str] = ("circle", "square"),
    per_class: int = 6,
    size: Tuple[int, int] = (40, 48),
    seed: int = 0,
    duplicates: int = 0,
    grey: bool = False,
) -> List[str]:
    """Write an ImageFolder of PNGs: class k has a filled disc (k even) or square (k odd)
    of a class colour on noise. ``duplicates`` copies the first image of class 0 that
    many times. Returns the written paths."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[:h, :w]
    paths = []
    for k, name in enumerate(classes):
        folder = os.path.join(root, name)
        make_folder(folder, own=False)
        colour = np.array([(70 * k + 60) % 256, (130 * k + 200) % 256, (40 * k + 100) % 256], dtype=np.float64)
        for i in range(per_class):
            image = rng.normal(40, 20, (h, w, 3))
            cy, cx = rng.integers(h // 4, 3 * h // 4), rng.integers(w // 4, 3 * w // 4)
            r = rng.integers(min(h, w) // 6, min(h, w) // 3)
            inside = ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r) if k % 2 == 0 else (
                (abs(yy - cy) <= r) & (abs(xx - cx) <= r))
            image[inside] = colour + rng.normal(0, 10, 3)
            array = np.clip(image, 0, 255).astype(np.uint8)
            pil = Image.fromarray(array).convert("L") if grey else Image.fromarray(array)
            path = os.path.join(folder, f"{name}_{i:03d}.png")
            buf = io.BytesIO()
            pil.save(buf, format="PNG")
            _write_bytes(path, buf.getvalue())
            paths.append(path)
    for j in range(duplicates):
        source = paths[0]
        target = os.path.join(os.path.dirname(source), f"duplicate_{j:03d}.png")
        with open(source, "rb") as src:
            _write_bytes(target, src.read())
        paths.append(target)
    return paths


def _blob_volume(rng, grid, shape, label: int, classes: int) -> Tuple[np.ndarray, np.ndarray]:
    centre = np.array(shape, dtype=np.float64) * (0.3 + 0.4 * label / max(1, classes - 1))
    centre += rng.normal(0, 1.0, 3)
    blob = np.exp(-((grid - centre) ** 2).sum(-1) / (2 * 3.0 ** 2))
    return (100 * blob + rng.normal(0, 5, shape)).astype(np.float32), blob


def make_nifti_folder(
    root: str,
    per_class: int = 4,
    shape: Tuple[int, int, int] = (20, 24, 16),
    classes: Sequence[str] = ("left", "right"),
    seed: int = 0,
) -> List[str]:
    """Write NIfTI volumes in ImageFolder layout, ``root/<class>/case_XXX.nii.gz`` (the
    blob of :func:`make_nifti_datalist`). Returns the written paths."""
    require("nibabel", "writing NIfTI volumes")

    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), axis=-1).astype(np.float64)
    paths = []
    for label, name in enumerate(classes):
        make_folder(os.path.join(root, name), own=False)
        for i in range(per_class):
            volume, _ = _blob_volume(rng, grid, shape, label, len(classes))
            path = os.path.join(root, name, f"case_{i:03d}.nii.gz")
            _write_bytes(path, _nifti_bytes(volume, np.diag([1.5, 1.5, 2.0, 1.0])))
            paths.append(path)
    return paths


def make_nifti_datalist(
    root: str,
    n: int = 8,
    shape: Tuple[int, int, int] = (20, 24, 16),
    classes: int = 2,
    seed: int = 0,
    with_masks: bool = False,
    name: str = "datalist.json",
) -> str:
    """Write ``n`` NIfTI volumes ``root/volumes/case_XXX.nii.gz`` (a Gaussian blob whose
    position encodes the class, on noise) and ``root/<name>``, a MONAI datalist
    ``{"training": [{"image": ..., "label": k}]}`` with paths relative to ``root``.
    ``with_masks`` adds ``"mask"`` entries with the blob's segmentation."""
    require("nibabel", "writing NIfTI volumes")

    rng = np.random.default_rng(seed)
    folder = os.path.join(root, "volumes")
    make_folder(folder, own=False)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), axis=-1).astype(np.float64)
    items: List[Dict[str, Any]] = []
    affine = np.diag([1.5, 1.5, 2.0, 1.0])
    for i in range(n):
        label = i % classes
        volume, blob = _blob_volume(rng, grid, shape, label, classes)
        image = os.path.join("volumes", f"case_{i:03d}.nii.gz")
        _write_bytes(os.path.join(root, image), _nifti_bytes(volume, affine))
        item: Dict[str, Any] = {"image": image, "label": label}
        if with_masks:
            mask = os.path.join("volumes", f"case_{i:03d}_mask.nii.gz")
            _write_bytes(os.path.join(root, mask), _nifti_bytes((blob > 0.5).astype(np.uint8), affine))
            item["mask"] = mask
        items.append(item)
    path = os.path.join(root, name)
    _write_json(path, {"training": items})
    return path


def make_bundle(
    root: str,
    network_def: Optional[Dict[str, Any]] = None,
    input_channels: int = 1,
    spatial_shape: Optional[Sequence[int]] = (16, 16, 16),
    output_format: str = "classification",
    output_channels: int = 2,
    seed: int = 0,
    weights: bool = True,
) -> str:
    """Write a MONAI bundle folder at ``root``: ``configs/inference.json`` with
    ``network_def`` (default: a small 3-D DenseNet121), ``configs/metadata.json`` with
    the input/output format, and ``models/model.pt`` holding the network's seeded
    random weights (a plain state_dict). Returns ``root``."""
    require("monai", "building MONAI bundles")
    import torch
    from monai.bundle import ConfigParser

    network_def = network_def or {
        "_target_": "DenseNet121", "spatial_dims": 3, "in_channels": input_channels,
        "out_channels": output_channels, "init_features": 8, "growth_rate": 4, "block_config": [1, 1],
    }
    make_folder(os.path.join(root, "configs"), own=False)
    make_folder(os.path.join(root, "models"), own=False)
    inference = {
        "imports": ["$import torch"],
        "bundle_root": ".",
        "network_def": network_def,
        "preprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "LoadImaged", "keys": "image", "image_only": True},
                {"_target_": "EnsureChannelFirstd", "keys": "image"},
                {"_target_": "ScaleIntensityd", "keys": "image"},
                {"_target_": "Resized", "keys": "image", "spatial_size": list(spatial_shape)},
                {"_target_": "EnsureTyped", "keys": "image", "track_meta": False},
            ],
        } if spatial_shape else None,
    }
    if inference["preprocessing"] is None:
        del inference["preprocessing"]
    metadata = {
        "version": "0.1.0",
        "task": "generated for nnsim_hooks tests",
        "network_data_format": {
            "inputs": {"image": {"type": "image", "num_channels": input_channels,
                                 "spatial_shape": list(spatial_shape) if spatial_shape else ["16*n"] * 3}},
            "outputs": {"pred": {"type": "probabilities" if output_format == "classification" else "image",
                                 "format": output_format, "num_channels": output_channels}},
        },
    }
    _write_json(os.path.join(root, "configs", "inference.json"), inference)
    _write_json(os.path.join(root, "configs", "metadata.json"), metadata)
    if weights:
        torch.manual_seed(seed)
        parser = ConfigParser({"network_def": network_def})
        net = parser.get_parsed_content("network_def")
        buf = io.BytesIO()
        torch.save(net.state_dict(), buf)
        _write_bytes(os.path.join(root, "models", "model.pt"), buf.getvalue())
    return root


def make_shapes(n: int = 305, size: int = 64, noisy: int = 30, duplicates: int = 5, seed: int = 0) -> Dict[str, Any]:
    """Circles, squares and triangles (classes 0, 1, 2) of random colour, size and position
    on a noisy background of random brightness, with ``noisy`` labels flipped to another
    class and the last ``duplicates`` images exact copies of the first ones (label
    included). Returns ``images`` (uint8 ``[n, size, size, 3]``), ``labels`` (given),
    ``true_labels``, ``flipped`` (bool) and ``classes``."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    images = np.zeros((n, size, size, 3), dtype=np.uint8)
    true = np.zeros(n, dtype=np.int64)
    originals = n - duplicates
    for i in range(originals):
        c = i % 3
        true[i] = c
        image = rng.normal(rng.uniform(20, 120), 25, (size, size, 3))
        cy, cx = rng.integers(size // 4, 3 * size // 4, 2)
        r = rng.integers(size // 8, size // 4)
        if c == 0:
            inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        elif c == 1:
            inside = (abs(yy - cy) <= r) & (abs(xx - cx) <= r)
        else:
            inside = (yy - cy + r >= 0) & (yy - cy <= r) & (abs(xx - cx) <= (yy - cy + r) / 2)
        image[inside] = rng.uniform(0, 255, 3)
        images[i] = np.clip(image, 0, 255).astype(np.uint8)
    images[originals:] = images[:duplicates]
    true[originals:] = true[:duplicates]
    given = true.copy()
    flip = rng.choice(originals - duplicates, noisy, replace=False) + duplicates  # never an original of a duplicate
    given[flip] = (true[flip] + rng.integers(1, 3, noisy)) % 3
    return {"images": images, "labels": given, "true_labels": true, "flipped": given != true,
            "classes": ["circle", "square", "triangle"]}


def make_shapes_folder(root: str, **options) -> Dict[str, Any]:
    """:func:`make_shapes` written as an ImageFolder of PNGs under their *given* labels
    (``root/<class>/shape_<i>.png``); returns the same dict plus ``paths``."""
    from PIL import Image

    shapes = make_shapes(**options)
    paths = []
    for i, (image, label) in enumerate(zip(shapes["images"], shapes["labels"])):
        folder = os.path.join(root, shapes["classes"][label])
        make_folder(folder)
        path = os.path.join(folder, f"shape_{i:04d}.png")
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="PNG")
        _write_bytes(path, buf.getvalue())
        paths.append(path)
    shapes["paths"] = paths
    return shapes
