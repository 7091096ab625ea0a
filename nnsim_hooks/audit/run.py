"""``nnsim_hooks.audit(model, dataset)``: the whole audit in one call."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn

from ..errors import DataError, InputError, ModelError
from ..outputs import contrast, total
from . import checks
from .data import AuditView, check_dataset, check_input, fast_labels, find_unreadable, resolve_labels, split_item
from .io import prepare_out_dir
from .result import AuditResult
from .thresholds import Thresholds

logger = logging.getLogger(__name__)

#: Neighbours kept per sample (the label vote, the galleries, the cleanlab graph).
DEFAULT_K = 10
#: Sketch dimension of the audit's features.
DEFAULT_SKETCH_DIM = 1024
#: Output functions the audit accepts by name: all of them ignore labels.
OUTPUTS = ("contrast", "full", "logit", "sum")


def contrast_predicted(outputs: torch.Tensor, targets: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The authors' classifier scalar for the *predicted* class, whatever the targets:
    the audit stores labels beside the features but must never let them shape the
    similarity (a wrong label would pull a sample towards the wrong class)."""
    return contrast(outputs, None)


def full_outputs(outputs: torch.Tensor, targets: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Every output of a sample (the whitened d x d kernel of PAPER section 1)."""
    return outputs.reshape(outputs.shape[0], -1)


def logit_predicted(outputs: torch.Tensor, targets: Optional[torch.Tensor] = None) -> torch.Tensor:
    return outputs.gather(1, outputs.argmax(1, keepdim=True)).squeeze(1)


def sum_outputs(outputs: torch.Tensor, targets: Optional[torch.Tensor] = None) -> torch.Tensor:
    return total(outputs)


_LABEL_FREE = {"contrast": contrast_predicted, "full": full_outputs, "logit": logit_predicted, "sum": sum_outputs}


def label_free_output(output: Union[None, str, Callable], classifier: bool) -> Callable:
    """The output function for ``audit(output=...)``: never reads targets."""
    if output is None:
        output = "contrast" if classifier else "sum"
    if callable(output):
        return output
    if output not in _LABEL_FREE:
        raise InputError(
            f"audit(output={output!r}): the audit needs a label-free output, one of {OUTPUTS} or a callable "
            "fn(outputs, targets) that ignores targets ('loss' would let a wrong label decide the similarity)"
        )
    if output in ("contrast", "logit") and not classifier:
        raise InputError(f"audit(output={output!r}) needs a classifier returning logits [B, C] with C >= 2")
    return _LABEL_FREE[output]


def _probe(model: nn.Module, view: AuditView) -> torch.Tensor:
    """Run the model on the first sample: checks input and model early, with context."""
    x, _ = view[0]
    check_input(x, f"sample {int(view.positions[0])} of the dataset")
    from torch.utils.data.dataloader import default_collate

    from ..index.data import to_device
    from ..validation import call_model, model_device_dtype

    device, _ = model_device_dtype(model)
    with torch.no_grad():
        out = call_model(model, to_device(default_collate([x]), device))
    if not torch.is_tensor(out):
        raise ModelError(
            f"the model returns {type(out).__name__}; the audit needs a tensor of logits [B, C] (wrap the model so "
            "that forward returns the logits)"
        )
    return out


def audit(
    model: nn.Module,
    dataset,
    *,
    labels: Optional[Sequence] = None,
    output: Union[None, str, Callable] = None,
    sketch_dim: int = DEFAULT_SKETCH_DIM,
    k: int = DEFAULT_K,
    out_dir: Optional[Union[str, Path]] = None,
    progress: bool = True,
    thresholds: Union[None, Thresholds, Dict[str, Any]] = None,
    batch_size: int = 64,
    class_names: Optional[Sequence[str]] = None,
    thumbnail: Optional[Callable] = None,
    seed: int = 0,
    overwrite: bool = False,
    extra: Optional[Dict[str, Any]] = None,
    config: Optional[Dict[str, Any]] = None,
    save: bool = True,
) -> AuditResult:
    """Audit a labelled dataset through a trained classifier's own notion of similarity.

    For every sample the gradient of the network's output for its *predicted* class is
    sketched (labels never shape the similarity), indexed, and its ``k`` nearest
    neighbours found. From them:

    - **label issues**: the similarity-weighted vote of the neighbours' labels
      (``label_issue_score`` = share of the vote against the sample's own label);
    - **near-duplicates**: groups linked by similarity >= a threshold, one representative each;
    - **outliers**: samples whose mean similarity to their neighbours is unusually low;
    - **denoising**: the paper's ``N_eff`` and ``1 / N_eff`` per sample, per class and
      overall, and the label-free consistency check (../shared/PAPER.md section 3).

    Args:
        model: a trained classifier (``[B, C]`` logits); it is put in eval mode for the
            audit and its mode restored afterwards. Must not be attached already.
        dataset: a map-style torch Dataset of ``(input, label)`` pairs or of inputs.
            Missing labels are ``None``, NaN or negative (-1): such samples get no
            label-issue score and do not vote. Image folders with unreadable files: the
            files are skipped and counted (``readable=False`` rows).
        labels: one label per sample, overriding the dataset's (same missing markers).
        output: what is differentiated: ``None`` (the predicted class's contrast for
            classifiers), ``"contrast"``, ``"full"`` (all C outputs, whitened: better on
            small C, C times the cost), ``"logit"``, ``"sum"`` or a callable that ignores targets.
        sketch_dim: feature dimension per output (see :func:`nnsim_hooks.attach`).
        k: neighbours per sample.
        out_dir: a folder for everything (index store, table, report). The index is built
            inside it, so an interrupted audit resumes when called again with the same
            arguments; a finished one is refused unless ``overwrite=True``. None keeps
            everything in memory (call :meth:`AuditResult.save` later).
        progress: tqdm progress bars.
        thresholds: a :class:`Thresholds` or a dict of some of its fields.
        batch_size: samples per forward/backward pass.
        class_names: names for the report (index = class).
        thumbnail: ``fn(raw_sample) -> uint8 array | None`` for the report's pictures
            (see :mod:`nnsim_hooks.audit.thumbnails`).
        seed: the sketch seed.
        overwrite: replace a finished audit in ``out_dir``.
        extra: JSON-able facts shown in the report and summary (the demo's truth).
        config: what identifies this run for resuming (default: the arguments above).
        save: write the result to ``out_dir`` at the end (False: only the index is
            stored there; call :meth:`AuditResult.save` yourself).

    Returns:
        an :class:`AuditResult` (saved to ``out_dir`` already when one was given).

    A dataset of one sample works: it has no neighbours, so every score is NaN and
    nothing is flagged.
    """
    from .. import attach

    started = time.time()
    if not isinstance(model, nn.Module):
        raise InputError(f"audit() needs a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
        raise InputError(f"k must be a positive integer, got {k!r}")
    limits = Thresholds.make(thresholds)
    n_total = check_dataset(dataset)
    user_labels = resolve_labels(dataset, labels, n_total)

    out_path = Path(out_dir) if out_dir is not None else None
    if out_path is not None:
        run_config = config if config is not None else {
            "dataset": f"{type(dataset).__name__}[{n_total}]",
            "model": type(model).__name__,
            "output": output if isinstance(output, (str, type(None))) else getattr(output, "__name__", "callable"),
            "sketch_dim": sketch_dim,
            "seed": seed,
            "batch_size": batch_size,
        }
        prepare_out_dir(out_path, run_config, overwrite=overwrite)

    unreadable = find_unreadable(dataset, progress=progress)
    if unreadable is None:
        unreadable = np.zeros(0, dtype=np.int64)
    positions = np.setdiff1d(np.arange(n_total), unreadable)
    if len(positions) == 0:
        raise DataError(f"none of the {n_total} files of the dataset could be read; nothing to audit")
    view = AuditView(dataset, user_labels, positions)

    was_training = model.training
    model.eval()
    try:
        probe = _probe(model, view)
        classifier = probe.dim() == 2 and probe.shape[1] >= 2
        if classifier:
            view.num_classes = int(probe.shape[1])
            if user_labels is not None and (user_labels >= probe.shape[1]).any():
                bad = np.flatnonzero(user_labels >= probe.shape[1])[:5]
                raise DataError(
                    f"labels {user_labels[bad].tolist()} (samples {bad.tolist()}) are not below the model's "
                    f"{probe.shape[1]} classes; labels must index the model's outputs"
                )
        fn = label_free_output(output, classifier)
        with attach(model, output=fn, sketch_dim=sketch_dim, seed=seed, batch_size=batch_size) as handle:
            index = handle.build_index(
                view,
                None if out_path is None else out_path / "index",
                batch_size=batch_size,
                progress=progress,
                task="classification" if classifier else "auto",
            )
            output_name = handle.output_name
    finally:
        model.train(was_training)

    num_classes = int(probe.shape[1]) if classifier else None
    result = analyse(
        index,
        positions=positions,
        n_total=n_total,
        k=int(k),
        thresholds=limits,
        num_classes=num_classes,
        progress=progress,
    )
    result.dataset = dataset
    result.thumbnail = thumbnail
    result.class_names = list(class_names) if class_names is not None else None
    result.summary.update(
        {
            "model": type(model).__name__,
            "output": output_name,
            "sketch_dim": int(sketch_dim),
            "seconds": round(time.time() - started, 2),
        }
    )
    if extra:
        result.summary["extra"] = dict(extra)
    if out_path is not None and save:
        result.save(out_path, _finish=True)
    return result


def analyse(
    index,
    *,
    positions: Optional[np.ndarray] = None,
    n_total: Optional[int] = None,
    k: int = DEFAULT_K,
    thresholds: Optional[Thresholds] = None,
    num_classes: Optional[int] = None,
    progress: bool = False,
) -> AuditResult:
    """Every check on a built :class:`~nnsim_hooks.index.GradientIndex` (no model needed).

    ``positions[i]`` is the dataset position of the index's sample ``i`` (default: the
    same); ``n_total`` the dataset's length (rows not in the index are unreadable).
    """
    import pandas as pd

    limits = thresholds or Thresholds()
    n = len(index)
    positions = np.arange(n) if positions is None else np.asarray(positions, dtype=np.int64)
    n_total = n if n_total is None else int(n_total)
    valid = np.asarray(index.valid, dtype=bool)
    labels = np.asarray(index.labels, dtype=np.int64) if index.labels is not None else np.full(n, -1, np.int64)
    labels = np.where(labels >= 0, labels, -1)
    predictions = (
        np.asarray(index.predictions, dtype=np.int64) if index.predictions is not None else np.full(n, -1, np.int64)
    )
    probs = np.asarray(index.probabilities, dtype=np.float64) if index.probabilities is not None else None
    if num_classes is None:
        if probs is not None:
            num_classes = probs.shape[1]
        else:
            num_classes = int(max(labels.max(initial=-1), predictions.max(initial=-1)) + 1)
    out_of_range = labels >= num_classes
    if out_of_range.any():
        bad = np.flatnonzero(out_of_range)[:5]
        raise DataError(
            f"labels {labels[bad].tolist()} (samples {positions[bad].tolist()}) are not below the model's "
            f"{num_classes} classes; pass labels that index the model's outputs"
        )

    # Neighbours, in index rows; mapped to dataset positions for the table.
    if n >= 2:
        sims, ids = index.neighbors(k, progress=progress)
        sims = sims.astype(np.float64)
    else:
        sims, ids = np.full((n, k), np.nan), np.full((n, k), -1, dtype=np.int64)
    ok = checks.usable_neighbors(ids, sims)
    ids = np.where(ok, ids, -1)
    sims = np.where(ok, sims, np.nan)

    vote = checks.neighbor_label_vote(ids, sims, labels, max(num_classes, 1), limits.label_issue)
    top1 = sims[:, 0] if sims.shape[1] else np.full(n, np.nan)
    dup_threshold = checks.duplicate_threshold(top1, limits.duplicate, limits.duplicate_quantile)
    groups = checks.duplicate_groups(ids, sims, dup_threshold)
    local = checks.knn_similarity(ids, sims)
    out_threshold = checks.outlier_threshold(local, limits.outlier_z, limits.outlier_quantile)
    is_outlier = checks.flag_below(local, out_threshold)
    preference = np.nan_to_num(vote.score, nan=0.0) - 1e-3 * np.nan_to_num(local, nan=0.0)
    representative = checks.group_representatives(groups, preference)

    density = np.asarray(index.density(), dtype=np.float64) if n else np.zeros(0)
    n_eff = np.asarray(index.effective_neighbors(), dtype=np.float64)
    denoise = np.asarray(index.denoising_factor(), dtype=np.float64)
    try:
        consistency = np.asarray(index.consistency(), dtype=np.float64)
    except DataError:
        consistency = np.full(n, np.nan)

    # One row per dataset sample; unreadable ones keep NaN / missing values.
    rows = pd.Index(np.arange(n_total), name="sample")
    table = pd.DataFrame(index=rows)
    table["readable"] = np.isin(np.arange(n_total), positions)
    table["valid"] = False
    table.loc[positions, "valid"] = valid

    def put(name, values, fill=np.nan, dtype=np.float64):
        col = np.full(n_total, fill, dtype=dtype)
        col[positions] = values
        table[name] = col

    def put_class(name, values):
        col = np.full(n_total, -1, dtype=np.int64)
        col[positions] = values
        arr = pd.array(col, dtype="Int64")
        arr[col < 0] = pd.NA
        table[name] = arr

    put_class("label", labels)
    put_class("prediction", predictions)
    if probs is not None:
        p_label = np.full(n, np.nan)
        has = labels >= 0
        p_label[has] = probs[has, labels[has]]
        put("label_probability", p_label, dtype=np.float64)
        put("confidence", probs.max(1), dtype=np.float64)
    put("label_issue_score", vote.score, dtype=np.float64)
    put("is_label_issue", vote.flagged, fill=False, dtype=bool)
    put_class("suggested_label", vote.suggested)
    put("density", density, dtype=np.float64)
    put("knn_similarity", local, dtype=np.float64)
    put("is_outlier", is_outlier, fill=False, dtype=bool)
    put("effective_neighbors", n_eff, dtype=np.float64)
    put("denoising_factor", denoise, dtype=np.float64)
    put("consistency", consistency, dtype=np.float64)
    put("gradient_norm", np.asarray(index.norms, dtype=np.float64), dtype=np.float64)
    put("duplicate_group", groups, fill=-1, dtype=np.int64)
    put("duplicate_representative", representative, fill=False, dtype=bool)
    mapped = np.where(ids >= 0, positions[np.clip(ids, 0, None)], -1)
    for j in range(ids.shape[1]):
        put(f"neighbor_{j + 1}", mapped[:, j], fill=-1, dtype=np.int64)
    for j in range(ids.shape[1]):
        put(f"similarity_{j + 1}", sims[:, j], dtype=np.float64)

    info = {
        "duplicate_threshold": dup_threshold,
        "outlier_threshold": out_threshold,
        "top1_similarity": top1,
    }
    return AuditResult.build(table, index=index, thresholds=limits, k=k, num_classes=num_classes, info=info)
