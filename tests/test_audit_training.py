"""``audit(train=...)`` / ``nnsim audit --train``: the recipe, the folds, the cross-fitted
neighbours (against brute force over every pair), and the bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import TensorDataset

import nnsim_hooks
from nnsim_hooks.audit.cross_fit import cross_fitted_neighbors
from nnsim_hooks.audit.fitting import (TrainedModels, TrainingRecipe, check_trainable, fit_classifier, fold_of_rows,
                                       resolve_folds, train_for_audit)
from nnsim_hooks.audit.output_choice import full_outputs
from nnsim_hooks.audit.samples import AuditView, labels_of
from nnsim_hooks.errors import InputError


def blobs(n: int = 48, classes: int = 3, dim: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    centres = torch.randn(classes, dim, generator=g) * 3
    x = centres[y] + torch.randn(n, dim, generator=g)
    return TensorDataset(x, y)


def mlp(dim: int = 6, classes: int = 3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(dim, 16), nn.ReLU(), nn.Linear(16, classes))


def test_recipe_refuses_bad_values():
    with pytest.raises(InputError, match="epochs"):
        TrainingRecipe(epochs=0)
    with pytest.raises(InputError, match="--folds 1"):
        TrainingRecipe(epochs=2, folds=1)
    with pytest.raises(InputError, match="lr"):
        TrainingRecipe(epochs=2, lr=0.0)
    with pytest.raises(InputError, match="schedule 'linear' is not one of"):
        TrainingRecipe(epochs=2, schedule="linear")
    assert TrainingRecipe.make(3) == TrainingRecipe(epochs=3)
    assert TrainingRecipe.make({"epochs": 2, "folds": 3}).cross_fitted


def test_batch_size_is_64_or_smaller_for_small_data():
    recipe = TrainingRecipe(epochs=1)
    assert [recipe.batch_for(n) for n in (10_000, 1024, 1023, 480, 244, 100, 5)] == [64, 64, 63, 30, 15, 8, 8]
    assert TrainingRecipe(epochs=1, batch_size=5).batch_for(10_000) == 5
    data = blobs(40)
    history = fit_classifier(mlp(), AuditView(data), np.arange(40), recipe, seed=0)
    assert history["batch_size"] == 8


def test_one_class_and_too_few_per_fold_are_refused_with_the_numbers():
    with pytest.raises(InputError, match="only class 1 \\(4 samples\\)"):
        check_trainable(np.array([1, 1, 1, 1, -1]), TrainingRecipe(epochs=1))
    with pytest.raises(InputError, match="no labelled sample"):
        check_trainable(np.array([-1, -1]), TrainingRecipe(epochs=1))
    with pytest.raises(InputError, match="class 2 has only 2 labelled samples"):
        check_trainable(np.array([0, 0, 0, 1, 1, 1, 2, 2]), TrainingRecipe(epochs=1, folds=3))
    check_trainable(np.array([0, 0, 0, 1, 1, 1, 2, 2]), TrainingRecipe(epochs=1, folds=2))


def test_auto_folds_are_five_or_the_smallest_class():
    recipe = TrainingRecipe(epochs=1, folds="auto")
    assert recipe.cross_fitted
    assert resolve_folds(np.array([0] * 9 + [1] * 7 + [-1]), recipe).folds == 5
    assert resolve_folds(np.array([0] * 9 + [1] * 3 + [-1] * 8), recipe).folds == 3
    assert resolve_folds(np.array([0, 1]), TrainingRecipe(epochs=1, folds=2)).folds == 2  # a number stays
    with pytest.raises(InputError, match="class 1 has 1 labelled sample; cross-fitting needs 2 of every class"):
        resolve_folds(np.array([0, 0, 0, 1]), recipe)
    with pytest.raises(InputError, match="an integer >= 2, or auto"):
        TrainingRecipe(epochs=1, folds="five")


def test_folds_are_stratified_seeded_and_cover_every_row():
    labels = np.array([0] * 10 + [1] * 7 + [2] * 5 + [-1] * 3)
    fold = fold_of_rows(labels, 3, seed=4)
    assert np.array_equal(fold, fold_of_rows(labels, 3, seed=4))
    assert not np.array_equal(fold, fold_of_rows(labels, 3, seed=5))
    assert set(fold.tolist()) == {0, 1, 2}
    for c in (0, 1, 2, -1):
        counts = np.bincount(fold[labels == c], minlength=3)
        assert counts.max() - counts.min() <= 1, (c, counts)


def test_fit_classifier_is_the_documented_recipe():
    """The recipe against a hand-written loop: AdamW, the seeded shuffle, cross-entropy,
    unlabelled samples left out (the same weights to float precision)."""
    data = blobs(40)
    labels = data.tensors[1].clone()
    labels[::7] = -1
    view = AuditView(TensorDataset(data.tensors[0], labels))
    rows = np.arange(len(view))
    recipe = TrainingRecipe(epochs=3, lr=0.01, weight_decay=0.05, batch_size=8)
    assert recipe.schedule == "cosine"
    ours = mlp()
    fit_classifier(ours, view, rows, recipe, seed=7)

    oracle = mlp()
    torch.manual_seed(7)
    opt = torch.optim.AdamW(oracle.parameters(), lr=0.01, weight_decay=0.05)
    g = torch.Generator().manual_seed(7)
    x, y = data.tensors[0], labels
    for epoch in range(3):
        for group in opt.param_groups:  # cosine decay to 0 over the epochs, stepped each epoch
            group["lr"] = 0.01 * (1 + np.cos(np.pi * epoch / 3)) / 2
        for batch in torch.randperm(len(x), generator=g).split(8):
            keep = y[batch] >= 0
            loss = F.cross_entropy(oracle(x[batch])[keep], y[batch][keep])
            opt.zero_grad()
            loss.backward()
            opt.step()
    for a, b in zip(ours.parameters(), oracle.parameters()):
        torch.testing.assert_close(a, b)
    assert not ours.training


def test_train_for_audit_resumes_from_its_checkpoints(tmp_path):
    data = blobs(30)
    view = AuditView(data)
    recipe = TrainingRecipe(epochs=2, folds=2, batch_size=8)
    first = train_for_audit(mlp(), view, labels_of(view), recipe, folder=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fold-0-of-2.pt", "fold-1-of-2.pt", "model.pt",
                                                          "recipe.json"]
    again = train_for_audit(mlp(seed=9), view, labels_of(view), recipe, folder=tmp_path)
    assert all("reused" in h for h in again.history.values())
    for a, b in zip(first.model.parameters(), again.model.parameters()):
        assert torch.equal(a, b)
    # fold models start from the same weights as the main model, and differ from it after training
    assert not torch.equal(first.fold_models[0][0].weight, first.model[0].weight)
    with pytest.raises(InputError, match="another recipe"):
        train_for_audit(mlp(), view, labels_of(view), TrainingRecipe(epochs=3, folds=2), folder=tmp_path)


def test_cross_fitted_neighbors_against_brute_force():
    """Each row's neighbours and prediction come from the fold model blind to it: the
    k most similar rows among all others, by the cosine of that model's features."""
    data = blobs(36)
    view = AuditView(data)
    fold = fold_of_rows(labels_of(view), 3, seed=1)
    models = [mlp(seed=s).eval() for s in (1, 2, 3)]
    trained = TrainedModels(model=models[0], recipe=TrainingRecipe(epochs=1, folds=3), fold=fold, fold_models=models)
    k = 4
    got = cross_fitted_neighbors(trained, view, k, output=full_outputs, sketch_dim=64, seed=0, batch_size=16)
    x = data.tensors[0]
    for f, model in enumerate(models):
        with nnsim_hooks.attach(model, output=full_outputs, sketch_dim=64, seed=0) as h:
            feats = h.features(x).detach().double()
        feats = feats / feats.norm(dim=1, keepdim=True)
        sims = feats @ feats.T
        sims.fill_diagonal_(-np.inf)
        for i in np.flatnonzero(fold == f):
            top = torch.topk(sims[i], k)
            assert set(got.ids[i].tolist()) == set(top.indices.tolist()), i
            np.testing.assert_allclose(got.sims[i], top.values.numpy(), atol=1e-5)
            assert got.predictions[i] == int(model(x[i:i + 1]).argmax())
            np.testing.assert_allclose(got.probabilities[i], F.softmax(model(x[i:i + 1]), 1)[0].detach().numpy(),
                                       atol=1e-5)


def test_audit_train_end_to_end_records_what_it_did(tmp_path):
    data = blobs(40)
    model = mlp()
    before = model[0].weight.detach().clone()
    result = nnsim_hooks.audit(model, data, train={"epochs": 3, "folds": 2, "batch_size": 8}, out_dir=tmp_path / "a",
                               k=3, progress=False, sketch_dim=32)
    assert not torch.equal(before, model[0].weight)  # trained in place
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["training"]["folds"] == 2 and summary["training"]["recipe"]["epochs"] == 3
    assert summary["neighbors"]["method"] == "cross-fitted" and summary["neighbors"]["folds"] == 2
    assert (tmp_path / "a" / "trained" / "model.pt").exists()
    reloaded = mlp()
    reloaded.load_state_dict(torch.load(tmp_path / "a" / "trained" / "model.pt"))
    torch.testing.assert_close(reloaded[0].weight, model[0].weight)
    assert result.table["label_issue_score"].notna().all()
    header = result.report_html().split("</header>")[0]
    assert "trained here: 3 epochs" in header and "one of 2 cross-fitted models that never trained on it" in header
    assert "augmented" not in header and "through the layers" not in header


def test_report_header_names_the_layers_and_the_augmentation():
    x = torch.randn(24, 1, 6, 6)
    data = TensorDataset(x, torch.arange(24) % 2)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(48, 8), nn.ReLU(), nn.Linear(8, 2))
    result = nnsim_hooks.audit(model, data, train={"epochs": 1, "folds": 0, "augment": "flip"}, k=3, progress=False,
                               sketch_dim=16, neighbor_layers="first_half", save=False)
    header = result.report_html().split("</header>")[0]
    assert "trained here: 1 epoch, augmented (flip)" in header
    assert "through the layers of the first half (2 of 3 modules, &#x27;0&#x27; to &#x27;3&#x27;)" in header
    assert "cross-fitted" not in header


def test_audit_train_refuses_one_class_before_training():
    x = torch.randn(10, 6)
    with pytest.raises(InputError, match="at least 2 classes"):
        nnsim_hooks.audit(mlp(), TensorDataset(x, torch.zeros(10, dtype=torch.long)), train=2, progress=False)


def test_cli_train_flags_are_checked(tmp_path, capsys):
    pytest.importorskip("timm")
    from nnsim_hooks.cli import commands as cli
    from nnsim_hooks.integrations.synthetic import make_image_folder

    data = tmp_path / "images"
    make_image_folder(str(data), classes=("circle",), per_class=4, size=(16, 16))
    fast = ["--no-progress", "--k", "3", "--sketch-dim", "32", "--model", "timm:test_resnet", "--num-classes", "2",
            "--data", str(data)]
    assert cli.main(["audit", *fast, "--out", str(tmp_path / "a"), "--folds", "2"]) == 1
    assert "--folds is for --train" in capsys.readouterr().err
    assert cli.main(["audit", *fast, "--out", str(tmp_path / "b"), "--train", "1"]) == 1
    assert "at least 2 classes" in capsys.readouterr().err
    assert cli.main(["audit", "--out", str(tmp_path / "c"), "--train", "2"]) == 1
    assert "--train given without --data" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["audit", *fast, "--out", str(tmp_path / "d"), "--train", "1", "--folds", "many"])
    assert "'many' is not an integer or auto" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_train_fits_saves_and_audits(tmp_path, capsys):
    pytest.importorskip("timm")
    from nnsim_hooks.cli import commands as cli
    from nnsim_hooks.integrations.synthetic import make_image_folder

    data = tmp_path / "images"
    make_image_folder(str(data), classes=("circle", "square"), per_class=4, size=(16, 16))
    out = tmp_path / "audit"
    code = cli.main(["audit", "--no-progress", "--k", "3", "--sketch-dim", "32", "--model", "timm:test_resnet",
                     "--num-classes", "2", "--data", str(data), "--out", str(out), "--train", "2"])
    assert code == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "Trained model:" in printed and str(out / "trained" / "model.pt") in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["training"]["folds"] == 4  # auto: 5, but a class has only 4 samples
    assert json.loads((out / "trained" / "recipe.json").read_text())["folds"] == 4
    assert sorted(p.name for p in (out / "trained").glob("fold-*.pt")) == [f"fold-{f}-of-4.pt" for f in range(4)]


@pytest.mark.slow
def test_train_folds_auto_with_augmentation_finds_planted_errors():
    """The shipped recipe end to end on 400 digits with 15% flipped labels: every sample is
    judged by one of five fold models that never saw it, and the planted flips rank on top
    (the label-issue benchmark's row, small)."""
    from sklearn.metrics import roc_auc_score

    from nnsim_hooks.audit import demo

    data = demo.noisy_digits(0.15, seed=0, limit=400)
    dataset = TensorDataset(data.images, torch.as_tensor(data.noisy_labels))
    result = nnsim_hooks.audit(demo.small_cnn(width=8, seed=0), dataset, progress=False, k=10,
                               train={"epochs": 30, "folds": "auto", "augment": "shift"})
    assert result.summary["training"]["folds"] == 5 and result.summary["neighbors"]["method"] == "cross-fitted"
    score = np.nan_to_num(result.table["label_issue_score"].to_numpy(float))
    assert roc_auc_score(data.flipped, score) > 0.95
    flagged = result.table["is_label_issue"].to_numpy(bool)
    assert flagged[data.flipped].mean() > 0.8 and data.flipped[flagged].mean() > 0.6
    assert not [w for w in result.summary["warnings"] if w["code"].startswith(("memorised", "near_chance"))]
