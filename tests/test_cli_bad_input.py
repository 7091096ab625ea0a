"""Bad input on the command line (issue 17): a one-line error and exit code 1, or argparse's
usage and exit code 2, never a Python traceback; ``--debug`` shows the traceback. The
argument parsing is fuzzed in-process with hypothesis, with the heavy steps (training,
extraction, loading the data) replaced by a stub that stops the run."""

from __future__ import annotations

import json
import os
import threading
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nnsim_hooks import cli, integrations
from nnsim_hooks.audit import demo, run
from nnsim_hooks.errors import DataError, InputError, StoreError
from nnsim_hooks.index.folder.lock import FolderLock


class Reached(BaseException):
    """The run got past every argument check to a heavy step (not an Exception: main lets it through)."""


@pytest.fixture()
def stubbed(monkeypatch):
    def stop(*args, **kwargs):
        raise Reached()

    monkeypatch.setattr(demo, "run_demo", stop)
    monkeypatch.setattr(run, "audit", stop)
    monkeypatch.setattr(integrations, "load_dataset", stop)


@pytest.fixture(scope="module")
def data_folder(tmp_path_factory):
    integrations.register_timm_rules()  # as loading a timm: model does; here, not inside one test
    root = tmp_path_factory.mktemp("cli_fuzz")
    for c in "ab":
        (root / "npy" / c).mkdir(parents=True)
        for i in range(2):
            np.save(root / "npy" / c / f"{i}.npy", np.zeros((4, 4), np.float32))
    (root / "list.csv").write_text("path,path,label\nnpy/a/0.npy,npy/a/1.npy,0\n")
    (root / "notes.txt").write_text("x")
    (root / "kwargs.json").write_text("{}")
    return root


def run_cli(argv, capsys):
    """``(exit code, stderr)`` of ``nnsim *argv``; Reached counts as exit code 0."""
    try:
        code = cli.main(argv)
    except SystemExit as exc:  # argparse: usage errors, --help, --version
        code = exc.code
    except Reached:
        code = 0
    return code, capsys.readouterr().err


def assert_clean(code, err):
    assert "Traceback" not in err and "This is unexpected" not in err, err
    if code == 1:
        assert err.startswith("nnsim: error: "), err
    else:
        assert code in (0, 2), (code, err)


# -- each case the probe found ---------------------------------------------------


@pytest.mark.parametrize("args, message", [
    (["audit", "--threshold", "label_issue="], r"--threshold 'label_issue=': no value after '='"),
    (["audit", "--out", ""], r"--out is empty"),
    (["audit", "--data", "{data}", "--model", ":"], r"model spec ':': '' is not a module"),
    (["audit", "--data", "{data}", "--model", "os:"], r"model spec 'os:': '' is not a function"),
    (["audit", "--data", "{data}", "--model", "..x:f"], r"'..x' is not a module"),
    (["audit", "--data", "{data}", "--model", "os:path..join"], r"'path..join' is not a function"),
])
def test_each_bad_value_is_one_line(args, message, stubbed, data_folder, capsys):
    args = [a.replace("{data}", str(data_folder / "npy")) for a in args]
    code, err = run_cli(args + ["--out", str(data_folder / "out")] if "--out" not in args else args, capsys)
    assert code == 1 and "Traceback" not in err
    assert err.startswith("nnsim: error: ")
    import re

    assert re.search(message, err), err


def test_debug_prints_the_traceback(stubbed, data_folder, capsys):
    args = ["audit", "--data", str(data_folder / "npy"), "--model", ":", "--out", str(data_folder / "out")]
    with pytest.raises(InputError, match="is not a module"):
        cli.main(args + ["--debug"])
    with pytest.raises(InputError, match="is not a module"):
        cli.main(["--debug"] + args)


def test_an_unexpected_error_is_one_line_that_points_to_debug(monkeypatch, capsys, tmp_path):
    def broken(*args, **kwargs):
        raise KeyError("boom")

    monkeypatch.setattr(demo, "run_demo", broken)
    code, err = run_cli(["audit", "--out", str(tmp_path / "o")], capsys)
    assert code == 1 and "Traceback" not in err
    assert err.startswith("nnsim: error: KeyError: 'boom'") and "--debug" in err


def test_duplicate_csv_headers_are_refused(data_folder):
    from nnsim_hooks.integrations.layouts.csv_file import read_csv

    with pytest.raises(DataError, match=r"has 2 path columns: 'path' \(column 1\), 'path' \(column 2\)"):
        read_csv(str(data_folder / "list.csv"))
    other = data_folder / "labels.csv"
    other.write_text("image,label,class\nnpy/a/0.npy,0,a\n")
    with pytest.raises(DataError, match=r"has 2 label columns: 'label' \(column 2\), 'class' \(column 3\)"):
        read_csv(str(other))


def test_a_factory_string_with_more_lists_than_rows_is_an_input_error():
    from index_synthetic import clustered_rows
    from nnsim_hooks.index import GradientIndex

    with pytest.raises(InputError, match=r"cannot train the index 'IVF100,Flat' on the 40 valid rows .*Number of "
                                         r"training points \(40\).*fewer lists"):
        GradientIndex.from_features(clustered_rows(40, 8, seed=2), index="IVF100,Flat")


def test_a_refused_writer_names_a_holder_still_writing_its_record(tmp_path):
    """The holder takes the lock, then writes its record: a writer refused in between waits for it."""
    import fcntl

    folder = tmp_path / "ix"
    folder.mkdir()
    fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    record = {"pid": 4242, "host": "elsewhere", "purpose": "build_index", "since": "now"}
    writer = threading.Timer(0.2, lambda: os.pwrite(fd, json.dumps(record).encode(), 0))
    writer.start()
    try:
        with pytest.raises(StoreError, match=r"is being written by process 4242 on host elsewhere \(build_index"):
            FolderLock(folder).acquire()
    finally:
        writer.join()
        os.close(fd)


# -- fuzzing --------------------------------------------------------------------------------

_MODELS = ["", ":", "a:", ":b", "timm:", "torchvision:", "monai:", "os:getcwd", "os.path:join", "..:x", "x..y:z",
           ".rel:f", "nnsim_hooks.nope:f", "json:loads", "math:pi", "nnsim_hooks.errors:InputError", "torch.nn:Identity",
           "bundle:/nonexistent", "timm:no_such_model_xyz", "torchvision:no_such_model", "torch.nn:Linear.nope"]
_TEXT = st.sampled_from(["", " ", "=", ":", ",", ",,", "-1", "0", "1", "2", "1e400", "nan", "inf", "-inf", "none",
                         "8GB", "0GB", "-3MB", "1.5", "64,64", "0,0", "1,2,3,4", "a,b", "a,a", "{}", "[]", "{\"x\": 1}",
                         "null", "label_issue=0.6", "label_issue=", "label_issue=2", "duplicate_quantile=none",
                         "nope=1", "=1", "flat", "ivf", "IVF100,Flat", "HNSW0,Flat", "é", "\x00", "--", "-"]) | st.text(max_size=8)
_FLAGS = {
    "--out": None, "--overwrite": False, "--data": None, "--classes": _TEXT, "--model": st.sampled_from(_MODELS),
    "--model-kwargs": _TEXT, "--checkpoint": None, "--num-classes": _TEXT, "--image-size": _TEXT,
    "--spatial-size": _TEXT, "--noise": _TEXT, "--epochs": _TEXT, "--limit": _TEXT, "--seed": _TEXT, "--k": _TEXT,
    "--sketch-dim": _TEXT, "--batch-size": _TEXT, "--max-memory": _TEXT, "--output": _TEXT, "--threshold": _TEXT,
    "--decisions": None, "--no-progress": False, "-v": False,
}


@st.composite
def audit_args(draw, root):
    paths = st.sampled_from([str(root / "npy"), str(root / "list.csv"), str(root / "notes.txt"), str(root / "missing"),
                             str(root / "kwargs.json"), "", str(root)])
    argv = ["audit", "--out", str(root / "out")]
    if draw(st.booleans()):  # past the demo: the data and model checks
        argv += ["--data", str(root / "npy"), "--model", draw(st.sampled_from(_MODELS))]
    for flag in draw(st.lists(st.sampled_from(sorted(_FLAGS)), max_size=6)):
        values = _FLAGS[flag]
        if values is False:
            argv.append(flag)
        else:
            argv += [flag, draw(paths if values is None else values)]
    return argv


@st.composite
def index_args(draw, root):
    argv = ["index"] + draw(st.lists(st.sampled_from(["merge", str(root), str(root / "missing"), "--index",
                                                      "--keep-shards", "--no-progress", "-v", "--nope"]), max_size=4))
    if draw(st.booleans()):
        argv += ["--index", draw(_TEXT)]
    return argv


_FUZZ = settings(max_examples=40, deadline=None,
                 suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@_FUZZ
@given(data=st.data())
def test_random_audit_arguments_never_print_a_traceback(stubbed, data_folder, capsys, data):
    assert_clean(*run_cli(data.draw(audit_args(data_folder)), capsys))


@_FUZZ
@given(data=st.data())
def test_random_index_arguments_never_print_a_traceback(stubbed, data_folder, capsys, data):
    assert_clean(*run_cli(data.draw(index_args(data_folder)), capsys))


@pytest.mark.slow
@settings(_FUZZ, max_examples=400)
@given(data=st.data())
def test_many_random_arguments_never_print_a_traceback(stubbed, data_folder, capsys, data):
    argv = data.draw(st.one_of(audit_args(data_folder), index_args(data_folder)))
    if data.draw(st.booleans()):  # shuffled: flags before the subcommand, values without their flag
        argv = data.draw(st.permutations(argv))
    assert_clean(*run_cli(argv, capsys))
