"""NaN and Inf samples that are not files (issue 17): a TensorDataset sample whose input
holds NaN, or a sample for which the model's output is NaN or Inf, is stored by the index
build as a sample without a gradient (valid=False, norm NaN) and skipped and counted by the
audit like a non-finite file; every other sample's result equals a run without it."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from torch.utils.data import Subset, TensorDataset

import nnsim_hooks
from nnsim_hooks.errors import NonFiniteGradientError

N, BAD = 24, 5


class MarkedInfinity(nn.Module):
    """A small classifier whose outputs are divided by 0 for the samples marked by
    ``x[:, 0, 0, 0] == 7`` (Inf or NaN there, finite elsewhere)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 3))

    def forward(self, x):
        mark = (x[:, 0, 0, 0] == 7).to(x.dtype)
        return self.net(x) / (1 - mark)[:, None]


def images(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(N, 1, 8, 8, generator=g), torch.arange(N) % 3


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 3))


# -- the index build ---------------------------------------------------------------------------


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("batch_size", [1, 4, 64])
def test_the_build_stores_a_nan_input_as_a_row_without_a_gradient(value, batch_size):
    x, y = images()
    x[BAD, 0, 3, 3] = value
    keep = [i for i in range(N) if i != BAD]
    with nnsim_hooks.attach(net(), sketch_dim=16) as h:
        index = h.build_index(TensorDataset(x, y), batch_size=batch_size, progress=False)
        oracle = h.build_index(TensorDataset(x[keep], y[keep]), batch_size=batch_size, progress=False)
    assert len(index) == N and not index.valid[BAD] and np.isnan(index.norms[BAD])
    assert (np.asarray(index.features[BAD]) == 0).all() and index.predictions[BAD] == -1
    assert index.labels[BAD] == y[BAD] and np.isnan(index.probabilities[BAD]).all()
    assert index.ids.tolist() == list(range(N))
    for name in ("features", "norms", "labels", "predictions", "probabilities", "valid"):
        np.testing.assert_array_equal(np.asarray(getattr(index, name))[keep], np.asarray(getattr(oracle, name)),
                                      err_msg=name)


def test_a_first_batch_of_skipped_samples_is_stored_with_the_next_one(tmp_path):
    x, y = images()
    x[:2] = float("nan")
    with nnsim_hooks.attach(net(), sketch_dim=16) as h:
        index = h.build_index(TensorDataset(x, y), tmp_path / "index", batch_size=2, progress=False)
    assert len(index) == N and index.ids.tolist() == list(range(N))
    assert index.valid.tolist() == [False, False] + [True] * (N - 2)
    assert np.isnan(index.norms[:2]).all() and np.isfinite(index.norms[2:]).all()
    loaded = nnsim_hooks.index.load_index(tmp_path / "index")
    assert np.isnan(loaded.norms[:2]).all() and loaded.valid.tolist() == index.valid.tolist()


def test_a_dataset_of_only_nan_samples_is_a_data_error():
    x, y = images()
    x[:] = float("nan")
    with nnsim_hooks.attach(net(), sketch_dim=16) as h, pytest.raises(nnsim_hooks.DataError, match="NaN or Inf"):
        h.build_index(TensorDataset(x, y), batch_size=8, progress=False)


def test_a_sample_whose_output_is_infinite_is_skipped_by_the_build():
    x, y = images()
    x[BAD, 0, 0, 0] = 7
    keep = [i for i in range(N) if i != BAD]
    with nnsim_hooks.attach(MarkedInfinity(), sketch_dim=16) as h:
        index = h.build_index(TensorDataset(x, y), batch_size=8, progress=False)
        oracle = h.build_index(TensorDataset(x[keep], y[keep]), batch_size=8, progress=False)
    assert not index.valid[BAD] and np.isnan(index.norms[BAD])
    np.testing.assert_array_equal(np.asarray(index.features)[keep], np.asarray(oracle.features))


def test_features_of_one_batch_stay_strict():
    """Outside the index build nothing is dropped silently: the caller holds the batch."""
    x, _ = images()
    x[BAD, 0, 0, 0] = 7
    with nnsim_hooks.attach(MarkedInfinity(), sketch_dim=16) as h:
        with pytest.raises(NonFiniteGradientError, match=rf"samples \[{BAD}\]") as caught:
            h.features(x[:8])
    assert caught.value.samples == (BAD,)


# -- the audit -----------------------------------------------------------------------------------


def _audit(model, dataset, **kw):
    return nnsim_hooks.audit(model, dataset, k=3, sketch_dim=16, batch_size=8, progress=False, **kw)


def _same_results(result, oracle, keep):
    """Every column of the samples in ``keep`` equals the oracle's (audited without the
    others), neighbours mapped back to dataset positions."""
    t, o = result.table.loc[keep].reset_index(drop=True), oracle.table.reset_index(drop=True)
    for column in o.columns:
        if column.startswith("neighbor_"):
            mapped = [keep[int(v)] if v >= 0 else -1 for v in o[column]]
            assert t[column].tolist() == mapped, column
        elif column not in ("path",):
            pd.testing.assert_series_equal(t[column], o[column], check_names=False, obj=column)
    pd.testing.assert_frame_equal(result.per_class, oracle.per_class)


@pytest.mark.slow
def test_an_audit_skips_and_counts_a_tensor_sample_with_nan(tmp_path):
    x, y = images()
    x[BAD, 0, 2, 2] = float("nan")
    keep = [i for i in range(N) if i != BAD]
    dataset = TensorDataset(x, y)
    result = _audit(net(), dataset, out_dir=tmp_path / "audit")
    oracle = _audit(net(), Subset(dataset, keep))
    s = result.summary
    assert s["non_finite"] == 1 and s["non_finite_samples"] == [BAD] and s["unreadable"] == 0
    assert s["samples"] == N and s["readable"] == N - 1
    t = result.table
    assert t["finite"].tolist() == [i != BAD for i in range(N)] and not t.loc[BAD, "readable"]
    assert pd.isna(t.loc[BAD, "label"]) and not t.loc[BAD, "valid"]
    _same_results(result, oracle, keep)
    assert "samples with NaN or Inf values, in input or gradient (skipped)" in (tmp_path / "audit" / "report.html").read_text()


@pytest.mark.slow
def test_an_audit_skips_and_counts_a_sample_whose_output_is_infinite():
    x, y = images()
    x[BAD, 0, 0, 0] = 7
    keep = [i for i in range(N) if i != BAD]
    dataset = TensorDataset(x, y)
    result = _audit(MarkedInfinity(), dataset, exact_density=True)
    oracle = _audit(MarkedInfinity(), Subset(dataset, keep), exact_density=True)
    assert result.summary["non_finite"] == 1 and result.summary["non_finite_samples"] == [BAD]
    assert not result.table.loc[BAD, "finite"]
    _same_results(result, oracle, keep)


@pytest.mark.slow
def test_an_audit_names_a_hugging_face_record_with_nan_by_its_name():
    datasets = pytest.importorskip("datasets")
    from nnsim_hooks.integrations import load_dataset
    from nnsim_hooks.integrations.config import DataConfig

    x, y = images()
    arrays = [a[0].numpy() for a in x]
    arrays[BAD][1, 1] = np.inf
    table = datasets.Dataset.from_dict(
        {"image": arrays, "label": y.tolist()},
        features=datasets.Features({"image": datasets.Array2D((8, 8), "float32"), "label": datasets.Value("int64")}))
    config = DataConfig(channels=1, spatial_dims=2, spatial_size=(8, 8), mean=None, std=None, intensity="none")
    result = _audit(net(), load_dataset(table, config))
    assert result.summary["non_finite"] == 1 and result.summary["non_finite_samples"] == [BAD]
    row = result.table.loc[BAD]
    assert not row["finite"] and not row["readable"] and row["path"] == str(BAD)
