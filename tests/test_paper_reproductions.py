"""Each reproduction of paper/ in its --small version: it writes its table and figure, its
numbers are sane, and the effect the paper reports shows where it is robust at that size."""

import json

import numpy as np
import pytest
import torch

from paper import circle_toy, matrix_denoising, registration

pytestmark = pytest.mark.slow  # each reproduction runs in its --small version


@pytest.fixture(autouse=True)
def _one_thread():
    """Small sequential work: a second thread only contends with the other tests' processes."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def outputs_exist(out, name):
    md, png = out / f"{name}.md", out / f"{name}.png"
    assert md.stat().st_size > 200 and png.stat().st_size > 5000
    text = md.read_text()
    assert f"python -m paper.{name} --small" in text  # the command that produced it
    assert "| " in text and "nan" not in text.lower()
    return text


def test_circle_toy_density_drops_where_the_target_curves(tmp_path):
    results = circle_toy.main(["--small", "--out", str(tmp_path)])
    outputs_exist(tmp_path, "circle_toy")
    r1 = results[1]
    n = len(r1["curvature"])
    assert np.all(r1["median"]["soft"] > 0) and np.all(r1["median"]["soft"] <= n)
    for t_low, t_high in zip(circle_toy.THRESHOLDS, circle_toy.THRESHOLDS[1:]):
        # a higher threshold never counts more neighbours (self excluded: at most n - 1)
        assert np.all(r1["median"][f"hard t={t_high}"] <= r1["median"][f"hard t={t_low}"])
    assert r1["median"]["hard t=0.5"].max() <= n - 1
    assert np.all(np.median(np.stack([r["loss"] for r in results.values()]), 1) < 0.1)  # it fitted
    # The paper's effect, on the soft density at f = 1: fewer neighbours where the target curves,
    # over the whole circle (Spearman) and at the curvature peaks (local dip; chance is 0.5).
    assert r1["rho"]["soft"] < -0.4
    assert r1["dip"]["soft"] >= 0.8
    saved = json.loads((tmp_path / "circle_toy.json").read_text())
    assert set(saved["soft_by_epoch"]) == {"50", "150"}  # the snapshot on the way and the end
    assert saved["soft_by_epoch"]["150"]["1"][0] == pytest.approx(r1["rho"]["soft"])


def test_local_dip_counts_the_peaks_below_their_neighbourhood():
    alpha = np.linspace(0, 1, 400, endpoint=False)
    f = 2
    _, _, curvature = circle_toy.circle_data(alpha, f)
    assert circle_toy.local_dip(alpha, -curvature, curvature, f) == 1.0  # a dip at every peak
    assert circle_toy.local_dip(alpha, curvature, curvature, f) == 0.0  # a bump at every peak
    noise = np.random.default_rng(0).normal(size=(200, 400))
    chance = np.mean([circle_toy.local_dip(alpha, n, curvature, f) for n in noise])
    assert 0.4 < chance < 0.6  # no relation: about half below the local median


def test_registration_writes_accuracy_denoising_and_the_check(tmp_path):
    results = registration.main(["--small", "--out", str(tmp_path)])
    text = outputs_exist(tmp_path, "registration")
    assert "τ (px)" in text and "Residual / spread" in text
    assert results["params"] > 10 * 2 * results["n"]  # far more parameters than N·d, as the paper's U-Net
    for values in results["accuracy"].values():
        assert np.all(np.diff(values) >= 0) and 0 <= values[0] and values[-1] <= 1
    # Matrix Cauchy-Schwarz, (sum_j K_ij)(sum_j K_ij)^T <= N sum_j K_ij K_ij^T: the factor is at
    # least I/N (N equal neighbours), so Tr(F)/2 >= 1/N.
    trace = results["trace"]
    assert np.all(np.isfinite(trace)) and np.all(trace >= (1 - 1e-9) / len(trace))
    assert all(v >= 0 for v in results["measured"].values())
    # the verdict is the ratio of the medians against the limit, and the report says it
    premise = results["premise"]
    ratio = np.median(results["residual"]) / np.median(results["spread"])
    assert premise["residual_to_spread"] == pytest.approx(ratio)
    assert premise["holds"] == (ratio <= premise["limit"])
    assert ("is **valid**" in text) == premise["holds"] and ("is **not valid**" in text) == (not premise["holds"])


def test_matrix_denoising_index_path_agrees_and_differs_from_scalar(tmp_path):
    results = matrix_denoising.main(["--small", "--out", str(tmp_path)])
    outputs_exist(tmp_path, "matrix_denoising")
    reg = results["registration"]
    np.testing.assert_allclose(reg["matrix, cosine, from the index"], reg["matrix, cosine kernel K_C"], rtol=1e-3)
    np.testing.assert_allclose(reg["scalar 1/N_eff, cosine, from the index"], reg["scalar 1/N_eff, cosine Tr(K_C)/2"],
                               rtol=1e-3)
    circle = results["circle"]
    assert "matrix, cosine, from the index" not in circle  # 21k parameters: no exact index
    for r in (reg, circle):
        n = len(r["matrix, raw kernel (the authors')"])
        for name, values in r.items():
            if name != "params":  # every factor is at least 1/N (N equal neighbours), by Cauchy-Schwarz
                assert np.all(values >= (1 - 1e-6) / n), name
    # Barely trained at this size, every sample is nearly everyone's neighbour (factors ~ 1/N), yet
    # the matrix and scalar formulas still differ by far more than rounding (1e-4 here).
    ratio = circle["matrix, raw kernel (the authors')"] / circle["scalar 1/N_eff, cosine Tr(K_C)/2"]
    assert np.all(np.isfinite(ratio)) and np.abs(ratio - 1).max() > 1e-6
