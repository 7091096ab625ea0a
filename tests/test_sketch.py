"""Sketched features against exact similarities and against an ideal dense sketch."""

import hashlib

import pytest
import torch
import torch.nn as nn
import torchvision

import nnsim_hooks
from nnsim_hooks.exact.kernels import normalize_features
from nnsim_hooks.engine.sketch import SketchRecipe, Sketcher, factor_dims, seeded_gaussian


def small_net(classes=4):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 8), nn.Tanh(), nn.Linear(8, classes)
    ).eval()


def test_features_are_exact_when_everything_fits():
    # 72 + 4 + 1152 + 8 + 32 + 4 = 1272 parameters: no projection at D=2048.
    model = small_net()
    x = torch.randn(9, 2, 6, 6)
    with nnsim_hooks.attach(model, sketch_dim=2048) as h:
        f = h.features(x).double()
        assert h.sketcher.exact
        exact = h.similarity(x)
    torch.testing.assert_close(f @ f.T, exact, atol=1e-5, rtol=1e-5)


def test_whitened_features_give_the_matrix_kernel():
    model = small_net()
    x = torch.randn(7, 2, 6, 6)
    with nnsim_hooks.attach(model, output="full", sketch_dim=2048) as h:
        f = h.features(x).double()
        exact = h.similarity(x)
    assert f.shape == (7, 4 * 2048)
    torch.testing.assert_close(f @ f.T, exact, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.diagonal(f @ f.T), torch.ones(7, dtype=torch.float64), atol=1e-6, rtol=0)


def test_matrices_follow_the_documented_seed_recipe():
    digest = hashlib.sha256(b"nnsim_hooks/sketch/v4|7|layer.weight|row").digest()
    g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    expected = torch.randn(5, 9, generator=g) * 0.5
    torch.testing.assert_close(seeded_gaussian(7, "layer.weight", "row", (5, 9), 0.5), expected, rtol=0, atol=0)


@pytest.mark.slow
def test_same_seed_same_features_other_seed_independent():
    model = torchvision.models.resnet18(weights=None, num_classes=5).eval()
    x = torch.randn(6, 3, 32, 32)
    feats = {}
    for seed in (0, 0, 1):
        with nnsim_hooks.attach(model, sketch_dim=256, seed=seed) as h:
            feats.setdefault(seed, []).append(h.features(x))
    torch.testing.assert_close(feats[0][0], feats[0][1], rtol=0, atol=0)
    # Another seed: other matrices, so other rows (and errors that do not repeat).
    assert (feats[0][0] - feats[1][0]).abs().max() > 1e-2
    with nnsim_hooks.attach(model) as h:
        exact = h.similarity(x)
    iu = torch.triu_indices(6, 6, 1)
    e0 = (feats[0][0].double() @ feats[0][0].double().T - exact)[iu[0], iu[1]]
    e1 = (feats[1][0].double() @ feats[1][0].double().T - exact)[iu[0], iu[1]]
    assert abs(torch.corrcoef(torch.stack([e0, e1]))[0, 1]) < 0.8


@pytest.mark.parametrize("shape,budget,k", [((64, 576), 512, 4), ((10, 512), 256, 4), ((3000, 3), 300, 4), ((7, 7), 100, 4)])
def test_factor_dims_respect_the_budget(shape, budget, k):
    rows, cols = shape
    repeats, k_row, k_col = factor_dims(rows, cols, budget, k)
    assert repeats * k_row * k_col <= max(budget, rows * cols if rows * cols <= budget else 0) or rows * cols <= budget
    assert k_row <= rows and k_col <= cols


@pytest.mark.slow
def test_sketch_is_unbiased_for_every_factored_rule():
    """The mean over seeds of sketched inner products is the exact Gram matrix."""

    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(30, 12)
            self.conv = nn.Conv1d(12, 16, 3, padding=1)
            self.deconv = nn.ConvTranspose1d(16, 16, 4, stride=2, padding=1)
            self.tok = nn.Linear(16, 24)
            self.head = nn.Linear(24, 3)

        def forward(self, ids):
            h = self.emb(ids).transpose(1, 2)  # [B, 12, T]
            h = torch.tanh(self.deconv(torch.tanh(self.conv(h)))).transpose(1, 2)  # [B, 2T, 16]
            return self.head(torch.tanh(self.tok(h)).mean(1))

    torch.manual_seed(0)
    model = Mixed().eval()
    ids = torch.randint(0, 30, (5, 6))
    mean = None
    seeds = 300
    recipe = dict(dim=10**6, stage1_dim=64, exact_limit=16, min_param_dim=16)
    with nnsim_hooks.attach(model) as h:
        p = h.engine.backprop(ids)  # one captured pass, sketched with 300 recipes
        exact = h.engine.gram(p)
        mean = torch.zeros_like(exact)
        for seed in range(seeds):
            sketcher = Sketcher(SketchRecipe(seed=seed, **recipe), h._param_shapes)
            assert not sketcher.exact
            f = h.engine.sketch(p, sketcher)[:, 0].double()
            mean += f @ f.T / seeds
    scale = torch.sqrt(torch.diagonal(exact)[:, None] * torch.diagonal(exact)[None, :])
    assert ((mean - exact).abs() / scale).max() < 0.12


@pytest.mark.slow
def test_fast_rules_never_materialise_for_features(monkeypatch):
    from nnsim_hooks.rules import conv, linear

    def refuse(*args, **kwargs):
        raise AssertionError("materialised per-sample gradients on the feature path")

    monkeypatch.setattr(conv.ConvRule, "grad_sample", refuse)
    monkeypatch.setattr(linear.LinearRule, "grad_sample", refuse)
    model = torchvision.models.resnet18(weights=None, num_classes=5).eval()
    with nnsim_hooks.attach(model, sketch_dim=128) as h:
        assert h.features(torch.randn(3, 3, 32, 32)).shape == (3, 128)


def ideal_error(cos: torch.Tensor, dim: int, reps: int = 40) -> float:
    """Mean absolute error of an ideal dense Gaussian sketch of the unit gradients.

    Sketching the rows of G with iid Gaussian S is distributed like L Z with L L^T the
    Gram matrix of the rows, so only the exact cosine matrix is needed."""
    n = cos.shape[0]
    chol = torch.linalg.cholesky(cos + 1e-10 * torch.eye(n, dtype=cos.dtype))
    iu = torch.triu_indices(n, n, 1)
    errs = []
    for r in range(reps):
        z = torch.randn(n, dim, dtype=cos.dtype, generator=torch.Generator().manual_seed(1000 + r))
        f = chol @ z
        f = f / f.norm(dim=1, keepdim=True)
        errs.append(((f @ f.T) - cos)[iu[0], iu[1]].abs().mean())
    return torch.stack(errs).mean().item()


@pytest.mark.slow
def test_resnet18_sketch_error_within_1_2x_of_ideal_at_1024():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    x = torch.randn(48, 3, 32, 32)
    with nnsim_hooks.attach(model) as h:
        exact = h.similarity(x)
    iu = torch.triu_indices(48, 48, 1)
    errors = []
    with nnsim_hooks.attach(model, sketch_dim=1024, batch_size=48) as h:
        p = h.engine.backprop(x)  # one captured pass, four seeds
        for seed in range(4):
            sketcher = Sketcher(SketchRecipe(1024, seed), h._param_shapes)
            f = normalize_features(h.engine.sketch(p, sketcher))[0].double()
            errors.append(((f @ f.T) - exact)[iu[0], iu[1]].abs().mean().item())
    ratio = sum(errors) / len(errors) / ideal_error(exact, 1024)
    assert ratio <= 1.2, ratio


@pytest.mark.slow
def test_long_position_table_is_folded_not_projected_along_one_huge_side():
    # [1, tokens, C] with tokens * C > FOLD_COLS: projecting the single row's 320k entries
    # would need a [budget, 320000] matrix; folded to [tokens, C] it gets Kronecker blocks.
    from nnsim_hooks.engine.sketch import FOLD_COLS, SketchRecipe, Sketcher, matrix_view

    assert matrix_view((1, 40_000, 8)) == (40_000, 8)
    assert matrix_view((1, 100, 8)) == (1, 800)  # small tables keep the usual view
    assert matrix_view((1, 40_000, 8, 1, 1), block=4) == (40_000 * 8, 1)
    assert matrix_view((2, FOLD_COLS + 1)) == (2, FOLD_COLS + 1)  # 2-D weights never fold
    sketcher = Sketcher(SketchRecipe(dim=64, stage1_dim=4096), {"pos_embed": (1, 40_000, 8)})
    part = sketcher.params["pos_embed"]
    entries = sum(m.numel() for m in (part.row_matrix, part.col_matrix) if m is not None)
    assert entries * 10 < 4096 * 40_000 * 8  # far below a dense [budget, 320000] matrix
    # The fold keeps the projection an unbiased inner-product estimate: average over seeds.
    torch.manual_seed(0)
    g = torch.randn(2, 1, 1, 40_000, 8)
    g[1] = 0.5 * g[0] + torch.randn_like(g[0])
    exact = (g[0] * g[1]).sum() / (g[0].norm() * g[1].norm())
    estimates = []
    for seed in range(8):
        p = Sketcher(SketchRecipe(dim=64, seed=seed, stage1_dim=4096), {"pos_embed": (1, 40_000, 8)})
        s = p.params["pos_embed"].project_gradients(g)[:, 0]
        estimates.append(float(s[0] @ s[1] / (s[0].norm() * s[1].norm())))
    assert abs(sum(estimates) / len(estimates) - float(exact)) < 0.05


@pytest.mark.parametrize("positions", [3, 40])  # below and above BATCHED_MIN_POSITIONS
def test_factored_sketch_matches_the_sketch_of_materialised_gradients(positions):
    from nnsim_hooks.engine.sketch import BATCHED_MIN_POSITIONS, SketchRecipe, Sketcher

    assert 3 < BATCHED_MIN_POSITIONS <= 40
    torch.manual_seed(0)
    d, b, r, c = 2, 3, 24, 20
    rows = torch.randn(d, b, r, positions, dtype=torch.float64)
    cols = torch.randn(b, c, positions, dtype=torch.float64)
    s = Sketcher(SketchRecipe(64, stage1_dim=160, exact_limit=0, block=4), {"w": (r, c)}).params["w"]
    s = s.to("cpu", torch.float64)
    assert s.repeats > 1 and s.row_matrix is not None and s.col_matrix is not None
    got = s.combine_factors(s.rows_of(rows, 2), s.cols_of(cols, 1).unsqueeze(0))
    grads = torch.einsum("mbrl,bcl->bmrc", rows, cols)
    torch.testing.assert_close(got, s.project_gradients(grads))
