"""--augment: the training transforms against brute-force oracles (each output sample is
the input mirrored or not, a crop of its reflected padding, a permutation of its channels),
the recipe field and its checks, and --train with it end to end."""

import json

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.utils.data import TensorDataset

from nnsim_hooks.audit.augment import SHIFT_SHARE, augment_batch, parse_augment
from nnsim_hooks.audit.fitting import TrainingRecipe, fit_classifier, train_for_audit
from nnsim_hooks.audit.samples import AuditView, labels_of
from nnsim_hooks.errors import InputError


def batch(n=6, c=3, spatial=(9, 10), seed=0):
    return torch.randn(n, c, *spatial, generator=torch.Generator().manual_seed(seed))


def crops_of_reflected(sample: np.ndarray, pads):
    """Every crop of ``sample``'s reflected padding at the original size (the oracle of shift)."""
    padded = np.pad(sample, [(0, 0)] + [(p, p) for p in pads], mode="reflect")
    spatial = sample.shape[1:]
    for starts in np.ndindex(*[2 * p + 1 for p in pads]):
        yield padded[(slice(None),) + tuple(slice(s, s + size) for s, size in zip(starts, spatial))]


def test_parse_augment_names_and_order():
    assert parse_augment(None) == parse_augment("none") == parse_augment("") == parse_augment(" , ") == ()
    assert parse_augment("shift, FLIP") == ("flip", "shift")
    assert parse_augment(["channels", "flip"]) == ("flip", "channels")
    with pytest.raises(InputError, match=r"unknown transform\(s\) \['rotate'\]; choose from flip, shift, channels"):
        parse_augment("flip,rotate")


def test_flip_mirrors_some_samples_left_right():
    x = batch(n=40)
    out = augment_batch(x, ("flip",), torch.Generator().manual_seed(1))
    mirrored = [bool(torch.equal(o, s.flip(-1))) for o, s in zip(out, x)]
    kept = [bool(torch.equal(o, s)) for o, s in zip(out, x)]
    assert all(m or k for m, k in zip(mirrored, kept))
    assert 5 < sum(mirrored) < 35  # about half
    again = augment_batch(x, ("flip",), torch.Generator().manual_seed(1))
    assert torch.equal(out, again)  # seeded


@pytest.mark.parametrize("spatial", [(9, 10), (16, 16), (5, 6, 8)])
def test_shift_is_a_crop_of_the_reflected_padding(spatial):
    x = batch(n=8, c=2, spatial=spatial)
    out = augment_batch(x, ("shift",), torch.Generator().manual_seed(2))
    pads = [max(1, int(s * SHIFT_SHARE)) for s in spatial]
    moved = 0
    for o, s in zip(out.numpy(), x.numpy()):
        assert any(np.array_equal(o, crop) for crop in crops_of_reflected(s, pads))
        moved += not np.array_equal(o, s)
    assert moved >= 4  # most samples move
    assert out.shape == x.shape


def test_channels_are_permuted_per_sample():
    x = batch(n=20, c=3)
    out = augment_batch(x, ("channels",), torch.Generator().manual_seed(3))
    orders = set()
    for o, s in zip(out, x):
        order = [next(j for j in range(3) if torch.equal(o[i], s[j])) for i in range(3)]
        assert sorted(order) == [0, 1, 2]
        orders.add(tuple(order))
    assert len(orders) > 2


def test_inputs_that_cannot_be_augmented_are_refused():
    with pytest.raises(InputError, match=r"needs each batch as one float tensor .*shape \[4, 6\]"):
        augment_batch(torch.randn(4, 6), ("flip",), torch.Generator())
    with pytest.raises(InputError, match="the data gives dict"):
        augment_batch({"image": torch.randn(2, 1, 4, 4)}, ("shift",), torch.Generator())
    x = torch.randn(4, 6)
    assert augment_batch(x, (), torch.Generator()) is x  # nothing asked: nothing checked or copied


def test_recipe_field_is_canonical_and_old_recipe_files_still_match(tmp_path):
    assert TrainingRecipe(epochs=1).augment == "none"
    assert TrainingRecipe(epochs=1, augment="shift,flip").augment == "flip,shift"
    assert TrainingRecipe.make({"epochs": 1, "augment": ["flip"]}).augment == "flip"
    with pytest.raises(InputError, match="unknown transform"):
        TrainingRecipe(epochs=1, augment="blur")
    # a recipe.json written before augment and schedule existed: no augmentation, a constant rate
    x = batch(n=12, c=1, spatial=(6, 6))
    view = AuditView(TensorDataset(x, torch.arange(12) % 2))
    model = nn.Sequential(nn.Flatten(), nn.Linear(36, 2))
    old = TrainingRecipe(epochs=1, schedule="constant")
    (tmp_path / "recipe.json").write_text(json.dumps({k: v for k, v in old.as_dict().items()
                                                      if k not in ("augment", "schedule")}, sort_keys=True))
    train_for_audit(model, view, labels_of(view), old, folder=tmp_path)
    for other in (TrainingRecipe(epochs=1), TrainingRecipe(epochs=1, schedule="constant", augment="flip")):
        with pytest.raises(InputError, match="another recipe"):
            train_for_audit(model, view, labels_of(view), other, folder=tmp_path)


def test_training_sees_augmented_batches_and_the_audit_does_not():
    """fit_classifier against a hand-written loop that augments with the same generator."""
    import torch.nn.functional as F

    x = batch(n=16, c=3, spatial=(8, 8))
    y = torch.arange(16) % 2
    view = AuditView(TensorDataset(x, y))

    def net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 2))

    recipe = TrainingRecipe(epochs=2, batch_size=8, augment="flip,shift,channels")
    ours = net()
    fit_classifier(ours, view, np.arange(16), recipe, seed=5)
    oracle = net()
    torch.manual_seed(5)
    opt = torch.optim.AdamW(oracle.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    g = torch.Generator().manual_seed(5)
    for epoch in range(2):
        for group in opt.param_groups:  # the cosine schedule, written out
            group["lr"] = recipe.lr * (1 + np.cos(np.pi * epoch / 2)) / 2
        for rows in torch.randperm(16, generator=g).split(8):
            loss = F.cross_entropy(oracle(augment_batch(x[rows], ("flip", "shift", "channels"), g)), y[rows])
            opt.zero_grad()
            loss.backward()
            opt.step()
    for a, b in zip(ours.parameters(), oracle.parameters()):
        torch.testing.assert_close(a, b)
    plain = net()
    fit_classifier(plain, view, np.arange(16), TrainingRecipe(epochs=2, batch_size=8), seed=5)
    assert not torch.equal(plain[0].weight, ours[0].weight)  # the transforms did change the training


def test_cli_augment_flags_are_checked(tmp_path, capsys):
    pytest.importorskip("timm")
    from nnsim_hooks.cli import commands as cli
    from nnsim_hooks.integrations.synthetic import make_image_folder

    data = tmp_path / "images"
    make_image_folder(str(data), classes=("circle", "square"), per_class=4, size=(16, 16))
    fast = ["--no-progress", "--k", "3", "--sketch-dim", "32", "--model", "timm:test_resnet", "--num-classes", "2",
            "--data", str(data)]
    assert cli.main(["audit", *fast, "--out", str(tmp_path / "a"), "--augment", "flip"]) == 1
    assert "--augment is for --train" in capsys.readouterr().err
    assert cli.main(["audit", *fast, "--out", str(tmp_path / "b"), "--train", "1", "--augment", "spin"]) == 1
    assert "unknown transform(s) ['spin']" in capsys.readouterr().err
    assert cli.main(["audit", *fast, "--out", str(tmp_path / "c"), "--train", "1", "--folds", "0",
                     "--augment", "flip,shift"]) == 0
    recipe = json.loads((tmp_path / "c" / "trained" / "recipe.json").read_text())
    assert recipe["augment"] == "flip,shift"
