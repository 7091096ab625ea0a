"""Bad input gets a clear error or a documented behaviour; thumbnails for every shape."""

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.utils.data import Dataset, IterableDataset, TensorDataset

import nnsim_hooks
from nnsim_hooks.audit import demo, default_thumbnailer, register_thumbnailer, unregister_thumbnailer
from nnsim_hooks.audit.samples import to_label
from nnsim_hooks.audit.thumbnails import png_data_uri, thumbnail, to_image
from nnsim_hooks.errors import DataError, InputError, ModelError


class Items(Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def small():
    """An untrained CNN is enough here: these tests check behaviour, not accuracy."""
    data = demo.noisy_digits(0.0, seed=0, limit=30)
    return demo.small_cnn(width=4).eval(), data.images, data.noisy_labels


def test_missing_labels_in_many_spellings():
    model, x, y = small()
    items = [(x[i], int(y[i])) for i in range(30)]
    items[1] = (x[1], None)
    items[2] = (x[2], -1)
    items[3] = (x[3], float("nan"))
    items[4] = (x[4], torch.tensor(-1))
    result = nnsim_hooks.audit(model, Items(items), progress=False, sketch_dim=64, k=4)
    t = result.table
    assert t["label"].isna().tolist()[:6] == [False, True, True, True, True, False]
    assert result.summary["missing_labels"] == 4


def test_labels_argument_overrides_and_is_checked():
    model, x, y = small()
    ds = TensorDataset(x)
    labels = [int(v) for v in y]
    labels[0] = None
    result = nnsim_hooks.audit(model, ds, labels=labels, progress=False, sketch_dim=64, k=4)
    assert result.table["label"].isna()[0] and result.table["label"][1] == y[1]
    with pytest.raises(InputError, match="one entry per sample"):
        nnsim_hooks.audit(model, ds, labels=labels[:-1], progress=False)
    with pytest.raises(DataError, match="not below the model's 10 classes"):
        nnsim_hooks.audit(model, ds, labels=[12] * 30, progress=False)


@pytest.mark.parametrize(
    "label, match",
    [(1.5, "not a class index"), ("cat", "not a class index"), (torch.zeros(3), "one class index"), (True, "bool")],
)
def test_bad_labels(label, match):
    with pytest.raises(DataError, match=match):
        to_label(label, "sample 0")


def test_label_beyond_the_model_names_the_sample():
    model, x, y = small()
    items = [(x[i], int(y[i])) for i in range(30)]
    items[17] = (x[17], 11)
    with pytest.raises(DataError, match="sample 17 has label 11"):
        nnsim_hooks.audit(model, Items(items), progress=False, sketch_dim=64)


def test_bad_datasets_and_arguments():
    model, x, y = small()
    with pytest.raises(DataError, match="empty"):
        nnsim_hooks.audit(model, TensorDataset(x[:0], torch.as_tensor(y[:0])), progress=False)

    class Stream(IterableDataset):
        def __iter__(self):
            yield x[0], 0

    with pytest.raises(DataError, match="map-style"):
        nnsim_hooks.audit(model, Stream(), progress=False)
    with pytest.raises(InputError, match="nn.Module"):
        nnsim_hooks.audit("model", TensorDataset(x), progress=False)
    with pytest.raises(InputError, match="label-free"):
        nnsim_hooks.audit(model, TensorDataset(x), output="loss", progress=False)
    with pytest.raises(InputError, match="k must be"):
        nnsim_hooks.audit(model, TensorDataset(x), k=0, progress=False)


def test_pil_inputs_get_a_hint():
    from PIL import Image

    model, _, _ = small()
    items = [(Image.new("L", (8, 8)), 0)] * 3
    with pytest.raises(DataError, match="ToTensor"):
        nnsim_hooks.audit(model, Items(items), progress=False)


def test_model_returning_a_dict_is_refused():
    _, x, y = small()

    class Dicty(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(64, 3)

        def forward(self, x):
            return {"logits": self.lin(x.flatten(1))}

    with pytest.raises(ModelError, match="tensor of logits"):
        nnsim_hooks.audit(Dicty(), TensorDataset(x, torch.as_tensor(y)), progress=False)


def test_failing_sample_is_named():
    model, x, y = small()

    class Broken(Dataset):
        def __len__(self):
            return 30

        def __getitem__(self, i):
            if i == 21:
                raise OSError("disk says no")
            return x[i], int(y[i])

    with pytest.raises(DataError, match="sample 21.*disk says no"):
        nnsim_hooks.audit(model, Broken(), progress=False, sketch_dim=64)


def test_image_folder_with_unreadable_files(tmp_path):
    """Unreadable files are skipped, kept as readable=False rows and counted."""
    from PIL import Image
    from torchvision import transforms
    from torchvision.datasets import ImageFolder

    rng = np.random.default_rng(0)
    for c in range(3):
        (tmp_path / f"class{c}").mkdir()
        for i in range(6):
            arr = (rng.random((8, 8, 3)) * 80 + 60 * c).astype(np.uint8)
            Image.fromarray(arr).save(tmp_path / f"class{c}" / f"{i}.png")
    (tmp_path / "class1" / "9_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (tmp_path / "class2" / "9_truncated.png").write_bytes((tmp_path / "class2" / "0.png").read_bytes()[:40])
    ds = ImageFolder(str(tmp_path), transform=transforms.ToTensor())
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 3))
    result = nnsim_hooks.audit(model, ds, progress=False, sketch_dim=64, k=3)
    t = result.table
    bad = [i for i, (p, _) in enumerate(ds.samples) if "9_" in p]
    assert len(t) == len(ds) == 20
    assert t["readable"].tolist() == [i not in bad for i in range(20)]
    assert t.loc[bad, "label_issue_score"].isna().all() and not t.loc[bad, "is_outlier"].any()
    assert result.summary["unreadable"] == 2 and result.summary["unreadable_samples"] == bad
    ids, _ = result.neighbor_arrays()
    assert not np.isin(ids, bad).any()  # skipped files are nobody's neighbour
    html = result.report_html()
    assert "unreadable files (skipped)" in html


# -- thumbnails ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape, out",
    [((8, 8), (8, 8)), ((1, 8, 8), (8, 8)), ((3, 8, 6), (8, 6, 3)), ((8, 6, 3), (8, 6, 3)), ((4, 8, 6), (8, 6, 3)),
     ((9, 8, 6), (8, 6)), ((1, 9, 8, 6), (8, 6)), ((2, 9, 8, 6), (8, 6)), ((1, 1, 9, 8, 6), (8, 6))],
)
def test_default_thumbnailer_shapes(shape, out):
    x = torch.arange(int(np.prod(shape)), dtype=torch.float32).reshape(shape)
    image = default_thumbnailer(x)
    assert image.shape == out and image.dtype == np.uint8
    assert image.min() == 0 and image.max() == 255  # stretched per image


def test_volume_thumbnail_is_the_central_slice():
    vol = torch.zeros(9, 5, 5)
    vol[4] = torch.eye(5)
    np.testing.assert_array_equal(default_thumbnailer(vol), np.eye(5, dtype=np.uint8) * 255)


def test_registered_thumbnailer_goes_first_and_failures_fall_back():
    calls = []

    @register_thumbnailer
    def special(obj):
        calls.append(type(obj).__name__)
        if isinstance(obj, str):
            return np.full((4, 4), 7, dtype=np.uint8)
        raise RuntimeError("cannot")

    try:
        assert to_image("a volume name")[0, 0] == 7
        assert to_image(np.ones((5, 5))).shape == (5, 5)  # special failed: the default drew it
        assert calls == ["str", "ndarray"]
    finally:
        unregister_thumbnailer(special)
    assert to_image("a volume name") is None


def test_png_data_uri_and_dataset_thumbnail():
    uri = png_data_uri(np.zeros((8, 8), dtype=np.uint8), size=40)
    assert uri.startswith("data:image/png;base64,")
    ds = TensorDataset(torch.rand(3, 1, 8, 8), torch.zeros(3))
    assert thumbnail(ds, 1).startswith("data:image/png;base64,")
    assert thumbnail(TensorDataset(torch.rand(3, 5)), 0) is None  # 1-D rows: no picture
