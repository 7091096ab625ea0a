"""The decisions CSV exported by the report, read back by the next audit: its form, how it
names samples (file paths or dataset indices), what it does to the dataset, and the errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

import nnsim_hooks
from nnsim_hooks.audit.decisions import DecidedDataset, _by_suffix, apply_decisions, read_decisions
from nnsim_hooks.errors import InputError


def _csv(tmp_path, *rows, header="path_or_index,decision,new_label"):
    path = tmp_path / "decisions.csv"
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def _tensor_dataset(n=12):
    x = torch.arange(n * 4, dtype=torch.float32).reshape(n, 4)
    return TensorDataset(x, torch.arange(n) % 3)


@pytest.mark.parametrize("rows, message", [
    (["3,delete,"], "line 2: decision 'delete'"),
    (["3,relabel,"], "line 2: 'relabel' of '3' needs a new_label"),
    (["3,remove,2"], "line 2: 'remove' of '3' has a new_label"),
    (["3,keep,", "3,remove,"], "line 3: '3' is decided twice (also on line 2)"),
    ([",keep,"], "line 2: empty path_or_index"),
])
def test_malformed_rows_are_refused_with_the_line(tmp_path, rows, message):
    with pytest.raises(InputError) as err:
        read_decisions(_csv(tmp_path, *rows))
    assert message in str(err.value)


def test_a_wrong_header_is_refused(tmp_path):
    with pytest.raises(InputError, match="expected path_or_index,decision,new_label"):
        read_decisions(_csv(tmp_path, "3,keep,", header="id,action,label"))


def test_removals_and_relabels_by_index(tmp_path):
    ds = _tensor_dataset()
    path = _csv(tmp_path, "1,remove,", "4,relabel,2", "5,keep,", "10,remove,", "7,relabel,0")
    new, labels, record = apply_decisions(ds, path)
    kept = [i for i in range(12) if i not in (1, 10)]  # the oracle: by hand
    expected_labels = {i: i % 3 for i in kept} | {4: 2, 7: 0}
    assert len(new) == len(kept) == record["samples_after"]
    for j, i in enumerate(kept):
        x, y = new[j]
        assert torch.equal(x, ds[i][0]) and int(y) == expected_labels[i]
    assert labels is None
    assert (record["removed"], record["relabelled"], record["kept"]) == (2, 2, 1)
    assert record["removed_samples"] == ["1", "10"]
    assert record["relabels"] == [{"sample": "4", "position": 4, "new_label": 2},
                                  {"sample": "7", "position": 7, "new_label": 0}]


def test_labels_given_to_the_audit_follow_the_decisions(tmp_path):
    ds = _tensor_dataset(6)
    given = np.array([2, 2, 2, 1, 1, 1])
    _, labels, _ = apply_decisions(ds, _csv(tmp_path, "0,remove,", "3,relabel,0"), labels=given)
    assert labels.tolist() == [2, 2, 0, 1, 1]


def test_samples_the_dataset_does_not_hold_are_listed(tmp_path):
    ds = _tensor_dataset(12)
    path = _csv(tmp_path, "3,keep,", "12,remove,", "cat.png,remove,", "99,relabel,1")
    with pytest.raises(InputError) as err:
        apply_decisions(ds, path)
    text = str(err.value)
    assert "3 sample(s) are not in the dataset" in text
    assert "'12'" in text and "'cat.png'" in text and "'99'" in text and "'3'" not in text
    assert "dataset indices (0..11)" in text


def test_relabel_to_an_unknown_class_and_removing_everything_are_refused(tmp_path):
    ds = _tensor_dataset(2)
    with pytest.raises(InputError, match="new_label 'dog' is not a class index or name; the classes are a, b"):
        apply_decisions(ds, _csv(tmp_path, "0,relabel,dog"), class_names=["a", "b"])
    with pytest.raises(InputError, match="new_label 5 is not a class"):
        apply_decisions(ds, _csv(tmp_path, "0,relabel,5"), class_names=["a", "b"])
    with pytest.raises(InputError, match="every one of the 2 samples is removed"):
        apply_decisions(ds, _csv(tmp_path, "0,remove,", "1,remove,"))


def test_image_folder_samples_are_named_by_path(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    from nnsim_hooks.integrations.synthetic import make_image_folder

    root = tmp_path / "images"
    make_image_folder(str(root), classes=("circle", "square"), per_class=4, size=(16, 16))
    ds = torchvision.datasets.ImageFolder(str(root))
    paths = [p for p, _ in ds.samples]
    csv_path = _csv(tmp_path, f"{paths[0]},remove,", f"{paths[1]},relabel,square", "5,keep,")
    new, _, record = apply_decisions(ds, csv_path)
    assert isinstance(new, DecidedDataset)
    assert [p for p, _ in new.samples] == paths[1:]  # still file-backed: paths, loader, classes
    assert new.samples[0][1] == 1 and new.targets[0] == 1 and new[0][1] == 1
    assert new.classes == ["circle", "square"] and new.loader is ds.loader
    assert [y for _, y in new.samples[1:]] == [y for _, y in ds.samples[2:]]
    assert record["removed_samples"] == [paths[0]]
    # a path relative to the data folder names the one file ending with it
    relative = "/".join(paths[5].split("/")[-2:])
    new, _, record = apply_decisions(ds, _csv(tmp_path, f"{relative},remove,"))
    assert record["removed_samples"] == [relative] and [p for p, _ in new.samples] == paths[:5] + paths[6:]
    assert _by_suffix("png", paths) is None  # whole components only
    with pytest.raises(InputError, match="matches 2 files"):
        _by_suffix("x.png", ["/d/a/x.png", "/d/b/x.png"])
    assert _by_suffix("b/x.png", ["/d/a/x.png", "/d/b/x.png"]) == 1
    # the same sample named by its path and by its index is one sample decided twice
    with pytest.raises(InputError, match="name the same sample"):
        apply_decisions(ds, _csv(tmp_path, f"{paths[2]},remove,", "2,keep,"))


@pytest.mark.slow
def test_audit_applies_the_decisions_and_records_them(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(30, 5)
    y = torch.arange(30) % 3
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    path = _csv(tmp_path, "0,remove,", "2,remove,", "4,relabel,0", "6,keep,")
    result = nnsim_hooks.audit(model, TensorDataset(x, y), decisions=path, progress=False, sketch_dim=32, k=3,
                               out_dir=tmp_path / "audit")
    assert result.summary["samples"] == 28
    assert result.table["label"].tolist() == [1, 0, 0, 2, 0] + [v % 3 for v in range(7, 30)]  # 4 relabelled 0
    saved = json.loads((tmp_path / "audit" / "summary.json").read_text())
    assert saved["decisions"]["removed"] == 2 and saved["decisions"]["relabelled"] == 1
    assert saved["decisions"]["file"] == str(path)


def _image_folder_cli(tmp_path):
    pytest.importorskip("timm")
    from nnsim_hooks.integrations.synthetic import make_image_folder

    data = tmp_path / "images"
    make_image_folder(str(data), classes=("circle", "square"), per_class=5, size=(24, 24))
    fast = ["--no-progress", "--k", "3", "--sketch-dim", "64", "--batch-size", "8", "--model", "timm:test_resnet",
            "--num-classes", "2", "--data", str(data)]
    return data, fast


def test_cli_decisions_errors(tmp_path, capsys):
    from nnsim_hooks.cli import commands as cli

    data, fast = _image_folder_cli(tmp_path)
    missing = cli.main(["audit", *fast, "--out", str(tmp_path / "a"), "--decisions", str(tmp_path / "none.csv")])
    assert missing == 1 and "--decisions" in capsys.readouterr().err
    bad = _csv(tmp_path, f"{data}/circle/nope.png,remove,")
    assert cli.main(["audit", *fast, "--out", str(tmp_path / "b"), "--decisions", str(bad)]) == 1
    assert "nope.png" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_decisions_applied(tmp_path, capsys):
    from nnsim_hooks.cli import commands as cli

    data, fast = _image_folder_cli(tmp_path)
    first = sorted((data / "circle").iterdir())[0]
    good = _csv(tmp_path, f"{first},remove,", "9,relabel,circle")
    assert cli.main(["audit", *fast, "--out", str(tmp_path / "c"), "--decisions", str(good)]) == 0, \
        capsys.readouterr().err
    assert "1 removed, 1 relabelled" in capsys.readouterr().out
    summary = json.loads((tmp_path / "c" / "summary.json").read_text())
    assert summary["samples"] == 9 and summary["decisions"]["removed_samples"] == [str(first)]


def test_an_edited_decisions_file_is_another_run(tmp_path):
    from nnsim_hooks.audit.decisions import fingerprint

    path = _csv(tmp_path, "1,remove,")
    before = fingerprint(path)
    assert before.startswith(str(path.resolve()) + "#sha256:") and fingerprint(path) == before
    _csv(tmp_path, "2,remove,")
    assert fingerprint(path) != before
    with pytest.raises(InputError, match="cannot read it"):
        fingerprint(tmp_path / "missing.csv")
