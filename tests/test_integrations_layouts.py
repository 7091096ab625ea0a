"""The registry of dataset layouts: ``load_dataset`` and ``nnsim audit --data`` dispatch,
check, explain and document every layout from it, so a new layout is one module and one
entry in ``LAYOUTS``."""

from __future__ import annotations

import json
import os

import pytest

from nnsim_hooks.cli import commands as cli
from nnsim_hooks.errors import DataError
from nnsim_hooks.integrations import layouts, load_dataset
from nnsim_hooks.integrations.listing import Layout, Listing, check_exist

EXPECTED = ("a Hugging Face dataset folder (save_to_disk), a folder (one sub-folder of images per class, or the "
            "files themselves), a .csv of path,label, a .json MONAI datalist, WebDataset .tar shards (a file or a "
            "brace pattern) or a FiftyOne dataset (fiftyone:NAME)")


def _touch(folder, names):
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"")
    return [str(folder / n) for n in names]


def list_lines(path, classes=None, *, prefix=""):
    """A made-up layout: one ``file label`` per line of a ``.lst``."""
    base = os.path.dirname(path)
    pairs = [line.split() for line in open(path).read().splitlines() if line.strip()]
    listing = Listing([os.path.join(base, prefix + p) for p, _ in pairs], [int(y) for _, y in pairs], [], layout="lst")
    check_exist(listing.paths, f"list '{path}'")
    return listing


LST = Layout(name="lst", recognises=lambda p: p.endswith(".lst"), what="a .lst of 'file label' lines",
             help="a list of file label lines (.lst)", list_samples=list_lines, options=("prefix",),
             suffixes=(".lst",))


def test_the_registry_words_the_layouts_as_before():
    assert [layout.name for layout in layouts.LAYOUTS] == ["hf", "folder", "csv", "datalist", "webdataset",
                                                           "fiftyone"]
    assert layouts.expected() == EXPECTED
    assert layouts.data_help() == (
        "a Hugging Face dataset saved with save_to_disk (--image-column, --label-column), ImageFolder (one sub-folder "
        "per class), a folder of files, a CSV of path,label (.csv), a MONAI datalist JSON (.json), WebDataset tar "
        "shards (shards-{000..003}.tar) or a FiftyOne dataset (fiftyone:NAME); images, NIfTI/MHA/NRRD volumes or "
        ".npy arrays")
    options = layouts.layout_options()
    assert {o: options[o].name for o in options} == {
        **{o: "datalist" for o in ("section", "image_key", "label_key", "mask_key")},
        **{o: "hf" for o in ("image_column", "label_column", "split", "id_column")}}


def test_each_layout_is_recognised_by_its_path(tmp_path):
    _touch(tmp_path / "f", ["a.png"])
    (tmp_path / "l.csv").write_text("path,label\nf/a.png,1\n")
    (tmp_path / "d.json").write_text(json.dumps({"training": [{"image": "f/a.png", "label": 0}]}))
    assert layouts.layout_of(str(tmp_path / "f")).name == "folder"
    assert layouts.layout_of(str(tmp_path / "l.csv")).name == "csv"
    assert layouts.layout_of(str(tmp_path / "d.json")).name == "datalist"
    assert layouts.layout_of(str(tmp_path / "f" / "a.png")) is None
    assert layouts.list_samples(str(tmp_path / "l.csv")).labels == [1]
    # an option of another layout than the path's is ignored; an unknown one refused
    assert layouts.list_samples(str(tmp_path / "l.csv"), section="validation").layout == "csv"
    listing = layouts.list_samples(str(tmp_path / "d.json"), section="training", label_key="label")
    assert (listing.layout, listing.labels) == ("datalist", [0])
    with pytest.raises(DataError, match=r"unknown layout option\(s\) \['sektion'\].*section: datalist"):
        layouts.list_samples(str(tmp_path / "d.json"), sektion="training")


def test_messages_name_every_layout(tmp_path):
    with pytest.raises(DataError, match="does not exist; expected " + EXPECTED.replace(".", r"\.").replace(
            "(", r"\(").replace(")", r"\)")):
        layouts.list_samples(str(tmp_path / "nope"))
    (tmp_path / "x.txt").write_text("")
    with pytest.raises(DataError, match=r"is neither a Hugging Face .*, a \.csv of path,label, a \.json MONAI datalist, "
                                        r"WebDataset .* nor a FiftyOne dataset"):
        layouts.list_samples(str(tmp_path / "x.txt"))
    with pytest.raises(cli.CliError, match=r"a \.txt file is not a data layout \(expected a Hugging Face"):
        cli._check_data_path(str(tmp_path / "x.txt"))


def test_a_new_layout_is_one_entry(tmp_path, monkeypatch):
    monkeypatch.setattr(layouts, "LAYOUTS", layouts.LAYOUTS + [LST])
    _touch(tmp_path / "img", ["a.png", "b.png"])
    (tmp_path / "data.lst").write_text("a.png 0\nb.png 1\n")
    data = load_dataset(tmp_path / "data.lst", check=False, prefix="img/")
    assert (data.layout, list(data.labels)) == ("lst", [0, 1])
    cli._check_data_path(str(tmp_path / "data.lst"))  # accepted by the CLI
    help_text = cli.build_parser()._subparsers._group_actions[0].choices["audit"].format_help()
    assert "a list of file label lines (.lst)" in " ".join(help_text.split())
    (tmp_path / "x.txt").write_text("")
    with pytest.raises(cli.CliError, match=r"a FiftyOne dataset \(fiftyone:NAME\) or a \.lst of 'file label' lines"):
        cli._check_data_path(str(tmp_path / "x.txt"))
    with pytest.raises(DataError, match="1 of the 1 files listed in list"):
        (tmp_path / "bad.lst").write_text("missing.png 0\n")
        load_dataset(tmp_path / "bad.lst", check=False)
