"""audit(index=PATH) and ``nnsim audit --index PATH``: the audit of a stored index folder,
with no model; --recall, --exact-neighbors, --dry-run and their bad input."""

import json

import numpy as np
import pytest

import nnsim_hooks
from index_synthetic import clustered_rows, softmax
from nnsim_hooks.audit.analysis import analyse
from nnsim_hooks.cli.commands import main
from nnsim_hooks.errors import InputError, StoreError
from nnsim_hooks.index import GradientIndex, load_index

N, D = 240, 16


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("stored") / "ix"
    GradientIndex.from_features(clustered_rows(N, D, seed=3), labels=rng.integers(0, 3, N),
                                probabilities=softmax(rng.standard_normal((N, 3))), path=path)
    return path


@pytest.mark.slow
def test_audit_of_a_stored_index_equals_the_analysis_of_the_loaded_index(folder, tmp_path):
    result = nnsim_hooks.audit(index=folder, out_dir=tmp_path / "out", k=5, progress=False)
    direct = analyse(load_index(folder), k=5)
    for column in ("label_issue_score", "similarity_1", "similarity_5", "neighbor_1", "effective_neighbors",
                   "denoising_factor"):
        np.testing.assert_allclose(result.table[column].to_numpy(dtype=float), direct.table[column].to_numpy(dtype=float),
                                   equal_nan=True)
    np.testing.assert_allclose(result.table["denoising_factor"], 1 / result.table["effective_neighbors"])
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["neighbors"]["method"] == "exact" and summary["neighbors"]["recall_measured"] == 1.0
    assert summary["index_path"] == str(folder.resolve())
    assert not (tmp_path / "out" / "index").exists(), "the stored index is referred to, not copied"
    assert "Neighbours were searched exactly" in (tmp_path / "out" / "report.html").read_text()


def test_bad_arguments_name_the_value(folder, tmp_path):
    with pytest.raises(InputError, match=r"recall .*\(0, 1\].*1\.5"):
        nnsim_hooks.audit(index=folder, recall=1.5, progress=False)
    with pytest.raises(InputError, match="not both"):
        nnsim_hooks.audit(object(), index=folder)
    with pytest.raises(InputError, match="no index there"):
        nnsim_hooks.audit(index=tmp_path, progress=False)
    with pytest.raises(StoreError, match="holding the index"):
        nnsim_hooks.audit(index=folder, out_dir=folder, progress=False)


@pytest.mark.slow
def test_cli_audit_index_dry_run_and_errors(folder, tmp_path, capsys):
    assert main(["audit", "--index", str(folder), "--dry-run", "--k", "5"]) == 0
    text = capsys.readouterr().out
    assert f"N = {N:,}, D = {D}" in text and "neighbours (exact)" in text and "effective neighbours" in text
    assert not (tmp_path / "nnsim-audit").exists()
    out = tmp_path / "o"
    assert main(["audit", "--index", str(folder), "--out", str(out), "--k", "4", "--no-progress",
                 "--exact-neighbors"]) == 0
    assert "neighbours        exact search" in capsys.readouterr().out
    assert json.loads((out / "summary.json").read_text())["k"] == 4
    assert main(["audit", "--index", str(folder), "--recall", "0", "--out", str(tmp_path / "p")]) == 1
    assert "recall must be a number in (0, 1]" in capsys.readouterr().err
    assert main(["audit", "--index", str(folder), "--model", "timm:resnet18"]) == 1
    assert "--model" in capsys.readouterr().err
    assert main(["audit", "--dry-run"]) == 1
    assert "--dry-run needs --index" in capsys.readouterr().err


@pytest.mark.slow
def test_large_index_is_searched_approximately_with_its_recall_measured(tmp_path):
    rng = np.random.default_rng(1)
    centres = rng.standard_normal((40, 48))
    x = centres[rng.integers(0, 40, 4000)] + 0.6 * rng.standard_normal((4000, 48))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    GradientIndex.from_features(x, labels=rng.integers(0, 3, 4000), path=tmp_path / "ix")
    result = nnsim_hooks.audit(index=tmp_path / "ix", exact_neighbors=False, recall=0.9, progress=False)
    plan = result.summary["neighbors"]
    assert plan["method"] == "partition" and plan["recall_sample"] > 0
    # brute force: the share of the table's neighbours that reach each row's exact 10th similarity
    s = x.astype(np.float64) @ x.astype(np.float64).T
    np.fill_diagonal(s, -np.inf)
    kth = np.sort(s, axis=1)[:, -10]
    sims = result.table[[f"similarity_{j}" for j in range(1, 11)]].to_numpy(dtype=float)
    found = float((sims >= kth[:, None] - 1e-5).mean())
    assert found >= 0.85 and abs(found - plan["recall_measured"]) < 0.06


def test_dry_run_estimates_follow_the_operation_counts():
    from nnsim_hooks.audit.cost_estimate import ASSUMED_NPROBE, audit_steps

    rate = 1e10
    steps = {name: sec for name, sec, _ in audit_steps(10**6, 1024, 10, 0.95, 1024, rate, rate)}
    nlist = 4000  # 4·sqrt(N)
    search = 2.0 * 10**6 * (ASSUMED_NPROBE + 1) * (10**6 / nlist) * 1024 / rate * 1.3
    assert steps["neighbours: partition search"] == pytest.approx(search)
    assert steps["effective neighbours (N_eff)"] == pytest.approx(4 * 10**6 * 1024**2 / rate)
    exact = {name: sec for name, sec, _ in audit_steps(10**6, 1024, 10, 1.0, 1024, rate, rate)}
    assert exact["neighbours (exact)"] == pytest.approx(2.0 * 10**12 * 1024 / rate)
