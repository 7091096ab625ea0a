"""Listing a --data folder with symlinks (issue 17): each real folder and file is listed
once, under the class folder it lives in; links that lead back (loops) or to something
already listed are skipped with one warning. Real symlinks in tmp_path."""

from __future__ import annotations

import logging
import os
import signal
from contextlib import contextmanager

import numpy as np
import pytest

from nnsim_hooks.integrations.layouts.data_folder import read_folder


class TooLong(Exception):
    """Not an OSError: os.walk swallows those."""


@contextmanager
def at_most(seconds):
    """Fail instead of hanging (today's walk never finishes on two loops)."""
    def stop(*_):
        raise TooLong(f"the listing took more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def dataset(root, files=(("a", "x"), ("a", "y"), ("b", "z"))):
    for cls, name in files:
        (root / cls).mkdir(parents=True, exist_ok=True)
        np.save(root / cls / f"{name}.npy", np.zeros(2, np.float32))
    return root


def listed(root):
    with at_most(20):
        listing = read_folder(str(root))
    return sorted((os.path.relpath(p, root), label) for p, label in zip(listing.paths, listing.labels))


def test_one_loop_lists_each_file_once(tmp_path, caplog):
    root = dataset(tmp_path / "data")
    os.symlink(root / "a", root / "a" / "loop")  # a/loop -> a
    with caplog.at_level(logging.WARNING):
        assert listed(root) == [("a/x.npy", 0), ("a/y.npy", 0), ("b/z.npy", 1)]
    assert "1 folder links lead to folders already listed" in caplog.text and "a/loop" in caplog.text


def test_two_loops_finish(tmp_path, caplog):
    root = dataset(tmp_path / "data")
    (root / "a" / "deep").mkdir()
    np.save(root / "a" / "deep" / "w.npy", np.zeros(2, np.float32))
    os.symlink(root / "a", root / "a" / "deep" / "up")
    os.symlink("..", root / "a" / "deep" / "parent")
    with caplog.at_level(logging.WARNING):
        assert listed(root) == [("a/deep/w.npy", 0), ("a/x.npy", 0), ("a/y.npy", 0), ("b/z.npy", 1)]
    assert "2 folder links" in caplog.text


def test_a_link_to_another_class_or_the_root_does_not_move_its_files(tmp_path, caplog):
    root = dataset(tmp_path / "data")
    os.symlink(root / "b", root / "a" / "to_b")
    os.symlink(root, root / "a" / "to_root")
    with caplog.at_level(logging.WARNING):
        assert listed(root) == [("a/x.npy", 0), ("a/y.npy", 0), ("b/z.npy", 1)]
    assert "a/to_b" in caplog.text and "a/to_root" in caplog.text


def test_a_file_linked_twice_is_listed_once(tmp_path, caplog):
    root = dataset(tmp_path / "data")
    os.symlink(root / "a" / "x.npy", root / "a" / "x_again.npy")
    with caplog.at_level(logging.WARNING):
        assert listed(root) == [("a/x.npy", 0), ("a/y.npy", 0), ("b/z.npy", 1)]
    assert "1 files are links to files already listed" in caplog.text


def test_linked_folders_outside_the_root_are_still_followed(tmp_path, caplog):
    """Datasets assembled from links keep working, in os.walk's order; no warning."""
    outside = dataset(tmp_path / "elsewhere", files=(("c", "q"), ("c", "r")))
    root = dataset(tmp_path / "data")
    os.symlink(outside / "c", root / "a" / "more")
    (root / "a" / "sub").mkdir()
    np.save(root / "a" / "sub" / "s.npy", np.zeros(2, np.float32))
    with caplog.at_level(logging.WARNING):
        listing = read_folder(str(root))
    order = [os.path.relpath(p, root) for p in listing.paths]
    want = []
    for dirpath, dirnames, filenames in os.walk(root / "a", followlinks=True):
        dirnames.sort()
        want += [os.path.relpath(os.path.join(dirpath, f), root) for f in sorted(filenames)]
    assert order == want + ["b/z.npy"]
    assert "a/more/q.npy" in order and caplog.text == ""
