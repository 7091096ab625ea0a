"""``nnsim audit --data`` takes every documented layout (folder, CSV, datalist JSON), skips
and counts unreadable files wherever they sort, and explains bad lists (issue 11, items
5, 7, 8, 9). A tiny CNN from a generated module keeps each run to a few seconds."""

from __future__ import annotations

import json
import os
import textwrap

import numpy as np
import pandas as pd
import pytest

from nnsim_hooks.cli import commands as cli
from nnsim_hooks.integrations.synthetic import make_image_folder

FAST = ["--no-progress", "--k", "3", "--sketch-dim", "32", "--batch-size", "16", "--num-classes", "2"]
MODEL = "nnsim_tiny_cli_net:net"
TINY_NET = '''
    import torch
    from torch import nn

    def net(num_classes=2):
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                             nn.Linear(16, num_classes))

    net.data_config = {"channels": 3, "spatial_size": [16, 16], "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
'''


@pytest.fixture
def tiny_model(tmp_path, monkeypatch):
    (tmp_path / "nnsim_tiny_cli_net.py").write_text(textwrap.dedent(TINY_NET))
    monkeypatch.syspath_prepend(str(tmp_path))


@pytest.fixture
def images(tmp_path):
    """An ImageFolder of 2 x 5 PNGs; returns (root, relative paths, labels)."""
    root = tmp_path / "data" / "images"
    paths = make_image_folder(str(root), classes=("circle", "square"), per_class=5, size=(16, 16))
    rel = [os.path.relpath(p, tmp_path / "data") for p in paths]
    return root, rel, [0] * 5 + [1] * 5


def audit(data, out, *extra):
    return cli.main(["audit", "--data", str(data), "--model", MODEL, "--out", str(out), *FAST, *map(str, extra)])


def table_labels(out):
    return pd.read_csv(out / "table.csv")["label"].tolist()


def corrupt(folder, names):
    for name in names:
        (folder / name).write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")


@pytest.mark.parametrize("layout", ["folder", "csv", "datalist"])
def test_every_documented_layout_goes_through_data(tmp_path, capsys, tiny_model, images, layout):
    root, rel, labels = images
    if layout == "folder":
        data = root
    elif layout == "csv":
        data = tmp_path / "data" / "list.csv"
        data.write_text("path,label\n" + "".join(f"{p},{y}\n" for p, y in zip(rel, labels)))
    else:
        data = tmp_path / "data" / "datalist.json"
        names = ["circle", "square"]
        data.write_text(json.dumps({"training": [{"image": p, "label": names[y]} for p, y in zip(rel, labels)]}))
    out = tmp_path / "audit"
    assert audit(data, out) == 0, capsys.readouterr().err
    assert "10 samples, 2 classes" in capsys.readouterr().out
    assert table_labels(out) == labels
    assert json.loads((out / "summary.json").read_text())["samples"] == 10
    assert (out / "report.html").is_file()


@pytest.mark.slow
def test_mixed_labels_are_refused_unless_classes_are_given(tmp_path, capsys, tiny_model, images):
    _, rel, labels = images
    data = tmp_path / "data" / "list.csv"
    spelled = ["square" if y else "0" for y in labels]  # class 1 by name, class 0 by index
    data.write_text("path,label\n" + "".join(f"{p},{v}\n" for p, v in zip(rel, spelled)))
    assert audit(data, tmp_path / "refused") == 1
    err = capsys.readouterr().err
    assert "labels mix integers (5 rows) and class names (5 rows)" in err and "line 7: 'square'" in err
    assert "--classes" in err and not (tmp_path / "refused" / "table.csv").exists()
    out = tmp_path / "audit"
    assert audit(data, out, "--classes", "circle,square") == 0, capsys.readouterr().err
    assert table_labels(out) == labels
    assert "circle" in (out / "report.html").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("where", ["first", "last"])
def test_unreadable_files_are_skipped_and_counted_wherever_they_sort(tmp_path, capsys, tiny_model, images, where):
    root, _, _ = images
    prefix = "0000" if where == "first" else "zzzz"  # make_image_folder writes circle_000.png...
    corrupt(root / "circle", [f"{prefix}_broken_{i}.png" for i in range(5)])
    out = tmp_path / "audit"
    assert audit(root, out) == 0, capsys.readouterr().err
    assert "unreadable        5 files skipped" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["samples"] == 15 and summary["unreadable"] == 5
    table = pd.read_csv(out / "table.csv")
    broken = slice(0, 5) if where == "first" else slice(5, 10)
    assert not table["readable"][broken].any() and table["readable"].sum() == 10


@pytest.mark.slow
def test_unreadable_rows_first_in_a_csv(tmp_path, capsys, tiny_model, images):
    _, rel, labels = images
    corrupt(tmp_path / "data", [f"broken_{i}.png" for i in range(5)])
    data = tmp_path / "data" / "list.csv"
    rows = [(f"broken_{i}.png", 0) for i in range(5)] + list(zip(rel, labels))
    data.write_text("".join(f"{p},{y}\n" for p, y in rows))  # no header
    out = tmp_path / "audit"
    assert audit(data, out) == 0, capsys.readouterr().err
    assert json.loads((out / "summary.json").read_text())["unreadable"] == 5


def test_bad_data_paths_say_what_is_expected(tmp_path, capsys, tiny_model):
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    assert audit(notes, tmp_path / "a") == 1
    assert "a .txt file is not a data layout" in capsys.readouterr().err
    assert audit(tmp_path / "nothing.csv", tmp_path / "a") == 1
    assert "no such folder or file" in capsys.readouterr().err
    binary = tmp_path / "list.csv"
    binary.write_bytes(np.random.default_rng(0).integers(128, 256, 64, dtype=np.uint8).tobytes())
    assert audit(binary, tmp_path / "a") == 1
    err = capsys.readouterr().err
    assert "list.csv' is not a text CSV" in err and "Traceback" not in err
    assert cli.main(["audit", "--classes", "a,b", "--out", str(tmp_path / "b")]) == 1
    assert "--classes given without --data" in capsys.readouterr().err
    assert audit(notes.parent, tmp_path / "c", "--classes", "a,,b") == 1
    assert "empty class name" in capsys.readouterr().err
