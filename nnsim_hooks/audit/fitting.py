"""``nnsim audit --train EPOCHS``: fit the audited model on the data itself, when the user
has no trained checkpoint, with one documented recipe.

The recipe (:class:`TrainingRecipe`): AdamW (lr 1e-3, weight decay 1e-4, the learning rate
decayed along a cosine to 0 over the epochs), batches of 64 (fewer samples for data
too small to give 16 batches an epoch: N/16, at least 8) reshuffled every epoch from a
seeded generator, cross-entropy on the given labels,
samples without a label left out, BatchNorm in train mode, no augmentation unless asked
(``augment``, ``--augment flip,shift,channels``: :mod:`nnsim_hooks.audit.augment`; the
audit itself always looks at the samples as given). Every model starts from the weights
it was given (random init, or a pretrained backbone to fine-tune).

Cross-fitting (``folds >= 2``). A network trained long enough memorises its wrong labels,
and then sees each mislabelled sample as similar to the class it was taught: its
neighbours share the wrong label and the vote cannot contradict it. So the labelled
samples are split into ``folds`` stratified parts, one model is trained on all parts
but one, and each sample is scored through the model that never saw it
(:mod:`nnsim_hooks.audit.cross_fit`). The model trained on all the data is kept too:
its checkpoint is the one the user gets, and the paper's density and denoising
describe it.

Checkpoints go to ``<out>/trained/``: ``model.pt`` and ``fold-<i>-of-<K>.pt``, with
``recipe.json``; an interrupted run reuses the models it finished with the same recipe.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import InputError

logger = logging.getLogger(__name__)

TRAINED_FOLDER = "trained"
SCHEDULES = ("cosine", "constant")
#: ``folds="auto"``: this many fold models (cleanlab's default too), fewer for small classes
AUTO, AUTO_FOLDS = "auto", 5
#: the automatic batch size (``batch_size=None``): 64, or samples / 16 (at least 8) for small data
DEFAULT_BATCH, STEPS_PER_EPOCH, MIN_AUTO_BATCH = 64, 16, 8


@dataclass(frozen=True)
class TrainingRecipe:
    """How ``--train`` fits a classifier (the defaults are the documented recipe)."""

    epochs: int
    lr: float = 1e-3
    weight_decay: float = 1e-4
    #: None: 64, or N/16 (at least 8) for data too small to give 16 batches an epoch (see :meth:`batch_for`)
    batch_size: Optional[int] = None
    #: cross-fitting: 0 for none, K >= 2 for K models, each blind to one K-th of the data, or
    #: "auto": 5, fewer when the smallest class has fewer labelled samples (see :func:`resolve_folds`)
    folds: Union[int, str] = 0
    seed: int = 0
    #: label-keeping transforms while training (:mod:`nnsim_hooks.audit.augment`): "none" or e.g. "flip,shift"
    augment: str = "none"
    #: the learning rate over the epochs: "cosine" (decayed to 0, stepped each epoch) or "constant"
    schedule: str = "cosine"

    def __post_init__(self):
        from .augment import parse_augment

        object.__setattr__(self, "augment", ",".join(parse_augment(self.augment)) or "none")
        if not isinstance(self.epochs, (int, np.integer)) or isinstance(self.epochs, bool) or self.epochs < 1:
            raise InputError(f"--train {self.epochs!r}: the number of epochs must be an integer >= 1")
        if self.folds != AUTO and (not isinstance(self.folds, (int, np.integer)) or isinstance(self.folds, bool)
                                   or self.folds < 0):
            raise InputError(f"--folds {self.folds!r}: must be 0 (no cross-fitting), an integer >= 2, or {AUTO}")
        if self.folds == 1:
            raise InputError("--folds 1 is not cross-fitting: use 0 (one model on all the data) or 2 or more")
        if self.schedule not in SCHEDULES:
            raise InputError(f"training recipe: schedule {self.schedule!r} is not one of {SCHEDULES}")
        if not self.lr > 0 or not (self.batch_size is None or self.batch_size >= 1) or not self.weight_decay >= 0:
            raise InputError(f"training recipe: lr must be > 0, batch_size >= 1 and weight_decay >= 0, got {self}")

    @classmethod
    def make(cls, value) -> Optional["TrainingRecipe"]:
        """``None``, a number of epochs, a dict of fields, or a recipe."""
        if value is None or isinstance(value, TrainingRecipe):
            return value
        if isinstance(value, dict):
            return cls(**value)
        return cls(epochs=value)

    def batch_for(self, samples: int) -> int:
        """The batch size for ``samples`` training samples: the one given, else 64, or fewer
        for small data so that an epoch still takes 16 steps (textures, 480 training samples
        a fold: batches of 32 instead of 64 raised the fold models' held-out accuracy from
        0.70 to 0.75, benchmarks/bench_recipe_steps.py)."""
        if self.batch_size is not None:
            return int(self.batch_size)
        return int(min(DEFAULT_BATCH, max(MIN_AUTO_BATCH, samples // STEPS_PER_EPOCH)))

    @property
    def cross_fitted(self) -> bool:
        return self.folds == AUTO or self.folds >= 2

    def as_dict(self) -> Dict:
        return asdict(self)


def check_trainable(labels: np.ndarray, recipe: TrainingRecipe) -> None:
    """Refuse, before any training, data the recipe cannot fit: fewer than two labelled
    classes, or a class with fewer labelled samples than folds."""
    labelled = labels[labels >= 0]
    classes, counts = np.unique(labelled, return_counts=True)
    if len(classes) < 2:
        found = "no labelled sample" if len(classes) == 0 else f"only class {int(classes[0])} ({int(counts[0])} samples)"
        raise InputError(f"--train needs labelled samples of at least 2 classes to fit a classifier; the data has "
                         f"{found}. Label the data, or audit with a trained model (--checkpoint)")
    if recipe.cross_fitted and recipe.folds != AUTO and counts.min() < recipe.folds:
        small = int(classes[np.argmin(counts)])
        raise InputError(f"--folds {recipe.folds}: class {small} has only {int(counts.min())} labelled samples, fewer "
                         f"than the folds; each fold needs one of every class. Use --folds {max(2, int(counts.min()))} "
                         "or fewer (at least 2), or --folds 0")


def resolve_folds(labels: np.ndarray, recipe: TrainingRecipe) -> TrainingRecipe:
    """``folds="auto"`` made a number: :data:`AUTO_FOLDS`, or the smallest labelled class's
    size when smaller (each fold needs one of every class); refused below 2. Measured on the
    label-issue benchmark's shapes (305 images): 5 folds reach AUROC 0.95, 2 folds 0.85 (each
    model sees half the data instead of four fifths)."""
    if recipe.folds != AUTO:
        return recipe
    classes, counts = np.unique(labels[labels >= 0], return_counts=True)
    smallest = int(counts.min()) if len(counts) else 0
    if smallest < 2:
        small = int(classes[np.argmin(counts)]) if len(counts) else -1
        raise InputError(f"--folds {AUTO}: class {small} has {smallest} labelled sample; cross-fitting needs 2 of "
                         "every class (one model must see each class while another is blind to a sample). Label more "
                         "samples of it, or --folds 0")
    return dataclasses.replace(recipe, folds=min(AUTO_FOLDS, smallest))


def fold_of_rows(labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """``[N]`` the fold of each row (stratified by label, seeded); unlabelled rows are
    spread over the folds too (they are scored, never trained on)."""
    rng = np.random.default_rng(seed)
    fold = np.empty(len(labels), dtype=np.int64)
    for c in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == c))
        fold[rows] = (np.arange(len(rows)) + rng.integers(folds)) % folds
    return fold


def fit_classifier(model: nn.Module, view, rows: np.ndarray, recipe: TrainingRecipe, *, seed: int,
                   progress: bool = False, desc: str = "train") -> Dict:
    """Train ``model`` in place on the labelled ``rows`` of ``view`` (an
    :class:`~nnsim_hooks.audit.samples.AuditView`); returns ``{"epochs", "train_accuracy"}``."""
    from torch.utils.data import DataLoader, Subset

    from ..data.batch_source import to_device
    from ..model_device import model_device_dtype
    from .augment import augment_batch, parse_augment

    device, _ = model_device_dtype(model)
    generator = torch.Generator().manual_seed(seed)
    rows = np.asarray(rows, dtype=np.int64)
    # a last batch of one sample is dropped: BatchNorm cannot train on a single sample
    batch_size = recipe.batch_for(len(rows))
    drop_last = len(rows) % batch_size == 1 and len(rows) > 1
    transforms = parse_augment(recipe.augment)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    # a decaying rate ends on a settled model (textures, 5 folds: held-out accuracy 0.68 -> 0.70,
    # benchmarks/bench_recipe_steps.py)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, recipe.epochs) if recipe.schedule == "cosine" else None
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=recipe.epochs, desc=desc, unit="epoch", leave=False)
    model.train()
    correct = seen = 0
    for epoch in range(recipe.epochs):
        correct = seen = 0
        order = rows[torch.randperm(len(rows), generator=generator).numpy()]  # the epoch's shuffle
        loader = DataLoader(Subset(view, order.tolist()), batch_size=batch_size, drop_last=drop_last)
        for x, y in loader:
            x, y = to_device(x, device), torch.as_tensor(y, device=device)
            keep = y >= 0
            if not bool(keep.any()):
                continue
            logits = model(augment_batch(x, transforms, generator))
            loss = F.cross_entropy(logits[keep], y[keep])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            correct += int((logits[keep].argmax(1) == y[keep]).sum())
            seen += int(keep.sum())
        if schedule is not None:
            schedule.step()
        if bar is not None:
            bar.update(1)
            bar.set_postfix(train_acc=f"{correct / max(seen, 1):.3f}")
    if bar is not None:
        bar.close()
    model.eval()
    return {"epochs": recipe.epochs, "batch_size": batch_size, "train_accuracy_last_epoch": correct / max(seen, 1)}


@dataclass
class TrainedModels:
    """What ``--train`` produced: the model trained on everything (trained in place),
    and, when cross-fitted, one model per fold with ``fold[i]`` the fold of view row i
    (the model ``fold_models[f]`` never saw the rows of fold f)."""

    model: nn.Module
    recipe: TrainingRecipe
    fold: Optional[np.ndarray] = None
    fold_models: Optional[List[nn.Module]] = None
    folder: Optional[Path] = None
    history: Optional[Dict] = None

    @property
    def cross_fitted(self) -> bool:
        return self.fold_models is not None

    def summary(self) -> Dict:
        out = {"recipe": self.recipe.as_dict(), "folds": self.recipe.folds if self.recipe.cross_fitted else 0}
        if self.folder is not None:
            out["checkpoint"] = str(self.folder / "model.pt")
        if self.history:
            out["history"] = self.history
        return out


#: what the recipe did before a field existed: a recipe.json without the field meant this
_BEFORE_FIELDS = {"augment": "none", "schedule": "constant", "batch_size": 64}


def _same_recipe(saved: str, recipe: TrainingRecipe) -> bool:
    """Whether ``saved`` (a recipe.json) is ``recipe``; a field it lacks (written before the
    field existed) takes the value the recipe had then."""
    try:
        return TrainingRecipe(**{**_BEFORE_FIELDS, **json.loads(saved)}) == recipe
    except (ValueError, TypeError, InputError):
        return False


def train_for_audit(model: nn.Module, view, labels: np.ndarray, recipe: TrainingRecipe, *,
                    folder: Optional[Path] = None, progress: bool = False) -> TrainedModels:
    """Fit ``model`` (in place) on the view's labelled rows, and the fold models when the
    recipe cross-fits; each starts from ``model``'s weights as given. With ``folder``,
    checkpoints are written there and reused when the recipe matches."""
    from ..atomic import write_bytes_atomic, write_text_atomic
    from ..safe_files import make_folder

    check_trainable(labels, recipe)
    recipe = resolve_folds(labels, recipe)
    initial = copy.deepcopy(model.state_dict())
    if folder is not None:
        make_folder(folder)
        saved = folder / "recipe.json"
        wanted = json.dumps(recipe.as_dict(), sort_keys=True)
        if saved.exists() and not _same_recipe(saved.read_text(encoding="utf-8"), recipe):
            raise InputError(f"{folder} holds models trained with another recipe ({saved.read_text(encoding='utf-8')}); "
                             "use another --out, or --overwrite")
        write_text_atomic(saved, wanted)

    def trained(name: str, rows: np.ndarray, seed: int, target: nn.Module, desc: str) -> Dict:
        path = None if folder is None else folder / name
        if path is not None and path.exists():
            target.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            logger.info("reusing %s", path)
            return {"reused": str(path)}
        target.load_state_dict(initial)
        history = fit_classifier(target, view, rows, recipe, seed=seed, progress=progress, desc=desc)
        if path is not None:
            import io

            buf = io.BytesIO()
            torch.save(target.state_dict(), buf)
            write_bytes_atomic(path, buf.getvalue())
        return history

    labelled = np.flatnonzero(labels >= 0)
    history = {"model": trained("model.pt", labelled, recipe.seed, model, "train (all data)")}
    result = TrainedModels(model=model.eval(), recipe=recipe, folder=folder, history=history)
    if recipe.cross_fitted:
        result.fold = fold_of_rows(labels, recipe.folds, recipe.seed)
        result.fold_models = []
        for f in range(recipe.folds):
            other = copy.deepcopy(model)
            rows = labelled[result.fold[labelled] != f]
            history[f"fold_{f}"] = trained(f"fold-{f}-of-{recipe.folds}.pt", rows, recipe.seed + 1 + f, other,
                                           f"train (fold {f + 1}/{recipe.folds})")
            result.fold_models.append(other.eval())
    return result
