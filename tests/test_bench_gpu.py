"""The pure pieces of the GPU benchmarks (benchmarks/bench_gpu_*.py), run on the CPU at
tiny sizes: the neighbour search they time must be exact, and their tables must say what
was measured and what was extrapolated."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_gpu_neighbors  # noqa: E402


def test_the_timed_knn_is_exact_against_brute_force():
    torch.manual_seed(0)
    rows = bench_gpu_neighbors.clustered_rows(700, 24, torch.device("cpu"), torch.float32, clusters=5)
    rows[10] = rows[20]  # an exact duplicate: the other copy is a neighbour, the row itself is not
    ids = torch.tensor([0, 10, 20, 699])
    scores, found = bench_gpu_neighbors.knn_rows(rows, ids, 10, tile=128)
    full = rows[ids].double() @ rows.double().T
    full[torch.arange(4), ids] = float("-inf")
    expected = torch.topk(full, 10, dim=1)
    assert torch.equal(torch.sort(found, 1).values, torch.sort(expected.indices, 1).values)
    np.testing.assert_allclose(scores.numpy(), expected.values.numpy(), rtol=1e-5)
    assert 20 in found[1].tolist() and 10 not in found[1].tolist()
    truth = bench_gpu_neighbors.exact_truth(rows, ids, 10, tile=128)
    assert bench_gpu_neighbors.recall(found, truth) == 1.0


@pytest.mark.slow
def test_the_neighbour_table_says_what_it_extrapolated(tmp_path):
    out = tmp_path / "neighbors.md"
    code = bench_gpu_neighbors.main(["--device", "cpu", "--rows", "1500", "--dim", "16", "--block", "256",
                                     "--tile", "512", "--budget", "0", "--recall-queries", "20",
                                     "--pairwise-up-to", "0", "--out", str(out)])
    text = out.read_text()
    assert code == 0
    assert "| 1,500 | 16 | torch fp16 + re-rank | 256 |" in text and "(extrapolated)" in text
    assert "dry run, not a measurement" in text


def test_gpu_check_script_parses():
    for script in ("gpu_check.sh", "gpu_wheels.sh"):
        subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / script)], check=True)
