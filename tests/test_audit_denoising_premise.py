"""The denoising check's premise test (the paper's consistency check read as a yes or no):
its arrays against direct formulas, and the whole audit on a model where it holds (the
demo's digits CNN) and one where it fails (gradients nearly the same for every sample)."""

import json
import math

import numpy as np
import pytest
import torch

import nnsim_hooks
from audit_fixtures import trained_digits
from nnsim_hooks.audit.checks import denoising


def kernel_residual(kernel: np.ndarray, values: np.ndarray) -> np.ndarray:
    """``|| p_i - sum_j K_ij p_j / sum_j K_ij ||`` by a full product (the oracle)."""
    avg = kernel @ values / kernel.sum(1, keepdims=True)
    return np.linalg.norm(values - avg, axis=1)


def test_prediction_spread_against_direct_formula():
    rng = np.random.default_rng(0)
    values = rng.random((23, 4))
    valid = np.ones(23, dtype=bool)
    valid[[2, 9]] = False
    values[9] = np.nan  # an invalid row may hold anything
    spread = denoising.prediction_spread(values, valid, block=5)  # blocks that do not divide N
    mean = values[valid].mean(0)
    np.testing.assert_allclose(spread[valid], np.linalg.norm(values[valid] - mean, axis=1), rtol=1e-12)
    assert np.isnan(spread[~valid]).all()
    assert np.isnan(denoising.prediction_spread(values, np.zeros(23, dtype=bool))).all()


def test_uniform_kernel_fails_and_exact_averages_pass():
    """A kernel that sees every sample alike averages to the mean: its residual is the
    spread, ratio 1, the premise fails. Values that are kernel averages of themselves
    (the fixed points of a block kernel: one value per block) give residual 0."""
    rng = np.random.default_rng(1)
    values = rng.random((40, 3))
    spread = denoising.prediction_spread(values)
    uniform = kernel_residual(np.ones((40, 40)), values)
    np.testing.assert_allclose(uniform, spread, rtol=1e-12)
    premise = denoising.averaging_premise(uniform, spread)
    assert premise["residual_to_spread"] == pytest.approx(1.0) and premise["holds"] is False

    blocks = np.repeat(np.arange(4), 10)
    block_kernel = (blocks[:, None] == blocks[None, :]).astype(float)
    fixed = rng.random((4, 3))[blocks]
    premise = denoising.averaging_premise(kernel_residual(block_kernel, fixed), denoising.prediction_spread(fixed))
    assert premise["residual_to_spread"] == pytest.approx(0.0, abs=1e-12) and premise["holds"] is True

    # a ratio just either side of the limit
    at = np.full(5, denoising.PREMISE_LIMIT)
    assert denoising.averaging_premise(at * 0.99, np.ones(5))["holds"] is True
    assert denoising.averaging_premise(at * 1.01, np.ones(5))["holds"] is False


def test_premise_unknown_without_values():
    nan = np.full(4, np.nan)
    premise = denoising.averaging_premise(nan, np.ones(4))
    assert premise["holds"] is None and math.isnan(premise["residual_to_spread"])
    assert denoising.averaging_premise(np.ones(4), np.zeros(4))["holds"] is None  # all predictions equal


class SameGradients(torch.nn.Module):
    """A classifier whose output is its bias plus a tiny function of the input: every
    sample's gradient is (nearly) that of the bias, and one class wins everywhere."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(64, 10)
        with torch.no_grad():
            self.linear.bias.copy_(torch.tensor([5.0] + [0.0] * 9))

    def forward(self, x):
        return self.linear(1e-3 * x.flatten(1))


def codes(summary):
    return [w["code"] for w in summary["warnings"]]


@pytest.mark.slow
def test_premise_holds_on_the_digits_cnn(tmp_path):
    model, data = trained_digits()
    ds = torch.utils.data.TensorDataset(data.images, torch.as_tensor(data.noisy_labels))
    result = nnsim_hooks.audit(model, ds, progress=False, sketch_dim=512, k=10)
    den = result.summary["denoising"]
    t = result.table
    # the summary's ratio is that of the table's columns
    assert den["averaging_premise"]["residual_to_spread"] == pytest.approx(
        np.nanmedian(t["consistency"]) / np.nanmedian(t["prediction_spread"]))
    assert den["averaging_premise"]["residual_to_spread"] < 0.6  # 0.46 measured
    assert den["estimate_applies"] is True and "denoising_premise_fails" not in codes(result.summary)
    assert 0.9 < den["predicted_agreement_with_clean_labels"] <= 1.0
    assert "does not apply" not in result.report_html()


@pytest.mark.slow
def test_premise_fails_where_all_gradients_are_alike(tmp_path):
    _, data = trained_digits()
    ds = torch.utils.data.TensorDataset(data.images, torch.as_tensor(data.noisy_labels))
    result = nnsim_hooks.audit(SameGradients(), ds, progress=False, sketch_dim=512, k=10)
    den = result.summary["denoising"]
    # the most optimistic estimate possible: every sample an equal neighbour ...
    assert den["median_effective_neighbors"] > 0.95 * len(ds)
    # ... and the check that says it does not apply
    assert den["averaging_premise"]["residual_to_spread"] > 0.95
    assert den["estimate_applies"] is False and "denoising_premise_fails" in codes(result.summary)
    assert den["predicted_agreement_with_clean_labels"] is None or math.isnan(den["predicted_agreement_with_clean_labels"])
    assert "does not apply" in result.report_html()
    assert any("does not apply" in line for line in denoising.CHECK.summary_lines(result.summary))
    result.save(tmp_path / "audit")
    saved = json.loads((tmp_path / "audit" / "summary.json").read_text())
    assert saved["denoising"]["estimate_applies"] is False
    assert saved["denoising"]["predicted_agreement_with_clean_labels"] is None
