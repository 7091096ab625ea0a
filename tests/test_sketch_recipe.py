"""Sketch recipe version 4: the first stage grows with D, stage 2 is sparse signed hashing
(every coordinate to one output in each of 4 blocks).

Stage 2 must be unbiased for inner products, with a variance no larger than a dense
Gaussian's; its draws must follow the documented recipe; the default first-stage size
must follow D; and an index sketched with an older recipe must be refused.
"""

import hashlib
import json

import pytest
import torch

import nnsim_hooks
from nnsim_hooks.errors import IndexMismatchError
from nnsim_hooks.engine.sketch import (
    MIN_STAGE1_DIM,
    RECIPE_VERSION,
    STAGE1_PER_DIM,
    SketchRecipe,
    Sketcher,
    seeded_hash,
)


def test_default_first_stage_follows_the_sketch_dimension():
    assert SketchRecipe(256).stage1_dim == MIN_STAGE1_DIM == 16384
    assert SketchRecipe(4096).stage1_dim == STAGE1_PER_DIM * 4096 == 65536
    assert SketchRecipe(4096, stage1_dim=1000).stage1_dim == 1000  # an explicit size is kept
    assert SketchRecipe(2048).to_dict()["stage1_dim"] == 32768  # stored resolved in manifests
    with nnsim_hooks.attach(torch.nn.Linear(3, 2), sketch_dim=2048) as h:
        assert h.recipe.stage1_dim == 32768 and h.recipe.version == RECIPE_VERSION == 4
    # 4x4 Kronecker blocks up to D = 1024, 2x2 above, stored resolved too
    assert SketchRecipe(1024).block == 4 and SketchRecipe(2048).block == 2
    assert SketchRecipe(4096, block=4).block == 4
    sketcher = Sketcher(SketchRecipe(4096, stage1_dim=20000), {"w": (64, 400)})
    assert (sketcher.params["w"].k_row, sketcher.params["w"].k_col) == (2, 2)


def test_hash_follows_the_documented_seed_recipe():
    digest = hashlib.sha256(b"nnsim_hooks/sketch/v4|5|blocks.0.weight|hash").digest()
    g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    buckets, signs = [], []
    for low, high in ((0, 25), (25, 50), (50, 75), (75, 100)):
        buckets.append(torch.randint(high - low, (40,), generator=g) + low)
        signs.append(torch.randint(2, (40,), generator=g).float() * 2 - 1)
    got_buckets, got_signs = seeded_hash(5, "blocks.0.weight", 40, 100)
    assert torch.equal(got_buckets, torch.stack(buckets)) and torch.equal(got_signs, torch.stack(signs))
    assert set(got_signs.unique().tolist()) == {-1.0, 1.0}
    other_buckets, _ = seeded_hash(6, "blocks.0.weight", 40, 100)
    assert not torch.equal(other_buckets, got_buckets)
    # uneven blocks, and fewer outputs than nonzeros
    b, _ = seeded_hash(5, "w", 1000, 10)
    assert b.shape == (4, 1000) and [(int(r.min()), int(r.max())) for r in b] == [(0, 1), (2, 4), (5, 6), (7, 9)]
    b, _ = seeded_hash(5, "w", 50, 3)
    assert b.shape == (3, 50) and b.tolist() == [[0] * 50, [1] * 50, [2] * 50]


def _hashed(seed, parts, dim):
    shapes = {n: (p.shape[-1],) for n, p in parts.items()}
    sketcher = Sketcher(SketchRecipe(dim, seed, exact_limit=10**6), shapes)
    assert sketcher.stage1_dim > dim and not any(p.projected for p in sketcher.params.values())
    return sketcher.combine({n: p.unsqueeze(1) for n, p in parts.items()}, 3, 1, "cpu", torch.float64)[:, 0]


def test_signed_hashing_is_unbiased_with_at_most_gaussian_variance():
    """Stage 2 alone (stage 1 exact): over seeds, the mean sketched inner product is the
    exact one, and its variance is below (|a|^2 |b|^2 + (a.b)^2) / D, a dense Gaussian's."""
    torch.manual_seed(0)
    a = torch.randn(3, 50, dtype=torch.float64)
    a[:, :5] *= 6  # a few large coordinates, where hashing differs most from a Gaussian
    b = torch.randn(3, 30, dtype=torch.float64)
    exact = a @ a.T + b @ b.T
    dim, seeds = 16, 600
    draws = torch.stack([(lambda f: f @ f.T)(_hashed(seed, {"a": a, "b": b}, dim)) for seed in range(seeds)])
    mean, var = draws.mean(0), draws.var(0)
    gaussian_var = (torch.diagonal(exact)[:, None] * torch.diagonal(exact)[None, :] + exact**2) / dim
    # unbiased: within 4 standard errors of the exact value
    assert ((mean - exact).abs() <= 4 * (gaussian_var / seeds).sqrt()).all()
    assert (var <= 1.15 * gaussian_var).all()
    assert (var > 0.2 * gaussian_var).all()  # it is a random sketch, not an exact copy


def test_old_recipe_version_is_refused_when_loading(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).eval()
    data = torch.utils.data.TensorDataset(torch.randn(12, 4))
    with nnsim_hooks.attach(model, sketch_dim=16) as h:
        h.build_index(data, tmp_path / "ix", batch_size=6, progress=False)
        manifest_path = tmp_path / "ix" / "manifest.json"
        manifest = json.loads(manifest_path.read_text())
        assert manifest["fingerprint"]["sketch"]["version"] == 4
        nnsim_hooks.load_index(tmp_path / "ix", handle=h)  # the same recipe loads
        manifest["fingerprint"]["sketch"]["version"] = 3
        manifest_path.write_text(json.dumps(manifest))
        with pytest.raises(IndexMismatchError, match=r"sketch recipe version 3.*version 4.*Rebuild the index"):
            nnsim_hooks.load_index(tmp_path / "ix", handle=h)
