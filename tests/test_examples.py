"""The example scripts run end to end on the data they generate (tiny settings)."""

import importlib.util
import json
import os

import pytest

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")

pytestmark = pytest.mark.slow  # each example runs end to end (a training, an audit)


def _load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(EXAMPLES, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _report(out: str) -> str:
    line = [x for x in out.splitlines() if x.startswith("{")][-1]
    return json.loads(line)["report"]


def test_timm_imagefolder_example(tmp_path, capsys):
    pytest.importorskip("timm")
    example = _load("timm_imagefolder_audit")
    assert example.main(["--out", str(tmp_path / "timm"), "--per-class", "6", "--epochs", "1"]) == 0
    out = capsys.readouterr().out
    assert "planted label errors flagged" in out
    assert os.path.getsize(_report(out)) > 10_000


def test_monai_nifti_example(tmp_path, capsys):
    pytest.importorskip("monai")
    pytest.importorskip("nibabel")
    example = _load("monai_nifti_audit")
    root = tmp_path / "monai"
    assert example.main(["--out", str(root), "--per-class", "5", "--epochs", "1"]) == 0
    assert "datalist audit: 10 volumes" in capsys.readouterr().out
    for audit in ("audit-folder", "audit-datalist"):
        assert (root / audit / "report.html").stat().st_size > 10_000
        assert (root / audit / "table.csv").is_file()


def test_train_with_similarity_example(capsys):
    example = _load("train_with_similarity")
    assert example.main(["--steps", "6", "--batch-size", "8", "--pairs", "2"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0 <= result["validation_accuracy"] <= 1 and -1 <= result["mean_same_class_similarity"] <= 1
