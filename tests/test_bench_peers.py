"""The pure pieces of benchmarks/bench_peers.py, in the project's own environment (the
peer packages are not installed here, and no peers venv is made)."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

import bench_peers  # noqa: E402
from peers import metrics, workload  # noqa: E402
from peers.base import dense_gaussian_projection  # noqa: E402


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 10)).eval()


def tiny_batch(n: int = 16):
    gen = torch.Generator().manual_seed(3)
    return torch.randn(n, 3, 2, 2, generator=gen), torch.randint(0, 10, (n,), generator=gen)


def test_scalar_is_the_contrast_of_the_given_class():
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 4.0, -2.0]])
    y = torch.tensor([2, 0])
    # 3 - (1 + 2) / 2 and 0 - (4 - 2) / 2, by hand
    assert workload.scalar(logits, y).tolist() == [1.5, -1.0]
    from nnsim_hooks.engine.outputs import contrast

    torch.testing.assert_close(workload.scalar(logits, y), contrast(logits, y))


def test_pair_mae_by_hand():
    exact = torch.tensor([[1.0, 0.5, 0.0], [0.5, 1.0, -0.5], [0.0, -0.5, 1.0]], dtype=torch.float64)
    orthogonal = torch.eye(3)  # projected cosines all 0: errors 0.5, 0.0, 0.5 over the three pairs
    assert metrics.projected_mae(orthogonal, exact) == pytest.approx(1.0 / 3.0)
    assert metrics.pair_mae(exact, exact) == 0.0


def test_ideal_mae_matches_the_gaussian_formula_for_orthogonal_gradients():
    # Independent Gaussian directions in D dimensions: cos ~ N(0, 1/D), so E|cos| = sqrt(2 / (pi D)).
    dim = 256
    assert metrics.ideal_mae(torch.eye(40, dtype=torch.float64), dim) == pytest.approx(
        math.sqrt(2 / (math.pi * dim)), rel=0.03
    )


def test_error_ratio_is_zero_for_exact_features_and_about_one_for_a_dense_gaussian():
    gen = torch.Generator().manual_seed(1)
    grads = torch.randn(24, 500, generator=gen, dtype=torch.float64)
    grads[12:] += 2 * grads[:12]  # correlated pairs, so the cosines are not all near zero
    exact = metrics.cosine_matrix(grads)
    assert metrics.error_ratio([grads], exact, 64) == pytest.approx(0.0, abs=1e-12)
    projected = [grads @ torch.randn(500, 64, generator=gen, dtype=torch.float64) for _ in range(20)]
    assert metrics.error_ratio(projected, exact, 64) == pytest.approx(1.0, abs=0.12)
    with pytest.raises(ValueError, match="at least one seed"):
        metrics.error_ratio([], exact, 64)


def test_exact_cosines_match_torch_func_per_sample_gradients():
    model = tiny_model()
    x, y = tiny_batch()
    got = metrics.exact_cosines(model, x, y, workload.scalar)
    reference = tiny_model().double()
    params = {k: v.detach() for k, v in reference.named_parameters()}

    def one(p, xb, yb):
        return workload.scalar(torch.func.functional_call(reference, p, (xb.unsqueeze(0),)), yb.unsqueeze(0))[0]

    grads = torch.func.vmap(torch.func.grad(one), in_dims=(None, 0, 0))(params, x.double(), y)
    flat = torch.cat([g.reshape(x.shape[0], -1) for g in grads.values()], 1)
    torch.testing.assert_close(got, metrics.cosine_matrix(flat), atol=1e-6, rtol=0)


def test_dense_gaussian_projection_is_one_matrix_applied_to_the_concatenated_parts():
    gen = torch.Generator().manual_seed(2)
    a, b = torch.randn(4, 7, generator=gen), torch.randn(4, 5, generator=gen)
    eye = torch.eye(12)
    # The identity, split like [a, b], projects to the matrix itself, row chunks and all.
    matrix = dense_gaussian_projection([eye[:, :7], eye[:, 7:]], 3, seed=9, chunk_rows=2)
    torch.testing.assert_close(dense_gaussian_projection([a, b], 3, seed=9, chunk_rows=2), torch.cat([a, b], 1) @ matrix)
    assert matrix.std().item() == pytest.approx(1.0, abs=0.5)
    assert not torch.equal(matrix, dense_gaussian_projection([eye[:, :7], eye[:, 7:]], 3, seed=10, chunk_rows=2))


def test_nnsim_adapter_is_as_good_as_a_dense_gaussian_on_a_tiny_model():
    # 378 parameters, every one below exact_limit: nnsim's first stage is exact and its second
    # stage is a dense Gaussian to D, so its error ratio is ~1 (and features are [B, D]).
    from peers.nnsim import Peer

    x, y = tiny_batch()
    exact = metrics.exact_cosines(tiny_model(), x, y, workload.scalar)
    feats = []
    for seed in range(12):
        peer = Peer(tiny_model(), "tiny", 32, seed, "cpu", (x, y))
        out = peer(x, y)
        peer.close()
        assert out.shape == (16, 32)
        feats.append(out)
    assert metrics.error_ratio(feats, exact, 32) == pytest.approx(1.0, abs=0.2)
    assert not feats[0].equal(feats[1])  # another seed, another projection


def test_render_gives_a_row_per_peer_and_failures_say_why():
    args = SimpleNamespace(batch=64, dim=1024, repeats=5, seeds=4, slow_seeds=2, device="cpu")
    ok = {"version": "1.0", "peer_s": 0.6, "plain_s": 0.3, "peak_mb": 123.4, "error_ratio": 1.37,
          "notes": "all parameters", "repeats": 5, "seeds": 4}
    table = bench_peers.render(
        [("nnsim", "resnet18", ok), ("bergson", "resnet18", {"version": "2.5.1", "error": "rejects | the model"}),
         ("traker", "resnet18", {"version": "0.3.2", "error": "timed out after 420 s"})],
        args, "python benchmarks/bench_peers.py", "test machine", 1.0,
    )
    assert "| traker | 0.3.2 | resnet18 | > 1400 | | | timed out after 420 s" in table  # 420 s / 0.3 s
    assert "| nnsim | 1.0 | resnet18 | 2.00 | 123 | 1.37 | all parameters" in table
    assert "| bergson | 2.5.1 | resnet18 | | | | fails: rejects / the model |" in table
    assert "Command: `python benchmarks/bench_peers.py`" in table
