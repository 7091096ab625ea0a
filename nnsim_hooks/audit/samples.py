"""What the audit reads from a dataset: inputs, labels (some may be missing), readability.

Labels. A dataset item is either ``(input, label)`` or a bare input. A label is missing
when it is ``None``, NaN or negative (``-1`` is the usual marker); it is stored as -1.
Samples without a label get no label-issue score, do not vote for their neighbours'
labels, and count in the report. Labels passed to :func:`nnsim_hooks.audit` with
``labels=`` take precedence over the dataset's.

Unreadable images. For datasets that read image files through a ``loader`` and list
them in ``samples`` (torchvision's ``ImageFolder``/``DatasetFolder``, and
``nnsim_hooks.integrations.load_dataset``'s folders, CSVs and datalists), the audit first
tries to read every file; those that fail are skipped wherever they sort, kept in the
table with ``readable=False`` and counted in the report, and the probe of the model runs
on the first readable sample. Any other dataset whose ``__getitem__`` fails stops the
audit with a :class:`~nnsim_hooks.errors.DataError` that names the sample.
"""

from __future__ import annotations

import logging
import math
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, Subset, TensorDataset

from ..errors import DataError, InputError, NonFiniteInputError

logger = logging.getLogger(__name__)

MISSING = -1


def to_label(value: Any, where: str) -> int:
    """A class index, or -1 for a missing label."""
    if value is None:
        return MISSING
    if torch.is_tensor(value):
        if value.numel() != 1:
            raise DataError(
                f"{where}: the label is a tensor of shape {list(value.shape)}; the audit needs one class index per "
                "sample (multi-label and dense targets are not supported)"
            )
        value = value.item()
    elif isinstance(value, np.ndarray):
        if value.size != 1:
            raise DataError(f"{where}: the label is an array of shape {list(value.shape)}; expected one class index")
        value = value.item()
    if isinstance(value, (bool, np.bool_)):
        raise DataError(f"{where}: the label is a bool; expected a class index (int)")
    if isinstance(value, (float, np.floating)):
        if math.isnan(value):
            return MISSING
        if not float(value).is_integer():
            raise DataError(f"{where}: the label {value} is not a class index; the audit is for classification labels")
        value = int(value)
    if not isinstance(value, (int, np.integer)):
        raise DataError(f"{where}: the label {value!r} ({type(value).__name__}) is not a class index (int)")
    return int(value) if value >= 0 else MISSING


def split_item(item: Any) -> Tuple[Any, Any, bool]:
    """``(input, label, has_label)`` from one dataset item: a pair ``(input, label)``
    (tuple or list of two), a 1-tuple ``(input,)`` or a bare input. Multi-input samples
    are ``((a, b), label)``."""
    if isinstance(item, (tuple, list)) and len(item) == 2:
        return item[0], item[1], True
    if isinstance(item, (tuple, list)) and len(item) == 1:  # TensorDataset(inputs) gives 1-tuples
        return item[0], None, False
    return item, None, False


def check_input(x: Any, where: str) -> None:
    """Inputs must be tensors or arrays (or tuples/dicts of them) that default_collate can batch."""
    if torch.is_tensor(x) or isinstance(x, np.ndarray):
        return
    if isinstance(x, (tuple, list)) and x and all(torch.is_tensor(v) or isinstance(v, np.ndarray) for v in x):
        return
    if isinstance(x, dict) and x and all(torch.is_tensor(v) or isinstance(v, np.ndarray) for v in x.values()):
        return
    hint = " (add torchvision.transforms.ToTensor() to the dataset's transform)" if type(x).__module__.startswith(
        "PIL"
    ) else ""
    raise DataError(f"{where} gives an input of type {type(x).__name__}; the audit needs tensors{hint}")


def fast_labels(dataset: Any) -> Optional[np.ndarray]:
    """Labels without loading any input, when the dataset exposes them (``targets`` of
    torchvision datasets, the second tensor of a TensorDataset, through Subsets)."""
    if isinstance(dataset, Subset):
        inner = fast_labels(dataset.dataset)
        return None if inner is None else inner[np.asarray(dataset.indices, dtype=np.int64)]
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) == 2:
        t = dataset.tensors[1]
        if t.dim() == 1 and not t.is_floating_point():
            t = t.detach().cpu().numpy()  # a dataset may keep its tensors on a GPU
            return np.where(t >= 0, t, MISSING).astype(np.int64)
        return None
    targets = getattr(dataset, "targets", None)
    if targets is not None and not callable(targets):
        try:
            arr = np.asarray(targets.detach().cpu().numpy() if torch.is_tensor(targets) else targets)
        except (TypeError, ValueError):
            return None
        if arr.ndim == 1 and len(arr) == len(dataset) and np.issubdtype(arr.dtype, np.integer):
            return np.where(arr >= 0, arr, MISSING).astype(np.int64)
    return None


class AuditView(Dataset):
    """``(input, label)`` for the index, in the dataset's order, label -1 when missing.

    ``positions`` selects the samples to read (the readable ones); ``labels`` overrides
    the dataset's labels (one per sample of the full dataset).
    """

    def __init__(self, dataset: Dataset, labels: Optional[np.ndarray] = None, positions: Optional[np.ndarray] = None):
        self.dataset = dataset
        self.labels = labels
        self.positions = np.arange(len(dataset)) if positions is None else np.asarray(positions, dtype=np.int64)
        #: set once the model's number of classes is known: larger labels are refused early
        self.num_classes: Optional[int] = None

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: int):
        position = int(self.positions[i])
        try:
            item = self.dataset[position]
        except Exception as exc:  # noqa: BLE001 - any failure of user code gets the sample named
            raise DataError(
                f"reading sample {position} of the dataset ({type(self.dataset).__name__}) failed: "
                f"{type(exc).__name__}: {exc}. Fix or remove that sample (image folders: unreadable files are "
                "skipped automatically)"
            ) from exc
        x, label, _ = split_item(item)
        if self.labels is not None:
            label = self.labels[position]
        label = to_label(label, f"sample {position}")
        if self.num_classes is not None and label >= self.num_classes:
            raise DataError(
                f"sample {position} has label {label} but the model has {self.num_classes} outputs (classes "
                f"0..{self.num_classes - 1}); labels must index the model's outputs"
            )
        return x, label


def labels_of(view: AuditView) -> np.ndarray:
    """``[len(view)]`` the label of each row of ``view`` (-1 where missing), without loading
    the inputs when the labels are given or cheap to read."""
    if view.labels is not None:
        labels = np.asarray(view.labels, dtype=np.int64)[view.positions]
    else:
        fast = fast_labels(view.dataset)
        labels = fast[view.positions] if fast is not None else np.array(
            [view[i][1] for i in range(len(view))], dtype=np.int64)
    return np.where(labels >= 0, labels, MISSING).astype(np.int64)


def check_dataset(dataset: Any) -> int:
    """Length of a map-style dataset, with a clear error otherwise."""
    if isinstance(dataset, IterableDataset) or not isinstance(dataset, Dataset) and not hasattr(dataset, "__getitem__"):
        raise DataError(
            f"audit() needs a map-style torch Dataset (with __len__ and __getitem__), got {type(dataset).__name__}; "
            "wrap iterable data in a list or a TensorDataset"
        )
    try:
        n = len(dataset)
    except TypeError as exc:
        raise DataError(f"the dataset ({type(dataset).__name__}) has no length: {exc}") from exc
    if n == 0:
        raise DataError(f"the dataset ({type(dataset).__name__}) is empty: there is nothing to audit")
    return n


def resolve_labels(dataset: Dataset, labels: Optional[Sequence], n: int) -> Optional[np.ndarray]:
    """User-given labels (validated), else the dataset's when they are cheap to read."""
    if labels is None:
        return None
    arr = labels.detach().cpu().numpy() if torch.is_tensor(labels) else np.asarray(labels, dtype=object)
    if arr.ndim != 1 or len(arr) != n:
        raise InputError(f"labels must have one entry per sample ({n}), got shape {list(np.shape(arr))}")
    return np.array([to_label(v, f"labels[{i}]") for i, v in enumerate(arr)], dtype=np.int64)


def _file_list(dataset: Any) -> Optional[Tuple[List[str], Any]]:
    """``(paths, loader)`` for file-backed datasets (ImageFolder and the like)."""
    samples = getattr(dataset, "samples", None)
    loader = getattr(dataset, "loader", None)
    if samples is None or loader is None or not callable(loader):
        return None
    try:
        paths = [s[0] if isinstance(s, (tuple, list)) else s for s in samples]
    except TypeError:
        return None
    if len(paths) != len(dataset) or not all(isinstance(p, str) for p in paths[:1]):
        return None
    return paths, loader


def find_unreadable(dataset: Any, progress: bool = False, workers: int = 4) -> Optional[np.ndarray]:
    """Positions of files that the dataset's loader cannot read or that hold NaN or Inf
    values (None when the dataset is not file-backed); see :func:`find_skipped`."""
    skipped = find_skipped(dataset, progress, workers)
    return None if skipped is None else np.union1d(*skipped)


def find_skipped(dataset: Any, progress: bool = False,
                 workers: int = 4) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    """``(unreadable, non_finite)``: positions of files that the dataset's loader cannot
    read, and of files it reads but whose values are NaN or Inf (the loader raises
    :class:`~nnsim_hooks.errors.NonFiniteInputError`: a gradient of them is undefined).
    None when the dataset is not file-backed. Reads every file once; logs each skipped file."""
    files = _file_list(dataset)
    if files is None:
        return None
    paths, loader = files

    def status(path: str) -> str:
        try:
            image = loader(path)
            if hasattr(image, "load"):
                image.load()
            return "ok"
        except NonFiniteInputError:
            return "non-finite"
        except Exception:  # noqa: BLE001 - any decoding failure means "unreadable"
            return "unreadable"

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(paths), desc="check files", unit="file", leave=False)
    bad: Dict[str, list] = {"unreadable": [], "non-finite": []}
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for i, found in enumerate(pool.map(status, paths)):
            if found != "ok":
                bad[found].append(i)
                logger.warning("skipping %s file %s", found, paths[i])
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    return np.asarray(bad["unreadable"], dtype=np.int64), np.asarray(bad["non-finite"], dtype=np.int64)


def sample_path(dataset: Any, position: int) -> Optional[str]:
    files = _file_list(dataset)
    return None if files is None else files[0][position]
