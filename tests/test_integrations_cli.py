"""The two command-line paths of issue 5 on generated data: a timm classifier over an
ImageFolder of PNGs, and a MONAI 3-D network over NIfTI volumes; plus a MONAI datalist
through the Python API."""

from __future__ import annotations

import json

import pytest
import torch

from nnsim_hooks.cli import commands as cli
from nnsim_hooks.integrations import load_dataset, load_model
from nnsim_hooks.integrations.synthetic import make_image_folder, make_nifti_datalist, make_nifti_folder

TINY_DENSENET = {"spatial_dims": 3, "in_channels": 1, "init_features": 4, "growth_rate": 2, "block_config": [1, 1]}
FAST = ["--no-progress", "--k", "3", "--sketch-dim", "64", "--batch-size", "8"]


def nnsim(*args):
    return cli.main(["audit", *map(str, args)])


@pytest.mark.slow
def test_cli_timm_classifier_over_an_image_folder(tmp_path, capsys):
    pytest.importorskip("timm")
    data = tmp_path / "images"
    make_image_folder(str(data), classes=("circle", "square"), per_class=6, size=(24, 24), duplicates=1)
    out = tmp_path / "audit"
    code = nnsim("--data", data, "--model", "timm:test_resnet",
                 "--num-classes", 2, "--out", out, *FAST)
    assert code == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "13 samples, 2 classes" in printed and "Report:" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["samples"] == 13
    report = (out / "report.html").read_text()
    assert "circle" in report and "square" in report and "data:image/png;base64" in report


def test_cli_timm_checkpoint_mismatch_names_keys(tmp_path, capsys):
    pytest.importorskip("timm")
    data = tmp_path / "images"
    make_image_folder(str(data), per_class=2, size=(16, 16))
    state = load_model("timm:test_resnet", num_classes=5).model.state_dict()
    torch.save(state, tmp_path / "five.pt")
    code = nnsim("--data", data, "--model", "timm:test_resnet", "--num-classes", 2,
                 "--checkpoint", tmp_path / "five.pt", "--out", tmp_path / "audit", *FAST)
    assert code == 1
    err = capsys.readouterr().err
    assert "fc.weight (checkpoint (5, 256), model (2, 256))" in err or "fc.weight (checkpoint (5," in err
    assert nnsim("--data", data, "--model", "timm:resnet_18", "--out", tmp_path / "a2", *FAST) == 1
    assert "did you mean" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_monai_3d_network_over_nifti_volumes(tmp_path, capsys):
    pytest.importorskip("monai")
    pytest.importorskip("nibabel")
    data = tmp_path / "volumes"
    make_nifti_folder(str(data), per_class=5, shape=(16, 16, 16))
    out = tmp_path / "audit"
    code = nnsim("--data", data, "--model", "monai:DenseNet121", "--model-kwargs", json.dumps(TINY_DENSENET),
                 "--num-classes", 2, "--out", out, *FAST)
    assert code == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["samples"] == 10
    report = (out / "report.html").read_text()
    assert "left" in report and "data:image/png;base64" in report  # central slices drawn


def test_cli_monai_2d_model_on_3d_volumes_says_so(tmp_path, capsys):
    pytest.importorskip("monai")
    data = tmp_path / "volumes"
    make_nifti_folder(str(data), per_class=1, shape=(8, 8, 8))
    flat = dict(TINY_DENSENET, spatial_dims=2)
    code = nnsim("--data", data, "--model", "monai:DenseNet121", "--model-kwargs", json.dumps(flat),
                 "--num-classes", 2, "--out", tmp_path / "audit", *FAST)
    assert code == 1
    assert "is a 2-D model" in capsys.readouterr().err


@pytest.mark.slow
def test_python_api_monai_datalist(tmp_path):
    pytest.importorskip("monai")
    import nnsim_hooks.audit as audit_module

    datalist = make_nifti_datalist(str(tmp_path / "data"), n=8, shape=(12, 12, 12))
    loaded = load_model("monai:DenseNet121", model_kwargs=TINY_DENSENET, num_classes=2)
    dataset = load_dataset(datalist, loaded)
    result = audit_module.audit(loaded.model, dataset, k=3, sketch_dim=32, batch_size=4, progress=False,
                                out_dir=tmp_path / "audit")
    assert len(result.table) == 8
    assert list(result.table["label"]) == [0, 1] * 4
    assert (tmp_path / "audit" / "report.html").is_file()
