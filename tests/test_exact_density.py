"""``Handle.density`` and ``Handle.consistency`` (two passes, no sketch) against independent
references: the row sums of ``similarity(exact=True)``, brute force over flattened
torch.func per-sample gradients, and the consistency formula written out on the N x N
raw kernel. Every model has far more parameters than the sketch dimension D = 1024, so a
sketch could not give these numbers to 1e-6."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import nnsim_hooks
from nnsim_hooks.errors import InputError
from core_oracles import REFERENCE_OUTPUTS, brute_cosine, brute_matrix_kernel, flatten_grads, func_per_sample_grads


def cnn(classes=4):
    """Convolutions (zero and reflect padding, depthwise), BatchNorm in eval, Linear layers:
    about 4,300 parameters."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1, padding_mode="reflect"),
        nn.Tanh(),
        nn.Conv2d(16, 16, 3, groups=16),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 128),
        nn.Tanh(),
        nn.Linear(128, classes),
    ).double().eval()


class Tokens(nn.Module):
    """Embedding (with a padding row) tied to the head, a Linear over tokens called twice."""

    def __init__(self, vocab=11, width=6):
        super().__init__()
        self.emb = nn.Embedding(vocab, width, padding_idx=0)
        self.mix = nn.Linear(width, width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        h = torch.tanh(self.mix(self.emb(ids)))
        h = torch.tanh(self.mix(h))
        return self.head(h).mean(1)


def vit():
    timm = pytest.importorskip("timm")
    return timm.create_model("test_vit", pretrained=False, num_classes=3, img_size=32).double().eval()


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.slow
@pytest.mark.parametrize("output", ["contrast", "full"])
def test_cnn_density_against_brute_force_and_similarity(output):
    model = cnn()
    assert _params(model) > 4 * 1024
    x = torch.randn(11, 3, 8, 8, dtype=torch.float64)
    flat = flatten_grads(func_per_sample_grads(model, x, REFERENCE_OUTPUTS[output]), None if output != "full" else 4)
    ref = brute_cosine(flat, flat) if output != "full" else brute_matrix_kernel(flat, flat)
    with nnsim_hooks.attach(model, output=output, batch_size=4) as h:
        rows = h.similarity(x, progress=False).sum(1).numpy()
        got = h.density(x, progress=False)
        without = h.density(x, include_self=False, batch_size=3, progress=False)
    assert got.dtype == np.float64 and got.shape == (11,)
    np.testing.assert_allclose(got, ref.sum(1).numpy(), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(got, rows, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(without, ref.sum(1).numpy() - 1.0, rtol=1e-6, atol=1e-9)


@pytest.mark.slow
@pytest.mark.parametrize("output", ["contrast", "full"])
def test_vit_density_matches_similarity_row_sums(output):
    model = vit()
    assert _params(model) > 100 * 1024
    x = torch.randn(6, 3, 32, 32, dtype=torch.float64)
    with nnsim_hooks.attach(model, output=output, batch_size=3) as h:
        assert "fallback" in h.coverage.summary()  # cls_token / pos_embed take the generic rule
        rows = h.similarity(x, progress=False).sum(1).numpy()
        got = h.density(x, progress=False)
    assert np.all(np.abs(rows) > 1e-3)
    np.testing.assert_allclose(got, rows, rtol=1e-6, atol=1e-9)


def test_density_with_embedding_tied_weights_and_a_module_called_twice():
    model = Tokens().double().eval()
    ids = torch.randint(0, 11, (9, 5))
    ids[0, :2] = 0  # padding rows get no gradient
    flat = flatten_grads(func_per_sample_grads(model, ids, REFERENCE_OUTPUTS["contrast"]))
    with nnsim_hooks.attach(model, batch_size=4) as h:
        got = h.density(ids, progress=False)
    np.testing.assert_allclose(got, brute_cosine(flat, flat).sum(1).numpy(), rtol=1e-6, atol=1e-9)


@pytest.mark.slow
def test_density_reads_datasets_and_loaders_in_order():
    model = cnn()
    x = torch.randn(10, 3, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 4, (10,))
    with nnsim_hooks.attach(model, batch_size=4) as h:
        ref = h.density(x, progress=False)
        from_dataset = h.density(TensorDataset(x, y), progress=False)
        from_loader = h.density(DataLoader(TensorDataset(x, y), batch_size=3), progress=False)
    np.testing.assert_allclose(from_dataset, ref, rtol=1e-10)
    np.testing.assert_allclose(from_loader, ref, rtol=1e-10)


def _dead_relu_net():
    """Samples with all-negative inputs reach no gradient at all (dead ReLUs, no last bias)."""
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1, bias=False)).double().eval()
    with torch.no_grad():
        model[0].weight.abs_()
        model[0].bias.zero_()
    x = torch.randn(6, 4, dtype=torch.float64).abs()
    x[[1, 4]] = -1.0
    return model, x


def test_zero_gradient_samples_are_nan_and_named():
    model, x = _dead_relu_net()
    flat = flatten_grads(func_per_sample_grads(model, x, REFERENCE_OUTPUTS["sum"]))
    alive = [0, 2, 3, 5]
    with nnsim_hooks.attach(model, batch_size=4) as h:
        with pytest.warns(RuntimeWarning, match=r"2 sample\(s\) \[1, 4\]"):
            got = h.density(x, progress=False)
        with pytest.warns(RuntimeWarning, match=r"\[1, 4\]"):
            cons = h.consistency(x, progress=False)
    assert np.isnan(got[[1, 4]]).all() and np.isnan(cons[[1, 4]]).all()
    ref = brute_cosine(flat[alive], flat[alive]).sum(1).numpy()
    np.testing.assert_allclose(got[alive], ref, rtol=1e-6)


def _brute_consistency(k, p, include_self=True):
    """``|p_i - sum_j K_ij p_j / sum_j K_ij|`` on the N x N raw kernel ``k``."""
    k = k.clone()
    if not include_self:
        k.fill_diagonal_(0.0)
    avg = (k @ p) / k.sum(1, keepdim=True)
    return torch.linalg.vector_norm(p - avg, dim=1).numpy(), avg.numpy()


@pytest.mark.slow
@pytest.mark.parametrize("include_self", [True, False])
def test_consistency_against_the_raw_kernel(include_self):
    model = cnn()
    x = torch.randn(9, 3, 8, 8, dtype=torch.float64)
    flat = flatten_grads(func_per_sample_grads(model, x, REFERENCE_OUTPUTS["contrast"]))
    k = flat @ flat.T
    with torch.no_grad():
        probs = torch.softmax(model(x), 1)
    ref, ref_avg = _brute_consistency(k, probs, include_self)
    values = torch.randn(9, 2, dtype=torch.float64)
    ref_values, _ = _brute_consistency(k, values, include_self)
    with nnsim_hooks.attach(model, batch_size=4) as h:
        got, avg = h.consistency(x, include_self=include_self, progress=False, return_average=True)
        got_values = h.consistency(x, values.numpy(), include_self=include_self, progress=False)
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(avg, ref_avg, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(got_values, ref_values, rtol=1e-6, atol=1e-12)


@pytest.mark.slow
def test_consistency_with_d_outputs_uses_the_matrix_kernel():
    """PAPER §3 for d outputs: ``(sum_j K_ij)^{-1} sum_j K_ij y_j`` with d x d blocks."""
    model = cnn(classes=3)
    x = torch.randn(8, 3, 8, 8, dtype=torch.float64)
    jac = flatten_grads(func_per_sample_grads(model, x, REFERENCE_OUTPUTS["full"]), 3)  # [N, 3, P]
    with torch.no_grad():
        y = model(x)  # output="full" averages the differentiated outputs themselves
    k = torch.einsum("imp,jnp->imjn", jac, jac)  # K_ij = J_i J_j^T
    num = torch.einsum("imjn,jn->im", k, y)
    den = k.sum(2)  # [N, d, d]
    avg = torch.linalg.solve(den, num.unsqueeze(2)).squeeze(2)
    ref = torch.linalg.vector_norm(y - avg, dim=1).numpy()
    with nnsim_hooks.attach(model, output="full", batch_size=3) as h:
        got = h.consistency(x, progress=False)
        with pytest.raises(InputError, match="d = 3 columns"):
            h.consistency(x, np.zeros((8, 2)), progress=False)
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-12)


@pytest.mark.slow
def test_bad_input_is_refused():
    model = cnn()
    x = torch.randn(6, 3, 8, 8, dtype=torch.float64)
    with nnsim_hooks.attach(model, batch_size=4) as h:
        with pytest.raises(InputError, match="empty"):
            h.density(x[:0], progress=False)
        with pytest.raises(InputError, match="same order"):
            h.density(DataLoader(TensorDataset(x), batch_size=2, shuffle=True), progress=False)
        with pytest.raises(InputError, match="5 rows but the data holds 6"):
            h.consistency(x, np.zeros((5, 2)), progress=False)
        with pytest.raises(InputError, match="NaN or Inf in rows \\[2\\]"):
            values = np.zeros((6, 2))
            values[2, 1] = np.nan
            h.consistency(x, values, progress=False)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            h.density(x, progress=False)  # no warning when every sample has a gradient


@pytest.mark.slow
def test_index_density_is_exact_with_the_handle_and_says_so():
    from nnsim_hooks.errors import IndexMismatchError

    model = cnn()
    x = torch.randn(8, 3, 8, 8, dtype=torch.float64)
    with nnsim_hooks.attach(model, batch_size=4) as h:
        idx = h.build_index(x, progress=False)
        sketched = idx.density()
        assert idx.density_method == "sketched, D=1024"
        exact = idx.density(handle=h, data=x, progress=False)
        assert idx.density_method == "exact"
        np.testing.assert_allclose(exact, h.density(x, progress=False), rtol=1e-12)
        assert np.abs(exact - sketched).max() > 1e-6  # the sketch is not exact: the test can tell them apart
        with pytest.raises(InputError, match="both handle= .* and data="):
            idx.density(handle=h)
        with pytest.raises(InputError, match="data= holds 5 samples but the index 8"):
            idx.density(handle=h, data=x[:5], progress=False)
    other = cnn()
    with nnsim_hooks.attach(other) as h2:
        h2.similarity(x[:2], progress=False)  # resolve the output
        with pytest.raises(IndexMismatchError):
            idx.density(handle=h2, data=x, progress=False)


@pytest.mark.slow
def test_audit_exact_density_column_and_summary():
    pytest.importorskip("pandas")
    from nnsim_hooks.audit.output_choice import contrast_predicted

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 3))
    x = torch.randn(24, 12)
    ds = TensorDataset(x, torch.randint(0, 3, (24,)))
    sketched = nnsim_hooks.audit(model, ds, progress=False, sketch_dim=64, k=3, save=False)
    exact = nnsim_hooks.audit(model, ds, progress=False, sketch_dim=64, k=3, save=False, exact_density=True)
    assert sketched.summary["density"] == "sketched, D=1024"
    assert exact.summary["density"] == "exact"
    assert "output, computed exactly (no sketch)" in exact.report_html()  # the header says how
    with nnsim_hooks.attach(model, output=contrast_predicted) as h:
        ref = h.density(x, progress=False, use_targets=False)
    np.testing.assert_allclose(exact.table["density"].to_numpy(), ref, rtol=1e-5)


class _Scaled(nn.Module):
    """A bare parameter on the root module: the root takes the generic (torch.func) rule."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 3)
        self.scale = nn.Parameter(torch.randn(3))

    def forward(self, x):
        return torch.tanh(self.lin(x)) * self.scale


def test_generic_rule_gradients_run_once_per_pass(monkeypatch):
    model = _Scaled().double().eval()
    x = torch.randn(6, 5, dtype=torch.float64)
    flat = flatten_grads(func_per_sample_grads(model, x, REFERENCE_OUTPUTS["contrast"]))
    with nnsim_hooks.attach(model, batch_size=6) as h:
        h.similarity(x, progress=False)  # the one-off checks of a new batch size
        runs = []
        original = h.engine._fallback
        monkeypatch.setattr(h.engine, "_fallback", lambda *a: runs.append(1) or original(*a))
        got = h.density(x, progress=False)
    assert len(runs) == 2  # pass 1 (self kernels and sums share it) and pass 2, not 3
    np.testing.assert_allclose(got, brute_cosine(flat, flat).sum(1).numpy(), rtol=1e-6, atol=1e-9)
