"""``nnsim_hooks.audit(model, dataset)``: the whole audit in one call."""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn

from ..errors import DataError, InputError, ModelError, NonFiniteGradientError
from ..index.sharded import distributed as dist_
from .analysis import analyse, skipped_rows
from .batch_memory import MemoryBudget, fit_batch_size, parse_memory
from .samples import AuditView, check_dataset, check_input, find_skipped, resolve_labels
from .output_folder import NEIGHBOR_STATE, prepare_out_dir
from .output_choice import (
    DEFAULT_K,
    DEFAULT_SKETCH_DIM,
    DENOISING_INDEX,
    contrast_predicted,
    default_output,
    default_sketch_dim,
    label_free_output,
)
from .result import AuditResult
from .run_arguments import require_audit_extra, usable_k  # noqa: F401 (re-exported)
from .neighbor_layers import describe as describe_layers
from .neighbor_layers import neighbor_selector
from .sample_names import resolve_class_names, resolve_paths
from .thresholds import Thresholds

logger = logging.getLogger(__name__)


def _probe(model: nn.Module, view: AuditView) -> torch.Tensor:
    """Run the model on the first sample: checks input and model early, with context."""
    x, _ = view[0]
    check_input(x, f"sample {int(view.positions[0])} of the dataset")
    from torch.utils.data.dataloader import default_collate

    from ..data.batch_source import to_device
    from ..model_device import model_device_dtype
    from ..validation import call_model

    device, _ = model_device_dtype(model)
    with torch.no_grad():
        out = call_model(model, to_device(default_collate([x]), device))
    if not torch.is_tensor(out):
        raise ModelError(
            f"the model returns {type(out).__name__}; the audit needs a tensor of logits [B, C] (wrap the model so "
            "that forward returns the logits)"
        )
    return out


def _pass(handle, view: AuditView, b: int) -> None:
    """One pass of the audit's capture on the first ``b`` samples (to measure its memory)."""
    from torch.utils.data.dataloader import default_collate

    from ..data.batch_source import to_device
    from ..validation import model_device_dtype

    device, _ = model_device_dtype(handle.model)
    inputs = to_device(default_collate([view[i][0] for i in range(b)]), device)
    with warnings.catch_warnings():  # the index build warns about these samples once, in order
        warnings.simplefilter("ignore")
        try:
            handle.extract(inputs)
        except NonFiniteGradientError:  # the build skips such samples; this pass only measures memory
            pass


def audit(
    model: Optional[nn.Module] = None,
    dataset=None,
    *,
    index: Union[None, str, Path] = None,
    recall: float = 0.95,
    exact_neighbors: Optional[bool] = None,
    labels: Optional[Sequence] = None,
    output: Union[None, str, Callable] = None,
    sketch_dim: Optional[int] = None,
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
    exact_density: bool = False,
    decisions: Union[None, str, Path] = None,
    paths: Optional[Sequence] = None,
    max_memory: MemoryBudget = None,
    train: Union[None, int, Dict[str, Any], "TrainingRecipe"] = None,
    neighbor_layers: Union[None, str, Sequence[str], Callable] = None,
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
      overall, and the label-free consistency check (the paper section 3);
    - **model state**: ``summary["warnings"]`` (empty when all is well) says when the model
      cannot show label errors or denoising (near-chance agreement, a class never
      predicted, memorised labels, no labels, many unscored labels), with what to do; the
      report opens with them (:mod:`nnsim_hooks.audit.checks.model_state`).

    Args:
        model: a trained classifier (``[B, C]`` logits); it is put in eval mode for the
            audit and its mode restored afterwards. Must not be attached already.
        dataset: a map-style torch Dataset of ``(input, label)`` pairs or of inputs.
            Missing labels are ``None``, NaN or negative (-1): such samples get no
            label-issue score and do not vote. Image folders with unreadable files: the
            files are skipped and counted (``readable=False`` rows).
        labels: one label per sample, overriding the dataset's (same missing markers).
        output: what is differentiated, never with the labels:

            - ``None`` (default): ``"full"`` for classifiers with at most 16 classes,
              ``"contrast"`` above, ``"sum"`` for other models;
            - ``"full"``: all C outputs, whitened (the paper's Tr(K_C)/d): the similarity
              of two inputs over every class, C backward passes per batch;
            - ``"contrast"``: the authors' scalar for the predicted class, one backward
              pass. Neighbours then mostly share the predicted class, so once a network
              has memorised its noisy labels they share the label too and wrong labels
              hide (measured in ``benchmarks/results/label_issues.md``);
            - ``"logit"``, ``"sum"`` or a callable ``fn(outputs, targets)`` (it gets ``targets=None``).
        sketch_dim: feature dimension per output (see :func:`nnsim_hooks.attach`); None:
            1024, or ``max(128, 2048 // C)`` per output for ``"full"``.
        k: neighbours per sample; more than the dataset's samples with a gradient, less
            one, is clamped to that number with a warning.
        out_dir: a folder for everything (index store, table, report). The index is built
            inside it, so an interrupted audit resumes when called again with the same
            arguments; a finished one is refused unless ``overwrite=True``. None keeps
            everything in memory (call :meth:`AuditResult.save` later).
        progress: tqdm progress bars.
        thresholds: a :class:`Thresholds` or a dict of some of its fields.
        batch_size: samples per forward/backward pass, at most: lowered (with a warning)
            when a pass of that many would not fit in ``max_memory``.
        max_memory: the memory a pass may use, in bytes or as text (``"8GB"``, ``"512MB"``);
            default: 70% of the available RAM (``MemAvailable``), or of the GPU's free
            memory. A pass's peak is measured on 1 and 8 samples before the first pass
            and extrapolated (:mod:`nnsim_hooks.audit.batch_memory`); when one sample
            does not fit, an :class:`~nnsim_hooks.errors.InputError` says how much it needs.
        class_names: class names, index = class (default: the dataset's ``classes``); the
            table gets ``label_name``, ``prediction_name``, ``suggested_label_name``.
            Without names, a class is named by its index.
        thumbnail: ``fn(raw_sample) -> uint8 array | None`` for the report's pictures
            (see :mod:`nnsim_hooks.audit.thumbnails`).
        seed: the sketch seed.
        overwrite: replace a finished audit in ``out_dir``.
        extra: JSON-able facts shown in the report and summary (the demo's truth).
        config: what identifies this run for resuming (default: the arguments above).
        save: write the result to ``out_dir`` at the end (False: only the index is
            stored there; call :meth:`AuditResult.save` yourself).
        exact_density: compute the density column exactly, with no sketch
            (:meth:`nnsim_hooks.Handle.density`: two more passes over the data) instead
            of from the index's sketched features. The summary's ``"density"`` and the
            report say which was used.
        decisions: the CSV of decisions exported from an earlier report
            (``path_or_index,decision,new_label``; see :mod:`nnsim_hooks.audit.decisions`):
            removed samples are left out and relabelled ones audited with their new label;
            the summary's ``"decisions"`` records what was applied. Samples are named as in
            ``dataset`` (its file paths, or its indices); a CSV naming samples it does not
            hold is an :class:`~nnsim_hooks.errors.InputError` listing them.
        paths: one file path per sample (None for a sample without one), shown in the
            table's ``path`` column and the report's galleries. Default: the dataset's own
            files (``dataset.paths``, or ``samples`` of an ImageFolder), relative to its
            root (``source`` or ``root``); none for other datasets (the table's index,
            ``sample``, names every row by its dataset position).

        index: a finished index folder (or an earlier audit's output folder) to audit
            instead of ``model`` and ``dataset``: nothing is extracted again (see
            :func:`nnsim_hooks.audit.stored.audit_index`; ``k``, ``out_dir``,
            ``thresholds``, ``class_names``, ``max_memory``, ``progress``, ``overwrite``,
            ``save`` apply).
        recall: the neighbour step's target recall@k, in (0, 1]: large indexes are searched
            approximately with the partition's ``nprobe`` chosen to reach it on held-out exact
            queries (the summary's ``"neighbors"`` gives the recall measured); 1 searches exactly.
        exact_neighbors: True: exact neighbour search at any size; None: chosen by size.
        train: fit the model on the audited data before auditing it, for when there is
            no trained checkpoint: a number of epochs, a dict of
            :class:`~nnsim_hooks.audit.fitting.TrainingRecipe` fields (``epochs``, ``lr``,
            ``weight_decay``, ``batch_size``, ``folds``, ``seed``, ``augment``, ``schedule``)
            or a recipe. The model is trained in place from the weights it has (AdamW, the
            recipe in :mod:`nnsim_hooks.audit.fitting`); checkpoints go to
            ``out_dir/trained/``. A number of epochs alone does not cross-fit (``folds`` 0;
            ``nnsim audit --train`` does, with ``folds="auto"``: 5, fewer for small classes).
            With ``folds >= 2`` or ``"auto"`` (cross-fitting), ``folds`` more models are trained, each
            blind to one part of the data, and every sample's neighbours, prediction and
            probabilities come from the model that never saw it
            (:mod:`nnsim_hooks.audit.cross_fit`): wrong labels that the model trained on
            everything has memorised still stand out. The summary's ``"training"`` says
            what was done. Needs labels of at least 2 classes.
        neighbor_layers: the layers whose gradients give the neighbours (label issues,
            duplicates, rare samples): None (every layer), ``"first_half"`` (the first half
            of the modules that hold parameters: for a model that has memorised its labels,
            see :mod:`nnsim_hooks.audit.neighbor_layers`), or module names / patterns /
            ``fn(name, module)`` as :func:`nnsim_hooks.attach` takes. Density and denoising
            always use every layer.

    Returns:
        an :class:`AuditResult` (saved to ``out_dir`` already when one was given).

    A dataset of one sample works: it has no neighbours, so every score is NaN and
    nothing is flagged.

    Under torch.distributed (``torchrun --nproc_per_node=N``, every rank calling this with
    the same arguments), the index builds are shared between the ranks (see
    :mod:`nnsim_hooks.index.sharded.build`), every rank analyses the merged index and
    returns the same result, and only rank 0 writes into ``out_dir`` (the ranks write
    their shares only inside its index folders).
    """
    from .. import attach

    if index is not None:
        if model is not None or dataset is not None:
            raise InputError("give index= (a stored index to audit) or a model and a dataset, not both")
        from .stored import audit_index

        return audit_index(index, out_dir=out_dir, k=k, recall=recall, exact_neighbors=exact_neighbors,
                           max_memory=max_memory, thresholds=thresholds, progress=progress, overwrite=overwrite,
                           save=save, class_names=class_names)
    from ..index.all_neighbors import check_recall

    check_recall(recall)
    started = time.time()
    require_audit_extra()
    if not isinstance(model, nn.Module):
        raise InputError(f"audit() needs a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
        raise InputError(f"k must be a positive integer, got {k!r}")
    limits = Thresholds.make(thresholds)
    from .fitting import TrainingRecipe

    recipe = TrainingRecipe.make(train)
    layers_used = describe_layers(model, neighbor_layers)  # the summary's, the run config's and the checks' name
    parse_memory(max_memory)  # a malformed budget fails now, not after the file checks
    n_total = check_dataset(dataset)
    user_labels = resolve_labels(dataset, labels, n_total)
    sample_paths = resolve_paths(dataset, paths, n_total)
    names = resolve_class_names(dataset, class_names)
    decision_record = None
    if decisions is not None:
        from .decisions import apply_decisions

        dataset, user_labels, decision_record = apply_decisions(dataset, decisions, labels=user_labels,
                                                                class_names=class_names)
        n_total = len(dataset)
        if sample_paths is not None:  # the paths were resolved on the dataset before the decisions
            sample_paths = [sample_paths[int(p)] for p in dataset.positions]

    ctx = dist_.current()  # a torch.distributed group of several processes, or None
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
        if decisions is not None:  # only then: runs without decisions keep the configuration they resume with
            from .decisions import fingerprint

            run_config["decisions"] = fingerprint(decisions)
        if recipe is not None and "train" not in run_config:
            run_config["train"] = recipe.as_dict()
        if neighbor_layers is not None and "neighbor_layers" not in run_config:  # else: as runs before the option
            run_config["neighbor_layers"] = layers_used
        # under torchrun only rank 0 writes the audit's files; the ranks share the index build
        dist_.on_main(ctx, "preparing the audit folder", lambda: prepare_out_dir(out_path, run_config, overwrite=overwrite))

    unreadable, non_finite = find_skipped(dataset, progress=progress) or (np.zeros(0, np.int64), np.zeros(0, np.int64))
    positions = np.setdiff1d(np.arange(n_total), np.union1d(unreadable, non_finite))
    if len(positions) == 0:
        raise DataError(f"none of the {n_total} files of the dataset could be read ({len(non_finite)} hold NaN or Inf "
                        "values); nothing to audit")
    view = AuditView(dataset, user_labels, positions)

    was_training = model.training
    trained = None
    if recipe is not None:
        from .fitting import TRAINED_FOLDER, train_for_audit
        from .samples import labels_of

        if ctx is not None:
            raise InputError("audit(train=...) under torchrun is not supported: train once (one process), then audit "
                             "the saved checkpoint under torchrun")
        trained = train_for_audit(model, view, labels_of(view), recipe,
                                  folder=None if out_path is None else out_path / TRAINED_FOLDER, progress=progress)
        was_training = False  # a model trained here is handed back ready to use
    model.eval()
    try:
        probe = _probe(model, view)
        classifier = probe.dim() == 2 and probe.shape[1] >= 2
        num_classes = int(probe.shape[1]) if classifier else None
        if output is None:
            output = default_output(classifier, num_classes)
        if sketch_dim is None:
            sketch_dim = default_sketch_dim(output if isinstance(output, str) else "", num_classes)
        if classifier:
            view.num_classes = int(probe.shape[1])
            if user_labels is not None and (user_labels >= probe.shape[1]).any():
                bad = np.flatnonzero(user_labels >= probe.shape[1])[:5]
                raise DataError(
                    f"labels {user_labels[bad].tolist()} (samples {bad.tolist()}) are not below the model's "
                    f"{probe.shape[1]} classes; labels must index the model's outputs"
                )
        fn = label_free_output(output, classifier)
        task = "classification" if classifier else "auto"
        selector = neighbor_selector(model, neighbor_layers)
        with attach(model, output=fn, layers=selector, sketch_dim=sketch_dim, seed=seed,
                    batch_size=batch_size) as handle:
            # the first output is the heavier one (all C outputs): its passes set the batch size
            # under torchrun every rank measures its own pass; all take the smallest batch
            batch_size = dist_.everywhere(ctx, "fitting the batch size to memory", lambda: fit_batch_size(
                lambda b: _pass(handle, view, b), probe.device, batch_size, len(view), max_memory))
            if ctx is not None:
                batch_size = min(dist_.all_gather(ctx, batch_size, "agreeing on the batch size"))
            index = handle.build_index(view, None if out_path is None else out_path / "index",
                                       batch_size=batch_size, progress=progress, task=task, use_targets=False)
            output_name = handle.output_name
        denoise_index = None
        if (classifier and fn is not contrast_predicted) or selector is not None:
            # The paper's density and denoising are defined for the classifier's scalar
            # (the predicted class's contrast): with all C outputs, every pair of inputs is
            # similar (ReLU features have positive cosines) and N_eff would approach N.
            # They take every layer, whichever layers the neighbours use.
            with attach(model, output=contrast_predicted if classifier else fn,
                        sketch_dim=DEFAULT_SKETCH_DIM if classifier else sketch_dim, seed=seed,
                        batch_size=batch_size) as handle:
                denoise_index = handle.build_index(
                    view, None if out_path is None else out_path / DENOISING_INDEX,
                    batch_size=batch_size, progress=progress, task=task, use_targets=False)
        cross_fitted = None
        if trained is not None and trained.cross_fitted:
            from .cross_fit import cross_fitted_neighbors

            cross_fitted = cross_fitted_neighbors(trained, view, usable_k(int(k), index.n_valid), output=fn,
                                                  sketch_dim=sketch_dim, seed=seed, batch_size=batch_size,
                                                  folder=out_path, progress=progress)
        density = None
        if exact_density:
            paper_output = contrast_predicted if denoise_index is not None else fn
            # without the samples the builds skipped (NaN or Inf): they are not in any sum
            finite = ~skipped_rows(*[i for i in (index, denoise_index) if i is not None])
            with attach(model, output=paper_output, seed=seed, batch_size=batch_size) as handle:
                density = np.full(len(view), np.nan)
                density[finite] = handle.density(AuditView(dataset, user_labels, positions[finite]),
                                                 batch_size=batch_size, progress=progress, use_targets=False)
    finally:
        model.train(was_training)

    result = analyse(
        index,
        positions=positions,
        n_total=n_total,
        k=usable_k(int(k), index.n_valid),
        thresholds=limits,
        num_classes=num_classes,
        progress=progress,
        denoise_index=denoise_index,
        density=density,
        dataset=dataset,
        paths=sample_paths,
        class_names=names,
        non_finite=non_finite,
        recall=recall,
        exact_neighbors=exact_neighbors,
        # resumable in blocks; under torchrun every rank searches alone (no shared progress file)
        neighbor_state=None if out_path is None or ctx is not None else out_path / NEIGHBOR_STATE,
        context={"neighbor_layers": layers_used,
                 "cross_fitted": 0 if cross_fitted is None else cross_fitted.folds},
        **({} if cross_fitted is None else {"neighbors": (cross_fitted.ids, cross_fitted.sims),
                                            "predictions": cross_fitted.predictions,
                                            "probabilities": cross_fitted.probabilities}),
    )
    for p in positions[skipped_rows(*[i for i in (index, denoise_index) if i is not None])][:10]:
        name = sample_paths[p] if sample_paths is not None and sample_paths[p] is not None else None
        logger.warning("skipping sample %d%s: its input or gradient holds NaN or Inf", p, f" ({name})" if name else "")
    result.dataset = dataset
    result.thumbnail = thumbnail
    result.summary.update(
        {
            "model": type(model).__name__,
            "output": output_name,
            "sketch_dim": int(sketch_dim),
            "batch_size": int(batch_size),  # after fitting max_memory
            "denoising_output": "contrast_predicted" if denoise_index is not None and classifier else output_name,
            "denoising_sketch_dim": DEFAULT_SKETCH_DIM if denoise_index is not None and classifier else int(sketch_dim),
            "neighbor_layers": layers_used,
            "seconds": round(time.time() - started, 2),
        }
    )
    if trained is not None:
        result.summary["training"] = trained.summary()
        if trained.cross_fitted:  # exact searches, each through the fold model blind to the sample
            result.summary["neighbors"] = {**result.summary.get("neighbors", {}), "method": "cross-fitted",
                                           "folds": trained.recipe.folds, "recall_measured": 1.0}
    if extra:
        result.summary["extra"] = dict(extra)
    if decision_record is not None:
        result.summary["decisions"] = decision_record
    if out_path is not None and save:
        dist_.on_main(ctx, "saving the audit", lambda: result.save(out_path, _finish=True))
        if ctx is None:
            from ..index.all_neighbors import remove_state

            remove_state(out_path / NEIGHBOR_STATE)
    return result
