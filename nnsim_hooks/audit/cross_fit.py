"""Cross-fitted neighbours: each sample seen through a model that never trained on it.

A model that has memorised a wrong label has bent its function around that sample, so
it sees the sample as similar to the class it was taught and the neighbour vote agrees
with the wrong label. A model trained without the sample has not: it sees the sample
as the samples that look like it. So with ``K`` fold models (:mod:`.fitting`), every
sample of fold ``f`` gets its ``k`` neighbours, among *all* samples, from the
similarity of fold model ``f`` (the same label-free output and sketch as the audit's
own index), and its prediction and probabilities from that model too (out-of-fold, as
cleanlab recommends for its own scores).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np


@dataclass
class CrossFitted:
    """``[N, k]`` neighbour rows and similarities, ``[N]`` predictions and ``[N, C]``
    probabilities, each from the fold model blind to the sample."""

    ids: np.ndarray
    sims: np.ndarray
    predictions: np.ndarray
    probabilities: Optional[np.ndarray]
    folds: int


def cross_fitted_neighbors(trained, view, k: int, *, output: Callable, sketch_dim: int, seed: int, batch_size: int,
                           folder: Optional[Path] = None, progress: bool = False) -> CrossFitted:
    """The neighbours, predictions and probabilities of every row of ``view`` through
    the fold model that never saw it (``trained``: a cross-fitted
    :class:`~nnsim_hooks.audit.fitting.TrainedModels`). Each fold model's index is built
    in ``folder / f"index-fold-{f}"`` (resumable) or in memory."""
    from .. import attach

    n = len(view)
    k = max(1, min(k, n - 1))
    ids = np.full((n, k), -1, dtype=np.int64)
    sims = np.full((n, k), np.nan, dtype=np.float64)
    predictions = np.full(n, -1, dtype=np.int64)
    probabilities = None
    for f, model in enumerate(trained.fold_models):
        held = np.flatnonzero(trained.fold == f)
        if len(held) == 0:
            continue
        path = None if folder is None else folder / f"index-fold-{f}"
        with attach(model, output=output, sketch_dim=sketch_dim, seed=seed, batch_size=batch_size) as handle:
            index = handle.build_index(view, path, batch_size=batch_size, progress=progress, task="classification",
                                       use_targets=False)
        features = np.asarray(index.features[held], dtype=np.float32)
        scores, rows = index.search(features, k, exclude=held)
        ids[held], sims[held] = rows, scores
        if index.predictions is not None:
            predictions[held] = np.asarray(index.predictions)[held]
        if index.probabilities is not None:
            p = np.asarray(index.probabilities, dtype=np.float64)
            if probabilities is None:
                probabilities = np.full((n, p.shape[1]), np.nan)
            probabilities[held] = p[held]
    return CrossFitted(ids, sims, predictions, probabilities, len(trained.fold_models))
