"""``nnsim audit``: the embedded default end to end, existing folders, Ctrl-C and resume,
argument errors, and the seam to the integrations (model and dataset loaders)."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.utils.data import Dataset

from nnsim_hooks.cli import commands as cli
from nnsim_hooks.audit import demo

QUICK = ["--limit", "150", "--epochs", "3", "--no-progress", "--sketch-dim", "128", "--k", "5"]


def nnsim(*args):
    return cli.main(["audit", *map(str, args)])


@pytest.mark.slow
def test_default_run_end_to_end_then_existing_folder(tmp_path, capsys):
    out = tmp_path / "demo"
    assert nnsim("--out", out, *QUICK) == 0
    printed = capsys.readouterr().out
    assert f"Report: {(out / 'report.html').resolve()}" in printed
    assert "network vs true labels" in printed and "network vs noisy training labels" in printed
    assert "predicted agreement with clean labels" in printed
    summary = json.loads((out / "summary.json").read_text())
    extra = summary["extra"]
    assert summary["samples"] == 150 and extra["planted_flips"] == round(0.15 * 150)
    assert 0 <= extra["agreement_with_true_labels"] <= 1
    for name in ("table.csv", "table.parquet", "knn_graph.npz", "index/manifest.json", "demo/model.pt"):
        assert (out / name).is_file(), name

    # a finished audit is refused without --overwrite, and nothing is changed
    before = (out / "report.html").stat().st_mtime_ns
    assert nnsim("--out", out, *QUICK) == 1
    err = capsys.readouterr().err
    assert "already holds a finished audit" in err and "--overwrite" in err
    assert (out / "report.html").stat().st_mtime_ns == before
    # --overwrite replaces it (another configuration is fine then)
    assert nnsim("--out", out, *QUICK, "--overwrite", "--noise", "0.1") == 0
    assert json.loads((out / "summary.json").read_text())["extra"]["planted_flips"] == 15


@pytest.mark.slow
def test_ctrl_c_then_the_same_command_resumes(tmp_path, capsys, monkeypatch):
    out = tmp_path / "resume"
    original = demo.NoisyDigits.dataset
    reads = []

    class Interrupting(Dataset):
        def __init__(self, base, stop_at):
            self.base, self.stop_at = base, stop_at

        def __len__(self):
            return len(self.base)

        def __getitem__(self, i):
            if i == self.stop_at:
                raise KeyboardInterrupt
            reads.append(i)
            return self.base[i]

    monkeypatch.setattr(demo.NoisyDigits, "dataset", lambda self: Interrupting(original(self), 100))
    assert nnsim("--out", out, *QUICK) == 130
    assert "run the same command again to resume" in capsys.readouterr().err
    assert (out / "demo" / "model.pt").is_file()
    stored = json.loads((out / "index" / "manifest.json").read_text())["count"]
    assert stored == 64  # the whole batches before the interruption were kept

    # second run: no retraining (the saved weights are reused), extraction continues
    def no_training(*args, **kwargs):
        raise AssertionError("the resumed run must not train again")

    monkeypatch.setattr(demo, "train", no_training)
    monkeypatch.setattr(demo.NoisyDigits, "dataset", lambda self: Interrupting(original(self), None))
    reads.clear()
    assert nnsim("--out", out, *QUICK) == 0
    assert "Report:" in capsys.readouterr().out
    # the probe reads sample 0, the memory probes the first 8 (warm-up, 1 sample, 8 samples:
    # nnsim_hooks.audit.batch_memory), the resumed index checks the data's first and last
    # samples (its data fingerprint), then extraction starts at the first sample not stored
    # (the report's pictures read a few more samples afterwards)
    memory_probes = [0, 0] + list(range(8))
    assert reads[: 13 + 150 - stored] == [0] + memory_probes + [0, 149] + list(range(stored, 150))
    assert json.loads((out / "nnsim-audit.json").read_text())["state"] == "done"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "timm:resnet18"], "given without --data"),
        (["--data", "."], "--data needs --model"),
        (["--data", "/no/such/folder", "--model", "timm:x"], "no such folder"),
        (["--threshold", "label_issue"], "expected NAME=VALUE"),
        (["--threshold", "label_issue=high"], "is not a number"),
        (["--threshold", "labels=0.5"], "unknown threshold"),
        (["--epochs", "0"], "epochs must be at least 1"),
        (["--noise", "1.5"], "noise must be a fraction"),
    ],
)
def test_argument_errors(tmp_path, capsys, args, message):
    assert nnsim("--out", tmp_path / "x", "--no-progress", *args) == 1
    assert message in capsys.readouterr().err


def test_data_without_integrations_gives_a_clear_error(tmp_path, capsys, monkeypatch):
    import nnsim_hooks.integrations as integrations

    monkeypatch.delattr(integrations, "load_model", raising=False)
    monkeypatch.delattr(integrations, "load_dataset", raising=False)
    (tmp_path / "data" / "a").mkdir(parents=True)
    assert nnsim("--out", tmp_path / "x", "--data", tmp_path / "data", "--model", "timm:resnet18") == 1
    err = capsys.readouterr().err
    assert "nnsim_hooks.integrations.load_model and load_dataset" in err


def test_image_folder_through_the_integrations_seam(tmp_path, capsys, monkeypatch):
    """The CLI calls integrations.load_model(spec, model_kwargs=, checkpoint=, num_classes=)
    and integrations.load_dataset(path, model_info)."""
    from PIL import Image
    from torchvision import transforms
    from torchvision.datasets import ImageFolder

    import nnsim_hooks.integrations as integrations

    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    for c, name in enumerate(["cat", "dog"]):
        (root / name).mkdir(parents=True)
        for i in range(8):
            Image.fromarray((rng.random((8, 8, 3)) * 100 + 100 * c).astype(np.uint8)).save(root / name / f"{i}.png")
    (root / "dog" / "broken.png").write_bytes(b"nope")
    calls = {}

    class Info:
        def __init__(self, model):
            self.model = model

    def load_model(spec, *, model_kwargs=None, checkpoint=None, num_classes=None):
        calls["model"] = (spec, model_kwargs, checkpoint, num_classes)
        torch.manual_seed(0)
        return Info(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, num_classes)))

    def load_dataset(path, info):
        calls["dataset"] = (str(path), info)
        return ImageFolder(str(path), transform=transforms.ToTensor())

    monkeypatch.setattr(integrations, "load_model", load_model, raising=False)
    monkeypatch.setattr(integrations, "load_dataset", load_dataset, raising=False)
    out = tmp_path / "audit"
    code = nnsim("--out", out, "--data", root, "--model", "my.module:net", "--num-classes", 2,
                 "--model-kwargs", '{"width": 4}', "--no-progress", "--k", 3, "--sketch-dim", 64)
    assert code == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert calls["model"] == ("my.module:net", {"width": 4}, None, 2)
    assert calls["dataset"][0] == str(root) and isinstance(calls["dataset"][1], Info)
    assert "unreadable        1 files skipped" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["samples"] == 17 and summary["unreadable"] == 1
    assert "dog" in (out / "report.html").read_text()  # class names from the ImageFolder
    assert nnsim("--out", out, "--data", root, "--model", "my.module:net", "--num-classes", 2, "--no-progress") == 1


@pytest.mark.slow
def test_console_script_entry_point():
    """pyproject declares nnsim = nnsim_hooks.cli:main; the module also runs with -m."""
    import tomllib
    from pathlib import Path

    meta = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert meta["project"]["scripts"]["nnsim"] == "nnsim_hooks.cli:main"
    done = subprocess.run([sys.executable, "-m", "nnsim_hooks.cli", "audit", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and "--overwrite" in done.stdout and "--data" in done.stdout
    assert cli.main([]) == 2


def test_missing_audit_extra_is_named(tmp_path, capsys, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib":
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    assert nnsim("--out", tmp_path / "x", "--no-progress") == 1
    assert "pip install 'nnsim_hooks[audit]'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
