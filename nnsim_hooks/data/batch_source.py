"""Batches for :func:`~nnsim_hooks.index.build_index`, in a stable order, from any sample on.

``data`` may be:

- a tensor ``[N, ...]``: its rows are the samples (no targets);
- a ``torch.utils.data.Dataset`` (map-style) of ``(input, target)`` pairs or bare inputs:
  batched here in index order with ``default_collate``; resuming jumps straight to the
  first missing sample;
- a ``torch.utils.data.IterableDataset`` of samples: batched here;
- a ``DataLoader`` that does not shuffle (a shuffling one is refused: resuming needs the
  same order every time); a sequential one over a map-style dataset resumes by jumping,
  others by reading and skipping the stored batches;
- any other iterable of batches ``(inputs, targets)``, ``(inputs,)`` or bare ``inputs``
  (a tensor, or a tuple/dict of tensors for multi-input models wrapped as
  ``((a, b), targets)``). Resuming reads and skips the stored samples, so the iterable
  must yield the same samples in the same order again.

Sample ids are positions in this order.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
    SubsetRandomSampler,
    WeightedRandomSampler,
)
from torch.utils.data.dataloader import default_collate

from . import batching
from ..errors import DataError, InputError
from ..validation import batch_size_of

logger = logging.getLogger(__name__)

_SHUFFLING = (RandomSampler, SubsetRandomSampler, WeightedRandomSampler)


@dataclass
class Batch:
    number: int  # position of the batch in the data's own sequence of batches
    start: int  # id of its first sample
    inputs: Any
    targets: Any

    @property
    def size(self) -> int:
        return batch_size_of(self.inputs)


def split_batch(raw: Any, number: int) -> tuple:
    """``(inputs, targets)`` from what a loader yields."""
    if isinstance(raw, (tuple, list)):
        if len(raw) == 2:
            return raw[0], raw[1]
        if len(raw) == 1:
            return raw[0], None
        raise DataError(
            f"batch {number} is a {type(raw).__name__} of {len(raw)} items; a batch must be (inputs, targets), "
            "(inputs,) or bare inputs. Wrap multi-input batches as ((a, b), targets)"
        )
    return raw, None


def _is_map_dataset(data: Any) -> bool:
    return isinstance(data, Dataset) and not isinstance(data, IterableDataset) and hasattr(data, "__len__")


def _sampler_of(loader: DataLoader):
    """The sampler deciding the loader's order (None when unknown)."""
    if loader.batch_sampler is None:
        return loader.sampler
    if type(loader.batch_sampler) is BatchSampler:
        return loader.batch_sampler.sampler
    return getattr(loader.batch_sampler, "sampler", None)


def check_loader_order(loader: DataLoader) -> None:
    sampler = _sampler_of(loader)
    shuffles = isinstance(sampler, _SHUFFLING) or bool(getattr(sampler, "shuffle", False))
    if shuffles:
        raise DataError(
            f"the DataLoader shuffles ({type(sampler).__name__}): an index stores samples by position and resumes "
            "where it stopped, which needs the same order every time. Build it from DataLoader(..., shuffle=False), "
            "or pass the Dataset itself"
        )
    if loader.batch_size is None and loader.batch_sampler is None:
        raise DataError("the DataLoader has batch_size=None and yields single samples; give it a batch_size")
    if sampler is None:
        logger.warning(
            "the DataLoader uses a custom batch sampler (%s): its order must be the same on every run for the index "
            "to resume correctly", type(loader.batch_sampler).__name__
        )


class _Rows(Dataset):
    """A tensor seen as a dataset of its rows."""

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor

    def __len__(self) -> int:
        return len(self.tensor)

    def __getitem__(self, i):
        return self.tensor[i]


class BatchSource:
    """The batches of ``data`` from a given sample on; see the module docstring."""

    def __init__(self, data: Any, batch_size: int, num_workers: int = 0):
        if isinstance(data, (str, bytes)) or data is None:
            raise DataError(f"data must be a Dataset, a DataLoader or an iterable of batches, got {type(data).__name__}")
        if torch.is_tensor(data):
            if data.dim() == 0:
                raise DataError("data is a 0-d tensor; give a batch of samples [N, ...] or a Dataset")
            data = _Rows(data)
        if isinstance(data, DataLoader):
            check_loader_order(data)
        elif not (_is_map_dataset(data) or isinstance(data, IterableDataset) or hasattr(data, "__iter__")):
            raise DataError(
                f"data must be a torch Dataset, a DataLoader or an iterable of (inputs, targets) batches; got "
                f"{type(data).__name__}, which is none of these"
            )
        if batch_size < 1:
            raise InputError(f"batch_size must be at least 1, got {batch_size}")
        self.data = data
        self.batch_size = batch_size
        self.num_workers = num_workers
        #: pin the batches of the DataLoaders made here (set by callers whose model is on a
        #: GPU: pinned batches copy to it asynchronously, see to_device); a DataLoader the
        #: user gave keeps its own pin_memory
        self.pin_memory = False

    def describe(self) -> str:
        return "Tensor" if isinstance(self.data, _Rows) else type(self.data).__name__

    @property
    def total(self) -> Optional[int]:
        """Number of samples when known in advance."""
        data = self.data
        if isinstance(data, DataLoader):
            if not _is_map_dataset(data.dataset) or data.batch_sampler is None:
                return None
            n = len(data.dataset)
            if getattr(data, "drop_last", False) and data.batch_size:
                n -= n % data.batch_size
            return n
        if _is_map_dataset(data):
            return len(data)
        return None

    def batches(self, skip: int = 0) -> Iterator[Batch]:
        """Batches holding the samples from id ``skip`` on."""
        data = self.data
        if _is_map_dataset(data):
            yield from self._jump(data, skip, self.batch_size, default_collate, self.num_workers, None,
                                  self.pin_memory, False)
        elif isinstance(data, DataLoader) and self._can_jump(data):
            yield from self._jump(data.dataset, skip, data.batch_size, data.collate_fn, data.num_workers,
                                  data.worker_init_fn, data.pin_memory, data.drop_last)
        elif isinstance(data, IterableDataset):
            loader = DataLoader(data, batch_size=self.batch_size, num_workers=self.num_workers,
                                pin_memory=self.pin_memory)
            yield from self._skip(iter(loader), skip)
        else:
            yield from self._skip(iter(data), skip)

    @staticmethod
    def _can_jump(loader: DataLoader) -> bool:
        return (
            _is_map_dataset(loader.dataset)
            and type(loader.batch_sampler) is BatchSampler
            and type(loader.batch_sampler.sampler) is SequentialSampler
        )

    @staticmethod
    def _jump(dataset, skip, batch_size, collate_fn, num_workers, worker_init_fn, pin_memory, drop_last) -> Iterator[Batch]:
        n = len(dataset)
        end = n - n % batch_size if drop_last else n
        if skip >= end:
            return
        loader = DataLoader(
            dataset, batch_size=batch_size, sampler=range(skip, end), collate_fn=collate_fn,
            num_workers=num_workers, worker_init_fn=worker_init_fn, pin_memory=pin_memory,
        )
        first_number = skip // batch_size
        for i, raw in enumerate(loader):
            inputs, targets = split_batch(raw, first_number + i)
            yield Batch(first_number + i, skip + i * batch_size, inputs, targets)

    @staticmethod
    def _skip(iterator, skip: int) -> Iterator[Batch]:
        position = 0
        for number, raw in enumerate(iterator):
            inputs, targets = split_batch(raw, number)
            n = batch_size_of(inputs)
            if position + n <= skip:
                position += n
                continue
            if position < skip:  # this batch was cut by an interruption: keep its missing tail
                cut = slice(skip - position, None)
                inputs, targets = batching.take(inputs, cut), batching.take(targets, cut)
                position = skip
            yield Batch(number, position, inputs, targets)
            position += batch_size_of(inputs)
        if position < skip:
            raise DataError(
                f"the data holds {position} samples but the index folder already holds {skip}: resume with the same "
                "data in the same order, or build a new index (overwrite=True)"
            )

    def n_batches(self, skip: int) -> Optional[int]:
        total = self.total
        if total is None:
            return None
        bs = self.data.batch_size if isinstance(self.data, DataLoader) else self.batch_size
        return max(0, math.ceil((total - skip) / bs))


def to_device(x: Any, device: torch.device) -> Any:
    """Move every tensor in ``x`` (tensor, tuple, list, dict) to ``device``; a pinned
    tensor without waiting (the copy is ordered before the kernels that read it)."""
    if torch.is_tensor(x):
        return x.to(device, non_blocking=x.device.type == "cpu" and torch.device(device).type == "cuda" and x.is_pinned())
    if isinstance(x, dict):
        return {k: to_device(v, device) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(to_device(v, device) for v in x)
    return x
