"""The d x d denoising factor (nnsim_hooks.exact.matrix_denoising) against a brute-force numpy oracle over
all pairs in float64, against 1/N_eff of the scalar path for d = 1, and from a stored index."""

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.utils.data import TensorDataset

import nnsim_hooks
from nnsim_hooks.exact import matrix_denoising as denoising
from nnsim_hooks.exact.matrix_denoising import index_matrix_denoising_factor, matrix_denoising_factor
from nnsim_hooks.errors import InputError


def oracle(jac: np.ndarray, kernel: str, include_self: bool) -> np.ndarray:
    """sum_j A_ij A_ij^T, A_ij = (sum_k K_ik)^{-1} K_ij, by explicit loops over pairs."""
    n, d, _ = jac.shape
    rows = jac.astype(np.float64)
    if kernel == "cosine":
        whitened = []
        for r in rows:
            vals, vecs = np.linalg.eigh(r @ r.T)
            whitened.append(vecs @ np.diag(vals**-0.5) @ vecs.T @ r)
        rows = np.stack(whitened)
    out = np.zeros((n, d, d))
    for i in range(n):
        ks = [rows[i] @ rows[j].T for j in range(n) if include_self or j != i]
        inv = np.linalg.inv(sum(ks))
        out[i] = sum((inv @ k) @ (inv @ k).T for k in ks)
    return out


def mlp(d_out: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, d_out)).double()


@pytest.mark.parametrize("kernel", ["raw", "cosine"])
@pytest.mark.parametrize("method", ["moment", "pairwise"])
@pytest.mark.parametrize("include_self", [True, False])
@pytest.mark.parametrize("d", [2, 3])
def test_matches_brute_force(kernel, method, include_self, d):
    rng = np.random.default_rng(d)
    # A shared component keeps sum_j K_ij well conditioned, as for a trained network.
    jac = rng.normal(size=(23, d, 17)) + 2.0 * rng.normal(size=(1, d, 17))
    got = matrix_denoising_factor(torch.from_numpy(jac), kernel=kernel, include_self=include_self, method=method,
                                  block_size=5)
    want = oracle(jac, kernel, include_self)
    np.testing.assert_allclose(got.matrix.numpy(), want, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(got.trace.numpy(), np.trace(want, axis1=1, axis2=2) / d, rtol=1e-9)
    # A covariance ratio: symmetric, positive semi-definite.
    np.testing.assert_allclose(got.matrix.numpy(), got.matrix.transpose(1, 2).numpy(), atol=1e-10)
    assert np.linalg.eigvalsh(got.matrix.numpy()).min() > -1e-10


def test_handle_path_matches_torch_func_jacobians():
    model = mlp(2)
    x = torch.randn(19, 3, dtype=torch.float64)
    params = dict(model.named_parameters())

    def f(p, xi):
        return torch.func.functional_call(model, p, (xi[None],))[0]

    jac = torch.vmap(torch.func.jacrev(f), in_dims=(None, 0))(params, x)  # name -> [N, 2, *shape]
    flat = torch.cat([jac[n].reshape(19, 2, -1) for n in params], dim=2)
    want = oracle(flat.detach().numpy(), "raw", True)
    with nnsim_hooks.attach(model, output="full", batch_size=7) as h:  # 3 chunks
        from_handle = matrix_denoising_factor(h, x)
        grads = h.per_sample_gradients(x)
    from_dict = matrix_denoising_factor(grads, d=2)
    np.testing.assert_allclose(from_handle.matrix.numpy(), want, rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(from_dict.matrix.numpy(), want, rtol=1e-8, atol=1e-12)


def test_d1_reduces_to_inverse_effective_neighbours():
    model = mlp(1)
    x = torch.randn(25, 3, dtype=torch.float64)
    with nnsim_hooks.attach(model, output="sum") as h:
        cos = h.similarity(x).numpy()
        grads = h.per_sample_gradients(x)
        flat = torch.cat([g.reshape(25, -1) for g in grads.values()], dim=1).numpy()
        raw = flat @ flat.T
        for kernel, k in (("cosine", cos), ("raw", raw)):
            got = matrix_denoising_factor(h, x, kernel=kernel)
            n_eff = k.sum(1) ** 2 / (k**2).sum(1)
            np.testing.assert_allclose(got.matrix[:, 0, 0].numpy(), 1 / n_eff, rtol=1e-9)
            np.testing.assert_allclose(got.trace.numpy(), 1 / n_eff, rtol=1e-9)


def test_differs_from_scalar_trace_kernel_at_d2():
    """Tr(F)/d is not 1/N_eff of the scalar Tr(K_C)/d kernel (why both exist)."""
    model = mlp(2, seed=3)
    x = torch.randn(30, 3, dtype=torch.float64)
    with nnsim_hooks.attach(model, output="full") as h:
        k = h.similarity(x).numpy()
        got = matrix_denoising_factor(h, x, kernel="cosine").trace.numpy()
    scalar = (k**2).sum(1) / k.sum(1) ** 2
    assert np.abs(got / scalar - 1).max() > 1e-3


@pytest.mark.parametrize("d_out,moment_limit", [(1, 4096), (2, 4096), (2, 8)])
def test_index_path_matches_exact_jacobians(d_out, moment_limit, monkeypatch):
    monkeypatch.setattr(denoising, "MOMENT_LIMIT", moment_limit)  # 8: the blocks-of-pairs path
    model = mlp(d_out).float()
    x = torch.randn(40, 3)
    # 71 parameters <= sketch_dim: the stored features are the exact (whitened) Jacobians.
    with nnsim_hooks.attach(model, output="full" if d_out > 1 else "sum", sketch_dim=128) as h:
        idx = h.build_index(TensorDataset(x), progress=False)
        want = matrix_denoising_factor(h, x, kernel="cosine")
    got = index_matrix_denoising_factor(idx)
    np.testing.assert_allclose(got.matrix.numpy(), want.matrix.numpy(), rtol=2e-4, atol=1e-7)
    if d_out == 1:
        np.testing.assert_allclose(got.trace.numpy(), idx.denoising_factor(), rtol=1e-6)
    no_self = index_matrix_denoising_factor(idx, include_self=False)
    with nnsim_hooks.attach(model, output="full" if d_out > 1 else "sum") as h:
        want_no_self = matrix_denoising_factor(h, x, kernel="cosine", include_self=False)
    np.testing.assert_allclose(no_self.matrix.numpy(), want_no_self.matrix.numpy(), rtol=2e-4, atol=1e-7)
    with pytest.raises(InputError, match="whitened"):
        index_matrix_denoising_factor(idx, kernel="raw")


def test_zero_gradient_sample_is_nan_and_nobody_s_neighbour():
    rng = np.random.default_rng(0)
    jac = rng.normal(size=(12, 2, 9)) + 2.0 * rng.normal(size=(1, 2, 9))
    jac[4] = 0.0
    for kernel in ("raw", "cosine"):
        with pytest.warns(RuntimeWarning, match="singular"):
            got = matrix_denoising_factor(torch.from_numpy(jac), kernel=kernel)
        assert torch.isnan(got.trace[4]) and torch.isfinite(torch.cat([got.trace[:4], got.trace[5:]])).all()
        keep = np.r_[0:4, 5:12]
        want = oracle(jac[keep], kernel, True)
        np.testing.assert_allclose(got.matrix.numpy()[keep], want, rtol=1e-9, atol=1e-12)


def test_bad_input_says_what_to_do():
    jac = torch.randn(5, 2, 4)
    with pytest.raises(InputError, match="kernel"):
        matrix_denoising_factor(jac, kernel="normalized")
    with pytest.raises(InputError, match="d="):
        matrix_denoising_factor({"w": torch.randn(5, 2, 4)})
    with pytest.raises(InputError, match=r"\[N, d, P\]"):
        matrix_denoising_factor(torch.randn(5, 8))
    with pytest.raises(InputError, match="method"):
        matrix_denoising_factor(jac, method="fast")
    with pytest.raises(InputError, match="inputs"):
        with nnsim_hooks.attach(mlp(2), output="full") as h:
            matrix_denoising_factor(h)
