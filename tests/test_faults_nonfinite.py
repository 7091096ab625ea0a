"""NaN and Inf (issue 17): a file holding them is skipped and counted like an unreadable
one, named in the log, the summary, the table and the report; min-max scaling ignores
non-finite voxels; a query vector with NaN or Inf values is an InputError."""

from __future__ import annotations

import json
import logging
import textwrap

import numpy as np
import pandas as pd
import pytest
import torch

from index_synthetic import clustered_rows
from nnsim_hooks.audit.samples import find_skipped
from nnsim_hooks.errors import InputError, NonFiniteInputError
from nnsim_hooks.index import GradientIndex

N, D = 40, 8


# -- queries ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def index():
    return GradientIndex.from_features(clustered_rows(N, D, seed=2))


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_a_query_with_nan_or_inf_values_is_an_input_error(index, value):
    q = np.array(index.features[:3])
    q[1, 4] = value
    with pytest.raises(InputError, match=rf"queries rows \[1\] hold NaN or Inf values \(row 1, column 4 is {value}\)"):
        index.search(q, 3)
    with pytest.raises(InputError, match=r"queries rows \[1\]"):
        index.search(torch.from_numpy(q), 3)


def test_an_all_nan_query_is_still_a_sample_without_a_direction(index):
    """handle.features marks samples without a gradient direction with NaN rows: no results."""
    q = np.array(index.features[:2])
    q[0] = np.nan
    scores, ids = index.search(q, 3)
    assert (ids[0] == -1).all() and np.isnan(scores[0]).all() and (ids[1] >= 0).all()


def test_sharded_queries_refuse_them_too(index):
    from nnsim_hooks.index.sharded.queries import ShardedQueries

    q = np.array(index.features[:2])
    q[0, 0] = np.inf
    with pytest.raises(InputError, match=r"queries rows \[0\] hold NaN or Inf"):
        ShardedQueries(index, distributed=False).search(q, 3)


# -- scaling ---------------------------------------------------------------------------------


def test_min_max_scaling_ignores_non_finite_voxels():
    from nnsim_hooks.integrations.images import ScaleIntensity

    x = torch.tensor([[2.0, 4.0], [float("nan"), 6.0]])
    out = ScaleIntensity()(x)
    np.testing.assert_allclose(out[[0, 0, 1], [0, 1, 1]].numpy(), [0.0, 0.5, 1.0])  # (x - 2) / (6 - 2)
    assert torch.isnan(out[1, 0])
    inf = torch.tensor([1.0, float("inf"), 3.0])
    np.testing.assert_allclose(ScaleIntensity()(inf).numpy()[[0, 2]], [0.0, 1.0])


def test_a_volume_with_one_nan_voxel_is_scaled_on_its_finite_voxels(tmp_path):
    nib = pytest.importorskip("nibabel")
    pytest.importorskip("monai")
    from nnsim_hooks.integrations.config import DataConfig
    from nnsim_hooks.integrations.volumes import VolumeReader

    volume = np.arange(64, dtype=np.float32).reshape(4, 4, 4) + 10
    volume[1, 2, 3] = np.nan
    nib.save(nib.Nifti1Image(volume, np.eye(4)), str(tmp_path / "v.nii.gz"))
    out = VolumeReader(DataConfig(channels=1, spatial_dims=3, intensity="scale"))(str(tmp_path / "v.nii.gz"))[0]
    want = (volume - 10) / 63
    finite = np.isfinite(volume)
    np.testing.assert_allclose(out.numpy()[finite], want[finite], atol=1e-6)
    assert np.isnan(out.numpy()[1, 2, 3])


# -- skipping files ---------------------------------------------------------------------------


def npy_folder(root, bad=((0, 2, np.nan), (1, 1, np.inf))):
    """Two classes of 6 .npy arrays [8, 8]; ``bad``: (class, file, value) planted at one pixel."""
    rng = np.random.default_rng(0)
    for c in range(2):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(6):
            a = rng.random((8, 8), dtype=np.float32) + c
            if any(b[:2] == (c, i) for b in bad):
                a[3, 3] = next(b[2] for b in bad if b[:2] == (c, i))
            np.save(root / f"c{c}" / f"{i}.npy", a)
    return root


def test_files_with_nan_or_inf_are_found_and_named(tmp_path, caplog):
    from nnsim_hooks.integrations.config import DataConfig
    from nnsim_hooks.integrations.datasets import load_dataset

    root = npy_folder(tmp_path / "data")
    data = load_dataset(str(root), DataConfig(channels=1, spatial_dims=2))
    with pytest.raises(NonFiniteInputError, match=r"'.*c0/2.npy' holds 1 NaN or Inf values \(of 64\)"):
        data.loader(data.paths[2])
    with caplog.at_level(logging.WARNING):
        unreadable, non_finite = find_skipped(data)
    assert unreadable.tolist() == [] and non_finite.tolist() == [2, 7]
    assert "skipping non-finite file" in caplog.text and "c1/1.npy" in caplog.text


TINY_NET = '''
    import torch
    from torch import nn

    def net(num_classes=2):
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 2))

    net.data_config = {"channels": 1, "spatial_size": [8, 8]}
'''


@pytest.mark.slow
def test_an_audit_skips_and_counts_files_with_nan_or_inf(tmp_path, monkeypatch, capsys):
    from nnsim_hooks.cli import commands as cli

    (tmp_path / "nnsim_tiny_nan_net.py").write_text(textwrap.dedent(TINY_NET))
    monkeypatch.syspath_prepend(str(tmp_path))
    root = npy_folder(tmp_path / "data")
    out = tmp_path / "audit"
    code = cli.main(["audit", "--data", str(root), "--model", "nnsim_tiny_nan_net:net", "--out", str(out),
                     "--no-progress", "--k", "3", "--sketch-dim", "16", "--batch-size", "4"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "NaN or Inf        2 samples skipped" in printed.out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["non_finite"] == 2 and summary["non_finite_samples"] == [2, 7] and summary["unreadable"] == 0
    assert summary["samples"] == 12 and summary["readable"] == 10
    table = pd.read_csv(out / "table.csv")
    assert table["finite"].tolist() == [i not in (2, 7) for i in range(12)]
    assert not table["readable"][[2, 7]].any()
    assert "samples with NaN or Inf values, in input or gradient (skipped)" in (out / "report.html").read_text()
