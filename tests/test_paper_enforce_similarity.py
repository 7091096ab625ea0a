"""paper/enforce_similarity.py --small runs end to end and writes its table and figure."""

import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_small_run_writes_table_and_figure(tmp_path):
    spec = importlib.util.spec_from_file_location("enforce_similarity", os.path.join(ROOT, "paper", "enforce_similarity.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--small", "--out", str(tmp_path)]) == 0
    table = (tmp_path / "enforce_similarity.md").read_text()
    assert "| 20 |" in table and "paper MNIST" in table and "--small" in table
    assert (tmp_path / "enforce_similarity.png").stat().st_size > 5_000
