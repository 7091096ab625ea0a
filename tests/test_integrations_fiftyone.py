"""FiftyOne (issue 18, item 4): reading a FiftyOne dataset's samples and writing the audit's
columns into its sample fields. FiftyOne's MongoDB cannot start in the sandbox this was
built in, so these tests use a stand-in with the methods of FiftyOne's documented API that
the code calls (``values``, ``set_values(..., key_field=...)``, ``has_field``,
``get_field_schema``, ``default_classes``); the oracle is the stand-in's own store."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest
import torch

from nnsim_hooks.errors import InputError
from nnsim_hooks.integrations import DataConfig, export_to_fiftyone, layouts, load_dataset
from nnsim_hooks.integrations.layouts.fiftyone_dataset import column_values
from nnsim_hooks.integrations.synthetic import make_image_folder

CONFIG = DataConfig(channels=3, spatial_size=(16, 16), mean=None, std=None)


class FakeCollection:
    """What the code uses of a ``fiftyone.core.dataset.Dataset``: samples as dicts with a
    ``filepath`` and, maybe, an embedded classification ``{"label": ...}``."""

    def __init__(self, samples, name="fake", default_classes=()):
        self.samples, self.name, self.default_classes = samples, name, list(default_classes)

    def _get(self, sample, path):
        for part in path.split("."):
            sample = sample.get(part) if isinstance(sample, dict) else None
        return sample

    def has_field(self, path):
        return any(self._get(s, path) is not None for s in self.samples)

    def get_field_schema(self):
        return {k: None for s in self.samples for k in s}

    def values(self, path):
        return [self._get(s, path) for s in self.samples]

    def set_values(self, field, values, key_field=None):
        assert key_field == "filepath" and isinstance(values, dict)
        for sample in self.samples:
            if sample["filepath"] in values:
                sample[field] = values[sample["filepath"]]


FakeCollection.__module__ = "fiftyone.core.dataset"  # how load_dataset tells a FiftyOne collection


@pytest.fixture
def shapes(tmp_path):
    paths = make_image_folder(str(tmp_path / "shapes"), classes=("circle", "square"), per_class=4, size=(16, 16))
    order = paths[::-1]  # FiftyOne's order, not the folder's
    samples = [{"filepath": p, "ground_truth": {"label": os.path.basename(os.path.dirname(p))}} for p in order]
    return FakeCollection(samples, default_classes=["square", "circle"]), order


def test_samples_are_the_collections_files_in_its_order(shapes):
    collection, order = shapes
    dataset = load_dataset(collection, CONFIG)
    assert dataset.paths == order and dataset.layout == "fiftyone"
    assert dataset.classes == ["square", "circle"]  # the dataset's default_classes give the indices
    assert [dataset.classes[y] for y in dataset.labels] == [os.path.basename(os.path.dirname(p)) for p in order]
    files = load_dataset(os.path.dirname(os.path.dirname(order[0])), CONFIG)
    assert torch.equal(dataset[0][0], files[files.paths.index(order[0])][0])
    with pytest.raises(InputError, match=r"has no field 'truth' \(--label-column\); its fields are "
                                         r"\['filepath', 'ground_truth'\]"):
        load_dataset(collection, CONFIG, label_column="truth")
    unlabelled = FakeCollection([{"filepath": p} for p in order])
    assert load_dataset(unlabelled, CONFIG).labels == [-1] * len(order)


def test_the_registry_reads_fiftyone_names():
    assert layouts.layout_of("fiftyone:my-data").name == "fiftyone"
    assert "fiftyone:NAME" in layouts.data_help()


def test_audit_columns_go_to_the_samples_of_the_same_file(shapes, tmp_path):
    collection, order = shapes
    root = os.path.dirname(os.path.dirname(order[0]))
    # an audit table as audit(...).table has it: paths relative to the --data folder, one row without a file
    rel = [os.path.relpath(p, root) for p in order[:5]]
    table = pd.DataFrame({"sample": range(6), "path": pd.array(rel + [None], dtype="string"),
                          "label_issue_score": [0.1, np.nan, 0.3, 0.4, 0.5, 0.6],
                          "label_issue": [True, False, True, False, False, True],
                          "prediction_name": pd.array(["circle", None, "square", "circle", "square", "x"],
                                                      dtype="string")})
    written = export_to_fiftyone(table, collection, root=root)
    assert written == ["nnsim_label_issue_score", "nnsim_label_issue", "nnsim_prediction_name"]
    by_path = {s["filepath"]: s for s in collection.samples}
    for i, path in enumerate(order[:5]):  # oracle: the table's row for that file
        sample = by_path[path]
        expected = table["label_issue_score"][i]
        assert sample["nnsim_label_issue_score"] == (None if np.isnan(expected) else expected)
        assert sample["nnsim_label_issue"] is bool(table["label_issue"][i])
        assert type(sample["nnsim_label_issue_score"]) in (float, type(None))
        assert sample["nnsim_prediction_name"] == (None if i == 1 else table["prediction_name"][i])
    for path in order[5:]:  # samples the table does not name are left alone
        assert not any(k.startswith("nnsim_") for k in by_path[path])
    with pytest.raises(InputError, match="pass root="):
        export_to_fiftyone(table, collection)  # relative paths without their root match nothing
    with pytest.raises(InputError, match=r"no column\(s\) \['density'\]"):
        column_values(table, root=root, columns=["density"])


@pytest.mark.slow
def test_an_audit_of_a_fiftyone_dataset_writes_back_to_the_same_samples(shapes):
    import nnsim_hooks

    collection, order = shapes
    dataset = load_dataset(collection, CONFIG)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, stride=2), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(2),
                                torch.nn.Flatten(), torch.nn.Linear(16, 2))
    result = nnsim_hooks.audit(model, dataset, k=3, sketch_dim=32, progress=False, output="contrast")
    assert result.table["path"].tolist() == order  # absolute: the key FiftyOne matches by
    export_to_fiftyone(result.table, collection, columns=["label_issue_score", "density", "label_name"])
    for i, sample in enumerate(collection.samples):
        assert sample["nnsim_density"] == pytest.approx(float(result.table["density"][i]))
        assert sample["nnsim_label_name"] == sample["ground_truth"]["label"]
