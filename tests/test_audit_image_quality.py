"""The image-quality check (cleanvision on the files): planted defects are flagged by
name, clean files are not, and data it cannot check get NaN columns and a reason."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.utils.data import TensorDataset

import nnsim_hooks
from nnsim_hooks.audit import Thresholds
from nnsim_hooks.audit.checks import image_quality
from nnsim_hooks.audit.checks.image_quality import ISSUES, column_name
from nnsim_hooks.integrations.synthetic import make_image_folder

COLUMNS = [column_name(issue) for issue, _ in ISSUES]


def _tiny_cnn(classes=2):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                         nn.Linear(16, classes))


def _defective_folder(root):
    """A clean ImageFolder plus three planted defects: a near-black image, a tiny
    odd-sized copy and a grey copy. Returns {defect: file name}."""
    from PIL import Image

    paths = make_image_folder(str(root), per_class=10, size=(48, 48))
    source = Image.open(paths[3]).convert("RGB")
    Image.fromarray(np.full((48, 48, 3), 3, np.uint8)).save(root / "square" / "zz_dark.png")
    source.resize((8, 8)).save(root / "square" / "zz_tiny.png")
    source.convert("L").save(root / "circle" / "zz_grey.png")
    return {"dark": "zz_dark.png", "odd_size": "zz_tiny.png", "grayscale": "zz_grey.png"}


@pytest.fixture(scope="module")
def quality_audit(tmp_path_factory):
    pytest.importorskip("cleanvision")
    from nnsim_hooks.integrations import DataConfig, load_dataset

    root = tmp_path_factory.mktemp("quality") / "data"
    planted = _defective_folder(root)
    dataset = load_dataset(str(root), DataConfig(mean=None, std=None, spatial_size=(24, 24)))
    result = nnsim_hooks.audit(_tiny_cnn(), dataset, progress=False, k=4, output="contrast", sketch_dim=32)
    return planted, result


@pytest.mark.slow
def test_planted_defects_are_flagged_by_file_and_clean_files_are_not(quality_audit):
    planted, result = quality_audit
    t = result.table
    names = t["path"].map(lambda p: os.path.basename(str(p)))
    for issue, name in planted.items():
        flagged = set(names[t[column_name(issue)] == 1.0])
        assert name in flagged, (issue, flagged)
    # the near-black image is also low on information; nothing else is flagged at all
    defects = set(planted.values())
    clean = ~names.isin(defects)
    assert (t.loc[clean, COLUMNS] == 0.0).all().all(), t.loc[clean & (t[COLUMNS] == 1.0).any(axis=1), "path"]
    assert t[COLUMNS].notna().all().all()
    state = result.summary["image_quality"]
    assert state["checked"] and state["images_checked"] == len(t)
    assert state["images_flagged"] == len(defects)
    # oracle for the counts: the columns themselves
    assert state["counts"] == {issue: int((t[column_name(issue)] == 1.0).sum()) for issue, _ in ISSUES}


@pytest.mark.slow
def test_the_report_shows_the_flagged_files(quality_audit):
    planted, result = quality_audit
    html = result.report_html()
    assert "<h2>Image quality</h2>" in html
    for name in planted.values():
        assert name in html
    assert "images flagged for quality" in html


def _tensor_audit(**options):
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(12, 3, 8, 8), torch.arange(12) % 2)
    return nnsim_hooks.audit(_tiny_cnn(), data, progress=False, k=3, output="contrast", sketch_dim=16, **options)


def test_tensors_get_nan_columns_and_a_reason():
    result = _tensor_audit()
    assert result.table[COLUMNS].isna().all().all()
    state = result.summary["image_quality"]
    assert not state["checked"]
    # without cleanvision the reason is the install hint, with it: not files
    assert "not files" in state["reason"] or "not installed" in state["reason"]
    html = result.report_html()
    assert "image quality not checked" in html


def test_missing_library_says_how_to_install(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_cleanvision(name, *args, **kwargs):
        if name == "cleanvision" or name.startswith("cleanvision."):
            raise ImportError("No module named 'cleanvision'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_cleanvision)
    result = _tensor_audit()
    state = result.summary["image_quality"]
    assert not state["checked"] and "cleanvision is not installed" in state["reason"]
    assert "nnsim_hooks[quality]" in state["reason"]
    assert any("image quality     not checked: cleanvision is not installed" in line
               for line in image_quality.CHECK.summary_lines(result.summary))


def test_turned_off_by_the_threshold():
    result = _tensor_audit(thresholds=Thresholds(image_quality=0))
    assert result.summary["image_quality"]["reason"].startswith("turned off")
    assert result.table[COLUMNS].isna().all().all()


def test_volumes_and_other_files_are_not_sent_to_cleanvision(tmp_path):
    class Files(torch.utils.data.Dataset):
        paths = [str(tmp_path / f"v{i}.nii.gz") for i in range(3)]

        def __len__(self):
            return 3

    files, why = image_files(Files(), np.arange(3))
    assert files is None and "not image files" in why and "v0.nii.gz" in why


from nnsim_hooks.audit.checks.image_quality import image_files  # noqa: E402


def test_the_cli_flag_turns_it_off():
    from nnsim_hooks.cli.commands import _thresholds, build_parser

    args = build_parser().parse_args(["audit", "--no-image-quality"])
    assert _thresholds(None, args) == {"image_quality": 0.0}
    assert _thresholds(None, build_parser().parse_args(["audit"])) is None
