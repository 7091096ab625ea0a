"""Shared, cached pieces for the audit tests (a helper module, not a conftest)."""

from __future__ import annotations

import functools

import numpy as np
import torch

from nnsim_hooks.audit import demo


def clustered_features(n_per_class=40, classes=4, dim=32, spread=0.25, seed=0):
    """Unit feature rows in ``classes`` tight clusters (cosine ~0.9 within, ~0 across)
    and their cluster labels."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = np.repeat(np.arange(classes), n_per_class)
    feats = centres[labels] + spread * rng.normal(size=(len(labels), dim)) / np.sqrt(dim)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    return feats.astype(np.float32), labels


@functools.lru_cache(maxsize=None)
def trained_digits(limit=600, noise=0.15, epochs=25, seed=0):
    """A small CNN trained on a noisy digits subset (cached for the test session)."""
    torch.manual_seed(seed)
    data = demo.noisy_digits(noise, seed=seed, limit=limit)
    model = demo.small_cnn(width=8, seed=seed)
    demo.train(model, data.images, data.noisy_labels, epochs=epochs, lr=3e-3, seed=seed)
    model.eval()
    return model, data


def brute_force_knn(features: np.ndarray, k: int):
    """``(sims, ids)`` of the k most similar other rows, by a full product."""
    sims = features.astype(np.float64) @ features.astype(np.float64).T
    np.fill_diagonal(sims, -np.inf)
    ids = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, ids, 1), ids


def digits_with_every_finding():
    """A trained digits CNN and a dataset with something in every gallery of the report:
    20% flipped labels, three exact duplicates and three noise images."""
    data = demo.noisy_digits(0.2, seed=0, limit=160)
    model = demo.small_cnn(width=4)
    demo.train(model, data.images, data.noisy_labels, epochs=8, lr=3e-3)
    x = torch.cat([data.images, data.images[:3], torch.rand(3, 1, 8, 8)])
    y = np.concatenate([data.noisy_labels, data.noisy_labels[:3], [0, 1, 2]])
    ds = torch.utils.data.TensorDataset(x, torch.as_tensor(y))
    return model, ds
