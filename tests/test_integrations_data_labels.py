"""CSV and datalist labels: integers for every row, or names for every row, or missing;
a mix is an error naming the odd rows, never a silent remap (issue 11, items 5 and 9)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from nnsim_hooks.errors import DataError
from nnsim_hooks.integrations import DataConfig, load_dataset
from nnsim_hooks.integrations.labels import parse_labels

GREY = DataConfig(channels=1, spatial_dims=2, mean=None, std=None)


@pytest.fixture
def images(tmp_path):
    """12 tiny PNGs in tmp_path/img; returns their names relative to tmp_path."""
    (tmp_path / "img").mkdir()
    names = []
    for i in range(12):
        Image.fromarray(np.full((4, 4), 20 * i, np.uint8)).save(tmp_path / "img" / f"{i}.png")
        names.append(f"img/{i}.png")
    return names


def write_csv(tmp_path, names, labels, header="path,label"):
    path = tmp_path / "list.csv"
    path.write_text(header + "\n" + "\n".join(f"{n},{v}" for n, v in zip(names, labels)) + "\n")
    return str(path)


def test_integer_labels_keep_their_values_whatever_their_spelling(tmp_path, images):
    # "10" must stay class 10 (a string sort would put it before "2"), -1/empty/NaN are missing
    labels = ["10", "2", " 3 ", "1.0", "-1", "", "nan", "NaN", "0", "2.0", "11", "4"]
    data = load_dataset(write_csv(tmp_path, images, labels), GREY)
    assert data.labels == [10, 2, 3, 1, -1, -1, -1, -1, 0, 2, 11, 4]
    assert data.classes == []


def test_one_name_among_integers_is_an_error_naming_its_line(tmp_path, images):
    labels = [str(i % 3) for i in range(12)]
    labels[4], labels[9] = "cat", "2x"
    with pytest.raises(DataError) as info:
        load_dataset(write_csv(tmp_path, images, labels), GREY)
    message = str(info.value)
    assert "list.csv" in message and "mix integers (10 rows) and class names (2 rows)" in message
    assert "line 6: 'cat'" in message and "line 11: '2x'" in message  # line 1 is the header
    assert "--classes" in message and "classes=" in message


def test_odd_rows_listed_are_the_minority_and_only_the_first_few(tmp_path, images):
    labels = ["dog"] * 3 + [str(i) for i in range(9)]
    with pytest.raises(DataError, match=r"the odd 3 among integers: line 2: 'dog', line 3: 'dog', line 4: 'dog'"):
        load_dataset(write_csv(tmp_path, images, labels), GREY)
    labels = ["dog", "cat"] * 4 + ["1", "2", "3", "4"]
    with pytest.raises(DataError, match=r"the odd 4 among class names: line 10: '1'"):
        load_dataset(write_csv(tmp_path, images, labels), GREY)
    raw = [str(i) for i in range(20)] + [f"typo{i}" for i in range(8)] + [str(i) for i in range(20)]
    with pytest.raises(DataError) as info:
        parse_labels(raw, [f"line {i}" for i in range(len(raw))], "CSV 'x.csv'")
    assert "'typo4'" in str(info.value) and "'typo5'" not in str(info.value) and "and 3 more" in str(info.value)


@pytest.mark.parametrize("bad, reason", [("1.5", "not an integer"), ("-2", "negative class index"),
                                         ("inf", "not an integer")])
def test_non_integral_or_negative_numbers_are_refused(tmp_path, images, bad, reason):
    labels = ["0", "1"] * 6
    labels[7] = bad
    with pytest.raises(DataError, match=rf"{reason}.*line 9: '{bad}'"):
        load_dataset(write_csv(tmp_path, images, labels), GREY)


def test_all_names_map_in_sorted_order_and_missing_stays_missing(tmp_path, images):
    labels = ["dog", "cat", "", "bird", "nan", "-1"] * 2
    data = load_dataset(write_csv(tmp_path, images, labels, header="image,target"), GREY)
    assert data.classes == ["bird", "cat", "dog"]
    assert data.labels == [2, 1, -1, 0, -1, -1] * 2


def test_explicit_classes_allow_names_and_indices_together(tmp_path, images):
    labels = ["dog", "0", "cat", "2", "", "dog"] * 2
    data = load_dataset(write_csv(tmp_path, images, labels), GREY, classes=["cat", "dog", "bird"])
    assert data.classes == ["cat", "dog", "bird"]
    assert data.labels == [1, 0, 0, 2, -1, 1] * 2
    with pytest.raises(DataError, match=r"neither among the 3 classes.*line 3: 'cow'.*line 5: '7'"):
        labels = ["dog", "cow", "cat", "7"] * 3
        load_dataset(write_csv(tmp_path, images, labels), GREY, classes=["cat", "dog", "bird"])
    # a class named like a number is that class (names are looked up first)
    data = load_dataset(write_csv(tmp_path, images, ["1", "0"] * 6), GREY, classes=["1", "0"])
    assert data.labels == [0, 1] * 6


def test_explicit_classes_order_an_image_folder(tmp_path):
    for name in ("b", "a"):
        (tmp_path / name).mkdir()
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / name / "x.png")
    assert load_dataset(str(tmp_path), GREY).labels == [0, 1]  # a, b sorted
    data = load_dataset(str(tmp_path), GREY, classes=["b", "a"])
    assert data.labels == [1, 0] and data.classes == ["b", "a"]
    with pytest.raises(DataError, match=r"class folders \['b'\] are not among the classes"):
        load_dataset(str(tmp_path), GREY, classes=["a", "c"])


def test_datalist_labels_follow_the_same_rule(tmp_path, images):
    def datalist(labels):
        path = tmp_path / "datalist.json"
        path.write_text(json.dumps({"training": [{"image": n, "label": v} for n, v in zip(images, labels)]}))
        return str(path)

    data = load_dataset(datalist([10, 2, "3", 1.0, None, -1, [0, 0, 1], [4], 0, 1, 2, 3]), GREY)
    assert data.labels == [10, 2, 3, 1, -1, -1, 2, 4, 0, 1, 2, 3]
    with pytest.raises(DataError, match=r"mix integers.*item 3: 'cat'"):
        load_dataset(datalist([0, 1, 2, "cat"] * 3), GREY)
    with pytest.raises(DataError, match=r"item 1: the label \[1, 1, 0\] is not one-hot"):
        load_dataset(datalist([[1, 0, 0], [1, 1, 0]] * 6), GREY)
    with pytest.raises(DataError, match=r"bool.*item 0: True"):
        load_dataset(datalist([True] + [0] * 11), GREY)
    assert load_dataset(datalist(["b", "a"] * 6), GREY, classes=["b", "a"]).labels == [0, 1] * 6


def test_binary_csv_is_named_as_not_a_text_csv(tmp_path):
    png = tmp_path / "list.csv"
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(png, format="PNG")  # an image renamed .csv
    with pytest.raises(DataError, match=r"CSV '.*list.csv' is not a text CSV.*UTF-8"):
        load_dataset(str(png), GREY)
    utf16 = tmp_path / "utf16.csv"
    utf16.write_text("path,label\nimg/0.png,0\n", encoding="utf-16")
    with pytest.raises(DataError, match=r"utf16.csv' is not a text CSV.*UTF-16"):
        load_dataset(str(utf16), GREY)
    nul = tmp_path / "nul.csv"
    nul.write_bytes(b"path,label\n\x00\x00\x00,0\n")
    with pytest.raises(DataError, match=r"nul.csv' is not a text CSV.*NUL bytes"):
        load_dataset(str(nul), GREY)
    blob = tmp_path / "datalist.json"
    blob.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    with pytest.raises(DataError, match=r"datalist '.*datalist.json' is not a text JSON file"):
        load_dataset(str(blob), GREY)
