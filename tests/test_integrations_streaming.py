"""Data where users keep it (issue 18, item 4): Hugging Face ``datasets`` (a saved folder or
an in-memory object) and WebDataset tar shards, through ``load_dataset`` and ``nnsim
audit --data``. The oracle: the same PNGs written as an ImageFolder and read by the file
reader give the same tensors, labels and order."""

from __future__ import annotations

import io
import os
import textwrap

import numpy as np
import pandas as pd
import pytest
import torch

from nnsim_hooks.cli import commands as cli
from nnsim_hooks.errors import DataError, InputError
from nnsim_hooks.integrations import layouts, load_dataset
from nnsim_hooks.integrations.config import DataConfig
from nnsim_hooks.integrations.records import RecordDataset

datasets = pytest.importorskip("datasets")
wds = pytest.importorskip("webdataset")
Image = pytest.importorskip("PIL.Image")

N, CLASSES = 36, ("circle", "square", "star")
CONFIG = DataConfig(channels=3, spatial_size=(16, 16), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def pictures(n=N, seed=0):
    """n 16x16 RGB pictures whose class shows (a bright patch per class) and labels 0,1,2,..."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for i in range(n):
        label = i % len(CLASSES)
        a = rng.integers(0, 80, (16, 16, 3), dtype=np.uint8)
        a[4 * label:4 * label + 6, 3:13] = 220
        images.append(Image.fromarray(a))
        labels.append(label)
    return images, labels


def png(image):
    buffer = io.BytesIO()
    image.save(buffer, format="png")
    return buffer.getvalue()


def hf_dataset(images, labels, **extra):
    features = {"img": datasets.Image(), "label": datasets.ClassLabel(names=list(CLASSES))}
    features.update({k: datasets.Value("string") for k in extra})
    return datasets.Dataset.from_dict({"img": images, "label": labels, **extra},
                                      features=datasets.Features(features))


def write_shards(folder, images, labels, per_shard=12):
    os.makedirs(folder, exist_ok=True)
    for s in range(0, len(images), per_shard):
        with wds.TarWriter(os.path.join(folder, f"shards-{s // per_shard:03d}.tar")) as sink:
            for i in range(s, min(s + per_shard, len(images))):
                sink.write({"__key__": f"sample{i:04d}", "png": png(images[i]), "cls": labels[i]})
    return os.path.join(folder, "shards-{000..%03d}.tar" % ((len(images) - 1) // per_shard))


def image_folder(root, images, labels):
    for i, (image, label) in enumerate(zip(images, labels)):
        os.makedirs(os.path.join(root, CLASSES[label]), exist_ok=True)
        image.save(os.path.join(root, CLASSES[label], f"{i:04d}.png"))
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("streaming")
    images, labels = pictures()
    hf = hf_dataset(images, labels)
    hf.save_to_disk(str(tmp / "hf"))
    return {"images": images, "labels": labels, "hf": str(tmp / "hf"), "memory": hf,
            "shards": write_shards(str(tmp / "wds"), images, labels), "folder": image_folder(str(tmp / "files"),
                                                                                             images, labels)}


def tensors(dataset):
    return torch.stack([dataset[i][0] for i in range(len(dataset))])


def oracle(data):
    """The file reader on the same PNGs, put back in dataset order (ImageFolder sorts by class)."""
    files = load_dataset(data["folder"], CONFIG)
    order = np.argsort([int(os.path.basename(p)[:4]) for p in files.paths])
    return tensors(files)[torch.as_tensor(order)], [files.labels[i] for i in order]


def test_the_registry_knows_both_layouts(data):
    assert [layout.name for layout in layouts.LAYOUTS][:5] == ["hf", "folder", "csv", "datalist", "webdataset"]
    assert layouts.layout_of(data["hf"]).name == "hf"
    assert layouts.layout_of(data["shards"]).name == "webdataset"  # a pattern: not a path that exists
    assert layouts.layout_of(data["folder"]).name == "folder"
    assert "Hugging Face" in layouts.data_help() and "shards-{000..003}.tar" in layouts.data_help()


@pytest.mark.parametrize("source", ["hf", "memory", "shards"])
def test_samples_match_the_same_pictures_read_from_files(data, source):
    dataset = load_dataset(data[source], CONFIG)
    assert isinstance(dataset, RecordDataset) and len(dataset) == N
    expected, expected_labels = oracle(data)
    assert torch.equal(tensors(dataset), expected)
    assert dataset.labels == expected_labels == data["labels"]
    again = load_dataset(data[source], CONFIG)  # the order is the data's own: the same every time
    assert again.paths == dataset.paths and torch.equal(again[N - 1][0], dataset[N - 1][0])


def test_names_are_the_row_index_or_the_shard_and_key(data):
    hf = load_dataset(data["hf"], CONFIG)
    assert hf.paths == [str(i) for i in range(N)] and hf.classes == list(CLASSES)
    shards = load_dataset(data["shards"], CONFIG)
    assert shards.paths[:2] == ["shards-000.tar/sample0000", "shards-000.tar/sample0001"]
    assert shards.paths[12] == "shards-001.tar/sample0012"
    assert shards.classes == []  # cls members are bare integers


def test_hf_columns_by_name_ids_splits_and_string_labels():
    images, labels = pictures(6)
    names = [CLASSES[y] for y in labels]
    table = datasets.Dataset.from_dict({"picture": images, "kind": names, "file_name": [f"f{i}.png" for i in range(6)]},
                                       features=datasets.Features({"picture": datasets.Image(),
                                                                   "kind": datasets.Value("string"),
                                                                   "file_name": datasets.Value("string")}))
    splits = datasets.DatasetDict({"train": table, "test": table.select([0, 1])})
    dataset = load_dataset(splits, CONFIG, label_column="kind")
    assert dataset.paths == [f"f{i}.png" for i in range(6)]  # the id column names the rows
    assert dataset.classes == sorted(CLASSES) and [dataset.classes[y] for y in dataset.labels] == names
    assert len(load_dataset(splits, CONFIG, split="test")) == 2
    with pytest.raises(InputError, match=r"has no column 'label' \(--label-column\); its columns are "
                                         r"\['picture', 'kind', 'file_name'\]"):
        load_dataset(table, CONFIG, label_column="label")
    with pytest.raises(InputError, match=r"has no split 'val'; its splits are \['train', 'test'\]"):
        load_dataset(splits, CONFIG, split="val")
    unlabelled = load_dataset(table, CONFIG)  # no ClassLabel, no column called label: unlabelled
    assert unlabelled.labels == [-1] * 6
    two = table.add_column("image", [png(x) for x in images]).cast_column("image", datasets.Image())
    with pytest.raises(InputError, match=r"several columns could be the image \(\['picture', 'image'\]\); "
                                         "choose one with --image-column"):
        load_dataset(two, CONFIG)
    assert torch.equal(load_dataset(two, CONFIG, image_column="image")[3][0],
                       load_dataset(two, CONFIG, image_column="picture")[3][0])
    as_torch = two.with_format("torch")  # a format set on the dataset does not change what is read
    assert torch.equal(load_dataset(as_torch, CONFIG, image_column="picture")[3][0],
                       load_dataset(two, CONFIG, image_column="picture")[3][0])
    undecoded = two.cast_column("image", datasets.Image(decode=False))  # {"bytes": ..., "path": ...} rows
    assert torch.equal(load_dataset(undecoded, CONFIG, image_column="image")[3][0],
                       load_dataset(two, CONFIG, image_column="picture")[3][0])


def test_hf_volumes_are_resized_to_the_spatial_size():
    rng = np.random.default_rng(1)
    volumes = [rng.random((8, 8, 8), dtype=np.float32) for _ in range(3)]
    table = datasets.Dataset.from_dict({"volume": volumes, "label": [0, 1, 0]},
                                       features=datasets.Features({"volume": datasets.Array3D((8, 8, 8), "float32"),
                                                                   "label": datasets.Value("int64")}))
    config = DataConfig(channels=1, spatial_dims=3, spatial_size=(32, 32, 32), mean=None, std=None, intensity="none")
    dataset = load_dataset(table, config)
    expected = torch.nn.functional.interpolate(torch.as_tensor(volumes[2])[None, None], size=(32, 32, 32),
                                               mode="trilinear", align_corners=False)[0]
    assert torch.allclose(dataset[2][0], expected, atol=1e-6) and dataset.labels == [0, 1, 0]


def test_a_missing_member_lists_the_members_there_are(data):
    with pytest.raises(InputError, match=r"no sample has a 'jpg' member \(--image-column\); the members there are "
                                         r"\['cls', 'png'\]"):
        load_dataset(data["shards"], CONFIG, image_column="jpg")
    with pytest.raises(DataError, match=r"1 of the 4 shards of .* do not exist, for example: .*shards-003.tar"):
        load_dataset(data["shards"].replace("{000..002}", "{000..003}"), CONFIG)


def truncated_copy(data, tmp_path, cut):
    """The shards with the second one cut to ``cut(size)`` bytes."""
    import shutil

    folder = tmp_path / "cut"
    shutil.copytree(os.path.dirname(data["shards"]), folder)
    second = folder / "shards-001.tar"
    size = second.stat().st_size
    with open(second, "r+b") as f:
        f.truncate(cut(size))
    return str(folder / os.path.basename(data["shards"])), str(second)


def test_a_truncated_shard_loses_the_cut_sample_and_names_the_file(data, tmp_path, caplog):
    from nnsim_hooks.audit.samples import find_unreadable

    # cut inside the 7th sample's png (each sample: a cls and a png member of about 1 KB)
    pattern, second = truncated_copy(data, tmp_path, lambda size: 6 * (size - 10240) // 12 + 700)
    dataset = load_dataset(pattern, CONFIG)
    assert f"shard '{second}' is truncated" in caplog.text
    kept = [p for p in dataset.paths if p.startswith("shards-001")]
    assert 0 < len(kept) < 12  # the samples after the cut are gone with the bytes
    cut = dataset.paths.index(kept[-1])
    bad = find_unreadable(dataset)
    assert bad.tolist() == [cut]
    with pytest.raises(DataError, match=f"shard '{second}' is truncated.*sample '{kept[-1].split('/')[1]}' was being "
                                        "read at the cut"):
        dataset[cut]
    expected, _ = oracle(data)
    assert torch.equal(dataset[cut - 1][0], expected[int(kept[-2][-4:])])  # the samples before it are intact
    assert torch.equal(dataset[cut + 1][0], expected[24])  # and the next shard's


def test_a_shard_cut_between_members_is_truncated_too(data, tmp_path, caplog):
    import tarfile

    with tarfile.open(data["shards"].replace("{000..002}", "001")) as tar:
        first, second_member = tar.getmembers()[:2]  # sample0012's two members
    assert {first.name, second_member.name} == {"sample0012.cls", "sample0012.png"}
    boundary = -(-(second_member.offset_data + second_member.size) // 512) * 512
    pattern, second = truncated_copy(data, tmp_path, lambda size: boundary)  # whole members, then nothing
    dataset = load_dataset(pattern, CONFIG)
    assert f"shard '{second}' is truncated: it stops" in caplog.text
    assert [p for p in dataset.paths if p.startswith("shards-001")] == ["shards-001.tar/sample0012"]


# -- the CLI --------------------------------------------------------------------------------

TINY_NET = '''
    import torch
    from torch import nn

    def net(num_classes=3):
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                             nn.Linear(16, num_classes))

    net.data_config = {"channels": 3, "spatial_size": [16, 16], "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
'''
FAST = ["--no-progress", "--k", "3", "--sketch-dim", "32", "--batch-size", "16", "--num-classes", "3",
        "--model", "nnsim_tiny_stream_net:net"]


@pytest.fixture
def tiny_model(tmp_path, monkeypatch):
    (tmp_path / "nnsim_tiny_stream_net.py").write_text(textwrap.dedent(TINY_NET))
    monkeypatch.syspath_prepend(str(tmp_path))


def nnsim(data, out, *extra):
    return cli.main(["audit", "--data", str(data), "--out", str(out), *FAST, *map(str, extra)])


COLUMNS = ["label", "prediction", "label_issue_score", "density", "similarity_1"]


@pytest.mark.slow
def test_cli_audits_both_layouts_like_the_files(data, tmp_path, tiny_model, capsys):
    assert nnsim(data["folder"], tmp_path / "files") == 0, capsys.readouterr().err
    files = pd.read_csv(tmp_path / "files" / "table.csv")
    files = files.assign(number=files["path"].str[-8:-4].astype(int)).sort_values("number").reset_index(drop=True)
    assert nnsim(data["hf"], tmp_path / "hf", "--image-column", "img", "--label-column", "label") == 0
    assert nnsim(data["shards"], tmp_path / "wds") == 0, capsys.readouterr().err
    hf = pd.read_csv(tmp_path / "hf" / "table.csv")
    shards = pd.read_csv(tmp_path / "wds" / "table.csv")
    assert hf["path"].tolist() == list(range(N))  # the row index, read back as numbers
    assert shards["path"].tolist() == [f"shards-{i // 12:03d}.tar/sample{i:04d}" for i in range(N)]
    assert hf["label_name"].tolist() == [CLASSES[y] for y in data["labels"]]
    for table in (hf, shards):  # the same pictures give the same audit as the files
        pd.testing.assert_frame_equal(table[COLUMNS], files[COLUMNS], atol=1e-4, check_dtype=False)


def test_cli_bad_columns_and_layout_flags_are_clear(data, tmp_path, tiny_model, capsys):
    assert nnsim(data["hf"], tmp_path / "a", "--label-column", "lbl") == 1
    assert "has no column 'lbl' (--label-column); its columns are ['img', 'label']" in capsys.readouterr().err
    assert nnsim(data["folder"], tmp_path / "b", "--image-column", "img") == 1
    assert "--image-column: not read by folder data" in capsys.readouterr().err
    assert cli.main(["audit", "--split", "train", "--out", str(tmp_path / "c")]) == 1
    assert "--split given without --data" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_counts_a_truncated_shards_cut_sample_as_unreadable(data, tmp_path, tiny_model, capsys):
    pattern, second = truncated_copy(data, tmp_path, lambda size: 6 * (size - 10240) // 12 + 700)
    assert nnsim(pattern, tmp_path / "audit") == 0, capsys.readouterr().err
    assert "unreadable        1 files skipped" in capsys.readouterr().out
    table = pd.read_csv(tmp_path / "audit" / "table.csv")
    assert (~table["readable"]).sum() == 1
    assert table.loc[~table["readable"], "path"].str.startswith("shards-001.tar/").all()


@pytest.mark.slow
def test_cli_interrupted_then_resumed_equals_uninterrupted(data, tmp_path, tiny_model, capsys, monkeypatch):
    whole = tmp_path / "whole"
    assert nnsim(data["shards"], whole) == 0
    original = RecordDataset.__getitem__
    state = {"armed": True}

    def interrupting(self, index):
        if state["armed"] and index == 20:
            state["armed"] = False
            raise KeyboardInterrupt
        return original(self, index)

    monkeypatch.setattr(RecordDataset, "__getitem__", interrupting)
    out = tmp_path / "resumed"
    assert nnsim(data["shards"], out) == 130
    stored = __import__("json").loads((out / "index" / "manifest.json").read_text())["count"]
    assert 0 < stored < N
    assert nnsim(data["shards"], out) == 0, capsys.readouterr().err
    pd.testing.assert_frame_equal(pd.read_csv(out / "table.csv")[["path", *COLUMNS]],
                                  pd.read_csv(whole / "table.csv")[["path", *COLUMNS]], atol=1e-5)
