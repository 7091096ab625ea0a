"""The user's decisions from the report (relabel, remove, keep), read back into the next
audit.

The report's table exports a CSV ``path_or_index,decision,new_label``: one row per
decided sample, named by its file path when the dataset is file-backed (``samples`` and
``loader``, as ImageFolder) and by its position in the dataset otherwise; ``decision`` is
``relabel``, ``remove`` or ``keep``; ``new_label`` (relabel only) is a class index or a
class name. :func:`apply_decisions` turns it into the dataset the next audit sees:
removed samples left out, relabelled ones with their new label, the rest untouched.
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from torch.utils.data import Dataset

from ..errors import InputError
from .samples import _file_list, split_item

#: The CSV's header, as the report writes it.
COLUMNS = ("path_or_index", "decision", "new_label")
DECISIONS = ("relabel", "remove", "keep")
#: How many unknown samples an error lists before "... and N more".
MAX_LISTED = 20


@dataclass(frozen=True)
class Decision:
    """One row of the decisions CSV (``line``: its line in the file, for messages)."""

    key: str
    decision: str
    new_label: Optional[str]
    line: int


def fingerprint(path: Union[str, Path]) -> str:
    """What identifies a decisions file for resuming an audit: its absolute path and a
    digest of its content (an edited file is another run)."""
    import hashlib

    path = Path(path)
    try:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    except OSError as exc:
        raise InputError(f"decisions file {path}: cannot read it ({exc})") from exc
    return f"{path.resolve()}#sha256:{digest}"


def read_decisions(source: Union[str, Path, io.TextIOBase]) -> List[Decision]:
    """The rows of a decisions CSV (a path or an open text file), checked for form: the
    header, a known decision on each row, a new label exactly on relabel rows, each sample
    decided once. Raises :class:`~nnsim_hooks.errors.InputError` naming the line."""
    name = str(source) if isinstance(source, (str, Path)) else getattr(source, "name", "decisions")
    if isinstance(source, (str, Path)):
        try:
            text = Path(source).read_text(encoding="utf-8-sig")
        except OSError as exc:
            raise InputError(f"decisions file {name}: cannot read it ({exc})") from exc
    else:
        text = source.read()
    reader = csv.reader(io.StringIO(text))
    header = [h.strip() for h in next(reader, [])]
    if tuple(header[:3]) != COLUMNS:
        raise InputError(f"decisions file {name}: the header is {header}, expected {','.join(COLUMNS)} (the CSV that "
                         "the report's 'Download decisions' button writes)")
    rows: List[Decision] = []
    seen: Dict[str, int] = {}
    for line, row in enumerate(reader, start=2):
        if not row or all(not cell.strip() for cell in row):
            continue
        cells = [c.strip() for c in row] + [""] * (3 - len(row))
        key, decision, new_label = cells[0], cells[1].lower(), cells[2]
        where = f"decisions file {name}, line {line}"
        if not key:
            raise InputError(f"{where}: empty path_or_index; name the sample by its file path or dataset index")
        if decision not in DECISIONS:
            raise InputError(f"{where}: decision {cells[1]!r} for {key!r} is not one of {', '.join(DECISIONS)}")
        if decision == "relabel" and not new_label:
            raise InputError(f"{where}: 'relabel' of {key!r} needs a new_label (a class index or name)")
        if decision != "relabel" and new_label:
            raise InputError(f"{where}: {decision!r} of {key!r} has a new_label {new_label!r}; only relabel rows take "
                             "one (leave it empty)")
        if key in seen:
            raise InputError(f"{where}: {key!r} is decided twice (also on line {seen[key]}); keep one row per sample")
        seen[key] = line
        rows.append(Decision(key, decision, new_label or None, line))
    return rows


def _positions(keys: Sequence[str], dataset: Any, n: int) -> Tuple[Dict[str, int], List[str]]:
    """Dataset position of each key (a file path of a file-backed dataset, else an index),
    and the keys that name no sample."""
    found: Dict[str, int] = {}
    unknown: List[str] = []
    files = _file_list(dataset)
    by_path: Dict[str, int] = {}
    if files is not None:
        for i, path in enumerate(files[0]):
            by_path.setdefault(path, i)
            by_path.setdefault(os.path.normpath(os.path.abspath(path)), i)
    for key in keys:
        if key in by_path:
            found[key] = by_path[key]
        elif files is not None and os.path.normpath(os.path.abspath(key)) in by_path:
            found[key] = by_path[os.path.normpath(os.path.abspath(key))]
        elif key.lstrip("+").isdigit() and int(key) < n:
            found[key] = int(key)
        elif files is not None and _by_suffix(key, files[0]) is not None:
            found[key] = _by_suffix(key, files[0])
        else:
            unknown.append(key)
    return found, unknown


def _by_suffix(key: str, paths: Sequence[str]) -> Optional[int]:
    """The one path that ends with ``key`` as whole path components (a path relative to the
    data folder, say ``circle/img_017.png``); None when none does. Several: an error, as
    the key is ambiguous."""
    tail = os.sep + os.path.normpath(key).lstrip(os.sep)
    hits = [i for i, p in enumerate(paths) if os.path.normpath(p).endswith(tail)]
    if len(hits) > 1:
        shown = ", ".join(paths[i] for i in hits[:5])
        raise InputError(f"decisions: {key!r} matches {len(hits)} files ({shown}); give a longer part of the path")
    return hits[0] if hits else None


def _class_index(text: str, class_names: Optional[Sequence[str]], where: str) -> int:
    if class_names is not None and text in class_names:
        return list(class_names).index(text)
    if text.lstrip("+").isdigit():
        value = int(text)
        if class_names is not None and value >= len(class_names):
            raise InputError(f"{where}: new_label {value} is not a class (0..{len(class_names) - 1})")
        return value
    known = f"; the classes are {', '.join(map(str, class_names))}" if class_names is not None else \
        " (a class index; give class names to match names)"
    raise InputError(f"{where}: new_label {text!r} is not a class index or name{known}")


class DecidedDataset(Dataset):
    """A dataset with the user's decisions applied: ``positions`` (into ``base``) kept, in
    order, and ``new_labels`` (base position -> class) replacing the labels there.

    File-backed datasets stay file-backed (``samples``, ``loader``, ``classes``), so the
    next audit still skips unreadable files, names files and shows thumbnails."""

    def __init__(self, base: Any, positions: np.ndarray, new_labels: Dict[int, int]):
        self.base = base
        self.positions = np.asarray(positions, dtype=np.int64)
        self.new_labels = dict(new_labels)
        files = _file_list(base)
        if files is not None:
            samples = list(base.samples)
            self.samples = [self._relabelled(samples[p], int(p)) for p in self.positions]
            self.loader = base.loader
        for attr in ("classes", "class_to_idx", "transform", "target_transform"):
            if hasattr(base, attr):
                setattr(self, attr, getattr(base, attr))
        targets = getattr(base, "targets", None)
        if targets is not None and not callable(targets) and len(targets) == len(base):
            self.targets = [self.new_labels.get(int(p), _as_int(targets[p])) for p in self.positions]

    def _relabelled(self, sample: Any, position: int) -> Any:
        if position in self.new_labels and isinstance(sample, (tuple, list)) and len(sample) == 2:
            return (sample[0], self.new_labels[position])
        return sample

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: int):
        position = int(self.positions[i])
        item = self.base[position]
        if position not in self.new_labels:
            return item
        x, _, _ = split_item(item)
        return x, self.new_labels[position]


def _as_int(value: Any) -> Any:
    try:
        return int(value)
    except (TypeError, ValueError):
        return value


def apply_decisions(
    dataset: Any,
    decisions: Union[str, Path, Sequence[Decision]],
    *,
    labels: Optional[np.ndarray] = None,
    class_names: Optional[Sequence[str]] = None,
) -> Tuple[Any, Optional[np.ndarray], Dict[str, Any]]:
    """``(dataset, labels, record)`` with the decisions applied.

    ``decisions``: a CSV path (:func:`read_decisions`) or its rows. ``labels``: labels
    given to the audit (one per sample of ``dataset``), relabelled and subset alike.
    ``class_names`` lets ``new_label`` be a name (default: the dataset's ``classes``).
    ``record`` is what the summary keeps (``summary["decisions"]``): the file, the counts,
    the removed samples and the relabels.

    A CSV naming samples the dataset does not hold is an
    :class:`~nnsim_hooks.errors.InputError` listing them, as is one that removes every sample.
    """
    source = str(decisions) if isinstance(decisions, (str, Path)) else None
    rows = read_decisions(decisions) if isinstance(decisions, (str, Path)) else list(decisions)
    n = len(dataset)
    found, unknown = _positions([r.key for r in rows], dataset, n)
    if unknown:
        shown = ", ".join(repr(k) for k in unknown[:MAX_LISTED])
        more = f" and {len(unknown) - MAX_LISTED} more" if len(unknown) > MAX_LISTED else ""
        kind = "files or dataset indices" if _file_list(dataset) is not None else f"dataset indices (0..{n - 1})"
        raise InputError(f"decisions {source or ''}: {len(unknown)} sample(s) are not in the dataset: {shown}{more}. "
                         f"Name samples by the {kind} of the dataset audited when the decisions were made")
    twice = {}
    for r in rows:
        twice.setdefault(found[r.key], []).append(r)
    clash = [rs for rs in twice.values() if len(rs) > 1]
    if clash:
        names = "; ".join(" and ".join(f"{r.key!r} (line {r.line})" for r in rs) for rs in clash[:MAX_LISTED])
        raise InputError(f"decisions {source or ''}: these rows name the same sample: {names}; keep one row per sample")
    names = class_names if class_names is not None else getattr(dataset, "classes", None)
    new_labels: Dict[int, int] = {}
    removed: List[int] = []
    relabels: List[Dict[str, Any]] = []
    for r in rows:
        position = found[r.key]
        if r.decision == "remove":
            removed.append(position)
        elif r.decision == "relabel":
            new_labels[position] = _class_index(r.new_label, names, f"decisions {source or ''} line {r.line}")
            relabels.append({"sample": r.key, "position": position, "new_label": new_labels[position]})
    kept = np.setdiff1d(np.arange(n), np.asarray(removed, dtype=np.int64))
    if kept.size == 0:
        raise InputError(f"decisions {source or ''}: every one of the {n} samples is removed; nothing is left to audit")
    new_dataset = DecidedDataset(dataset, kept, new_labels) if rows else dataset
    new_user_labels = None
    if labels is not None:
        new_user_labels = np.asarray(labels, dtype=np.int64).copy()
        for position, label in new_labels.items():
            new_user_labels[position] = label
        new_user_labels = new_user_labels[kept]
    record = {
        "file": source,
        "relabelled": len(relabels),
        "removed": len(removed),
        "kept": sum(r.decision == "keep" for r in rows),
        "removed_samples": [r.key for r in rows if r.decision == "remove"],
        "relabels": relabels,
        "samples_before": n,
        "samples_after": int(kept.size),
    }
    return new_dataset, new_user_labels, record
