"""Planted label errors, duplicates and outliers are found: on synthetic features (the
checks alone) and through a real CNN on digits (the whole audit)."""

import math

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import roc_auc_score

import nnsim_hooks
from audit_fixtures import clustered_features, trained_digits
from nnsim_hooks.audit import analyse, demo
from nnsim_hooks.index import GradientIndex


# -- synthetic features: each check on its own ----------------------------------------


@pytest.fixture(scope="module")
def planted():
    rng = np.random.default_rng(0)
    feats, labels = clustered_features(n_per_class=50, classes=4, dim=48, spread=0.6, seed=1)
    n = len(labels)
    flipped = rng.choice(n, 20, replace=False)
    noisy = labels.copy()
    noisy[flipped] = (labels[flipped] + rng.integers(1, 4, 20)) % 4
    # duplicates: copies of 3 samples (one exact, two perturbed)
    src = np.array([3, 70, 140])
    copies = feats[src] + np.array([0.0, 1e-3, 1e-3])[:, None] * rng.normal(size=(3, feats.shape[1]))
    copies /= np.linalg.norm(copies, axis=1, keepdims=True)
    # outliers: random directions, far from every cluster
    outl = rng.normal(size=(5, feats.shape[1]))
    outl /= np.linalg.norm(outl, axis=1, keepdims=True)
    all_feats = np.vstack([feats, copies, outl]).astype(np.float32)
    all_labels = np.concatenate([noisy, noisy[src], rng.integers(0, 4, 5)])
    true = np.concatenate([labels, labels[src], np.full(5, -1)])
    result = analyse(GradientIndex.from_features(all_feats, labels=all_labels, predictions=np.maximum(true, 0)), k=8)
    return dict(result=result, n=n, flipped=flipped, src=src, copies=np.arange(n, n + 3), outliers=np.arange(n + 3, n + 8))


def test_synthetic_flipped_labels_are_found(planted):
    t = planted["result"].table
    flagged = set(np.flatnonzero(t["is_label_issue"].to_numpy()))
    flips = set(planted["flipped"].tolist())
    assert len(flips & flagged) >= 19
    clean_flagged = flagged - flips - set(planted["outliers"].tolist())
    assert len(clean_flagged) <= 3
    # the suggested label of a found flip is its true cluster
    for i in flips & flagged:
        assert t.at[i, "suggested_label"] == t.at[i, "prediction"]


def test_synthetic_duplicates_are_grouped_with_one_representative(planted):
    t = planted["result"].table
    groups = t["duplicate_group"].to_numpy()
    for s, c in zip(planted["src"], planted["copies"]):
        assert groups[s] >= 0 and groups[s] == groups[c]
    in_groups = set(np.flatnonzero(groups >= 0).tolist())
    assert in_groups == set(planted["src"].tolist()) | set(planted["copies"].tolist())
    for g in set(groups[groups >= 0].tolist()):
        assert t["duplicate_representative"][groups == g].sum() == 1


def test_synthetic_outliers_are_flagged(planted):
    t = planted["result"].table
    flagged = np.flatnonzero(t["is_outlier"].to_numpy())
    assert set(planted["outliers"].tolist()) <= set(flagged.tolist())
    assert len(flagged) <= len(planted["outliers"]) + 3


def test_missing_labels_are_not_scored_and_do_not_vote():
    feats, labels = clustered_features(n_per_class=20, classes=2, seed=2)
    labels = labels.copy()
    labels[[0, 1, 2]] = -1
    labels[[25, 26]] = 0  # cluster 1 samples labelled 0: issues
    result = analyse(GradientIndex.from_features(feats, labels=labels, predictions=np.repeat([0, 1], 20)), k=5)
    t = result.table
    assert t["label"].isna()[[0, 1, 2]].all()
    assert t["label_issue_score"].isna()[[0, 1, 2]].all() and not t["is_label_issue"][[0, 1, 2]].any()
    assert t["is_label_issue"][[25, 26]].all()
    assert result.summary["missing_labels"] == 3 and result.summary["labelled"] == 37


# -- the whole audit through a CNN on digits -------------------------------------------


@pytest.fixture(scope="module")
def digits_audit():
    model, data = trained_digits()
    rng = np.random.default_rng(0)
    images = data.images
    n = len(images)
    dup_src = np.array([5, 50, 150, 250, 350])
    dups = images[dup_src].clone()
    dups[2:] += 0.002 * torch.randn(3, *images.shape[1:], generator=torch.Generator().manual_seed(0))
    noise = torch.rand(5, *images.shape[1:], generator=torch.Generator().manual_seed(1))
    x = torch.cat([images, dups, noise])
    y = np.concatenate([data.noisy_labels, data.noisy_labels[dup_src], rng.integers(0, 10, 5)])
    ds = torch.utils.data.TensorDataset(x, torch.as_tensor(y))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    result = nnsim_hooks.audit(model, ds, progress=False, sketch_dim=512, k=10)
    return dict(result=result, model=model, state=state, data=data, ds=ds, n=n, dup_src=dup_src,
                dups=np.arange(n, n + 5), noise=np.arange(n + 5, n + 10))


@pytest.mark.slow
def test_digits_flipped_labels_are_found(digits_audit):
    t = digits_audit["result"].table
    flipped = digits_audit["data"].flipped
    n = digits_audit["n"]
    score = t["label_issue_score"].to_numpy()[:n]
    assert roc_auc_score(flipped, np.nan_to_num(score)) > 0.85
    flagged = t["is_label_issue"].to_numpy()[:n]
    assert flagged[flipped].mean() > 0.6  # recall
    assert flipped[flagged].mean() > 0.6  # precision


@pytest.mark.slow
def test_digits_duplicates_are_grouped(digits_audit):
    groups = digits_audit["result"].table["duplicate_group"].to_numpy()
    for s, c in zip(digits_audit["dup_src"], digits_audit["dups"]):
        assert groups[s] >= 0 and groups[s] == groups[c], (s, c)


@pytest.mark.slow
def test_digits_noise_images_are_outliers(digits_audit):
    t = digits_audit["result"].table
    out = t["is_outlier"].to_numpy()
    assert out[digits_audit["noise"]].sum() >= 4
    assert out[: digits_audit["n"]].mean() < 0.06


@pytest.mark.slow
def test_audit_leaves_the_model_as_it_was(digits_audit):
    model = digits_audit["model"]
    assert model.training  # mode restored
    for k, v in model.state_dict().items():
        assert torch.equal(v, digits_audit["state"][k])
    with nnsim_hooks.attach(model):  # hooks were removed: attaching again works
        pass
    model.eval()


@pytest.mark.slow
def test_labels_do_not_shape_the_similarity(digits_audit):
    """The features use the predicted class: permuting the labels changes the votes,
    never the neighbours."""
    model, ds = digits_audit["model"], digits_audit["ds"]
    x, y = ds.tensors
    shuffled = torch.utils.data.TensorDataset(x, y[torch.randperm(len(y), generator=torch.Generator().manual_seed(0))])
    other = nnsim_hooks.audit(model, shuffled, progress=False, sketch_dim=512, k=10)
    a, b = digits_audit["result"], other
    ids_a, sims_a = a.neighbor_arrays()
    ids_b, sims_b = b.neighbor_arrays()
    np.testing.assert_allclose(sims_a, sims_b, atol=1e-6)
    assert (ids_a == ids_b).mean() > 0.99
    np.testing.assert_allclose(a.table["density"], b.table["density"], rtol=1e-6)


@pytest.mark.slow
def test_table_has_the_promised_columns(digits_audit):
    t = digits_audit["result"].table
    for col in ["label_issue_score", "is_label_issue", "density", "effective_neighbors", "is_outlier",
                "duplicate_group", "neighbor_1", "similarity_1", "neighbor_10", "similarity_10", "prediction",
                "label", "denoising_factor", "consistency"]:
        assert col in t, col
    assert t.index.name == "sample" and list(t.index) == list(range(len(t)))
    assert t["duplicate_group"].dtype == np.int64 and (t["duplicate_group"] >= -1).all()
    assert pd.api.types.is_bool_dtype(t["is_label_issue"]) and pd.api.types.is_bool_dtype(t["is_outlier"])


def test_one_sample_dataset():
    model, data = trained_digits()
    ds = torch.utils.data.TensorDataset(data.images[:1], torch.as_tensor(data.noisy_labels[:1]))
    result = nnsim_hooks.audit(model, ds, progress=False, sketch_dim=64)
    t = result.table
    assert len(t) == 1
    assert math.isnan(t["label_issue_score"][0]) and not t["is_label_issue"][0] and not t["is_outlier"][0]
    assert t["duplicate_group"][0] == -1 and t["neighbor_1"][0] == -1
    assert "One sample" in result.report_html()
    assert result.knn_graph().shape == (1, 1)


def test_inputs_without_labels():
    model, data = trained_digits()
    ds = torch.utils.data.TensorDataset(data.images[:40])  # items are 1-tuples: bare inputs
    result = nnsim_hooks.audit(model, ds, progress=False, sketch_dim=64, k=5)
    t = result.table
    assert t["label"].isna().all() and t["label_issue_score"].isna().all() and not t["is_label_issue"].any()
    assert t["neighbor_1"].ge(0).all()
    assert result.summary["labelled"] == 0


@pytest.mark.slow
def test_default_outputs_full_for_neighbours_and_contrast_for_density():
    """Up to 16 classes the neighbours use all outputs and density/N_eff the predicted
    class's contrast (checked against an index built by hand); above, contrast alone."""
    from nnsim_hooks.audit.output_choice import contrast_predicted

    model, data = trained_digits()
    ds = torch.utils.data.TensorDataset(data.images[:80], torch.as_tensor(data.noisy_labels[:80]))
    result = nnsim_hooks.audit(model, ds, progress=False, k=5)
    assert result.summary["output"] == "full_outputs" and result.summary["denoising_output"] == "contrast_predicted"
    assert result.index.dim == 10 * 204 and result.denoise_index.dim == 1024
    with nnsim_hooks.attach(model, output=contrast_predicted, sketch_dim=1024) as h:
        oracle = h.build_index(torch.utils.data.TensorDataset(data.images[:80]), progress=False)
    np.testing.assert_allclose(result.table["density"], oracle.density(), rtol=1e-5)
    np.testing.assert_allclose(result.table["effective_neighbors"], oracle.effective_neighbors(), rtol=1e-5)

    torch.manual_seed(0)
    wide = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 20))
    many = nnsim_hooks.audit(wide, ds, progress=False, k=5)
    assert many.summary["output"] == "contrast_predicted" and many.denoise_index is None


@pytest.mark.slow
def test_headline_network_agrees_more_with_true_labels_than_with_its_noisy_ones(digits_audit):
    """The paper's auto-denoising on the (cached) digits CNN, and the audit's label-free
    estimate pointing the same way without the true labels."""
    model, data = digits_audit["model"], digits_audit["data"]
    pred = demo.predict_proba(model, data.images).argmax(1)
    true_agreement = float((pred == data.true_labels).mean())
    noisy_agreement = float((pred == data.noisy_labels).mean())
    assert true_agreement > noisy_agreement + 0.08
    den = digits_audit["result"].summary["denoising"]
    assert den["predicted_agreement_with_clean_labels"] > noisy_agreement + 0.08
    assert abs(den["estimated_noise_rate"] - data.flipped.mean()) < 0.05
    assert den["median_effective_neighbors"] > 5
