"""Paths and class names in every output of the audit (issue 20, item 5): the table, the
listings, the saved folder and the report name each sample by its file and each class
by its name, beside the numbers."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn
from torch.utils.data import Subset, TensorDataset

import nnsim_hooks
from nnsim_hooks.audit import AuditResult
from nnsim_hooks.audit.sample_names import relative_paths
from nnsim_hooks.errors import InputError

CLASSES = ("circle", "square", "triangle")


def _tiny_cnn(classes=3, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                         nn.Linear(16, classes))


def _image_folder(root, per_class=6, size=12, seed=0):
    """``root/<class>/<class>_<i>.png``: random pictures, a few per class."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c, name in enumerate(CLASSES):
        os.makedirs(root / name, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            pixels[..., c] = 255  # a class colour, so that the classes differ a little
            Image.fromarray(pixels).save(root / name / f"{name}_{i}.png")
    return root


@pytest.fixture(scope="module")
def folder_audit(tmp_path_factory):
    from nnsim_hooks.integrations import DataConfig, load_dataset

    root = _image_folder(tmp_path_factory.mktemp("shapes") / "data")
    dataset = load_dataset(str(root), DataConfig(mean=None, std=None))
    result = nnsim_hooks.audit(_tiny_cnn(), dataset, progress=False, k=4, output="contrast", sketch_dim=64)
    return root, dataset, result


def test_every_row_carries_its_file_relative_to_the_data_root(folder_audit):
    root, _, result = folder_audit
    # oracle: the files on disk, listed independently, in ImageFolder order (class, then name)
    expected = [f"{c}/{f}" for c in sorted(os.listdir(root)) for f in sorted(os.listdir(root / c))]
    assert result.table["path"].tolist() == expected


def test_class_names_sit_beside_every_class_column(folder_audit):
    _, _, result = folder_audit
    t = result.table
    columns = list(t.columns)
    for column in ("label", "prediction", "suggested_label"):
        assert columns.index(column + "_name") == columns.index(column) + 1
    # oracle: in an ImageFolder the class is the file's folder
    assert t["label_name"].tolist() == [p.split("/")[0] for p in t["path"]]
    for column in ("prediction", "suggested_label"):
        known = t[column].notna()
        assert known.any()
        assert t.loc[known, column + "_name"].tolist() == [CLASSES[int(c)] for c in t.loc[known, column]]
        assert t.loc[~known, column + "_name"].isna().all()


def test_listings_carry_paths_and_names(folder_audit):
    _, _, result = folder_audit
    for listing in (result.label_issues(), result.duplicates(), result.outliers()):
        for column in ("path", "label_name", "prediction_name", "suggested_label_name"):
            assert column in listing.columns


@pytest.mark.slow
def test_saved_folder_keeps_paths_and_names(folder_audit, tmp_path):
    _, _, result = folder_audit
    out = result.save(tmp_path / "audit")
    csv = pd.read_csv(out / "table.csv", index_col="sample")
    assert csv["path"].tolist() == result.table["path"].tolist()
    assert csv["suggested_label_name"].tolist() == result.table["suggested_label_name"].astype(object).tolist()
    loaded = AuditResult.load(out)
    assert loaded.table["path"].tolist() == result.table["path"].tolist()
    assert loaded.table["label_name"].tolist() == result.table["label_name"].tolist()
    assert loaded.class_names == list(CLASSES)
    (out / "table.parquet").unlink()  # the CSV alone gives them back too
    assert AuditResult.load(out).table["path"].tolist() == result.table["path"].tolist()


def test_the_report_names_the_files(folder_audit):
    _, dataset, result = folder_audit
    html = result.report_html()
    shown = result.table.sort_values("knn_similarity").dropna(subset=["knn_similarity"]).head(3)
    for path in shown["path"]:
        assert f">{os.path.basename(path)}</span>" in html  # the rarest samples' gallery
        assert f'title="{path}"' in html
    assert "circle" in html and "triangle" in html


def test_a_subset_keeps_its_files(folder_audit):
    root, dataset, _ = folder_audit
    picked = [1, 7, 8, 15, 16, 17]
    result = nnsim_hooks.audit(_tiny_cnn(), Subset(dataset, picked), progress=False, k=3, output="contrast",
                               sketch_dim=32)
    assert result.table["path"].tolist() == [relative_paths([dataset.paths[i]], str(root))[0] for i in picked]
    assert result.table["label_name"].tolist() == [CLASSES[dataset.labels[i]] for i in picked]


def test_torchvision_image_folder(folder_audit):
    from torchvision.datasets import ImageFolder
    from torchvision.transforms import ToTensor

    root, _, reference = folder_audit
    dataset = ImageFolder(str(root), transform=ToTensor())
    result = nnsim_hooks.audit(_tiny_cnn(), dataset, progress=False, k=4, output="contrast", sketch_dim=32)
    assert result.table["path"].tolist() == reference.table["path"].tolist()
    assert result.table["label_name"].tolist() == reference.table["label_name"].tolist()


def _tensor_data(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g))


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def test_datasets_without_files_are_named_by_position():
    data = _tensor_data()
    result = nnsim_hooks.audit(_mlp(), data, progress=False, k=4)
    t = result.table
    assert t["path"].isna().all()
    assert t.index.tolist() == list(range(len(data)))  # the sample column names every row
    # no class names: each class is named by its index
    assert t["label_name"].tolist() == [str(int(v)) for v in data.tensors[1]]
    assert "#0" in result.report_html() or len(result.label_issues()) == 0


@pytest.mark.slow
def test_names_that_look_like_numbers_stay_text_after_a_csv_reload(tmp_path):
    result = nnsim_hooks.audit(_mlp(), _tensor_data(), progress=False, k=4, out_dir=tmp_path / "a")
    (tmp_path / "a" / "table.parquet").unlink()
    loaded = AuditResult.load(tmp_path / "a")
    assert loaded.table["label_name"].tolist() == result.table["label_name"].tolist()  # "2", not 2
    assert loaded.table["path"].isna().all()


def test_paths_given_to_the_audit_are_used_as_given():
    data = _tensor_data()
    paths = [f"scans/patient_{i:03d}.png" for i in range(len(data))]
    paths[5] = None  # a sample without a file
    result = nnsim_hooks.audit(_mlp(), data, progress=False, k=4, paths=paths, class_names=["a", "b", "c"])
    assert result.table["path"].tolist()[:5] == paths[:5]
    assert pd.isna(result.table.at[5, "path"])
    assert set(result.table["label_name"]) <= {"a", "b", "c"}


@pytest.mark.parametrize("paths, words", [
    (["a.png"] * 3, "3 entries but the dataset 24"),
    ("one.png", "single path 'one.png'"),
    ([f"{i}.png" for i in range(23)] + [3.5], "paths[23] is 3.5"),
])
def test_bad_paths_are_refused_with_the_value(paths, words):
    with pytest.raises(InputError, match=words.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
        nnsim_hooks.audit(_mlp(), _tensor_data(), progress=False, k=4, paths=paths)


def test_repeated_class_names_are_refused():
    with pytest.raises(InputError, match=r"\['b'\] appear more than once"):
        nnsim_hooks.audit(_mlp(), _tensor_data(), progress=False, k=4, class_names=["a", "b", "b"])


def test_relative_paths_keep_paths_outside_the_root(tmp_path):
    inside = str(tmp_path / "data" / "x" / "a.png")
    outside = str(tmp_path / "elsewhere" / "b.png")
    assert relative_paths([inside, outside], str(tmp_path / "data")) == ["x/a.png", outside.replace(os.sep, "/")]
    assert relative_paths([inside], None) == [inside.replace(os.sep, "/")]
