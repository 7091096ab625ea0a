"""Helpers for training with the similarity term (:meth:`Handle.pair_similarity`, the paper, §4).

- :func:`same_class_pairs`: index pairs of two different samples with the same label,
  the authors' choice of "known similar" pairs (one per minibatch in their MNIST code);
- :func:`augmentation_pairs`: each sample against an augmented copy of itself;
- :func:`batchnorm_running_stats`: compute the term with BatchNorm layers on their
  running statistics (batch statistics mix the samples, so the term is not defined
  with them).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional, Tuple

import torch
import torch.nn as nn

from ..errors import InputError


def same_class_pairs(
    labels, n_pairs: int = 1, generator: Optional[torch.Generator] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``n_pairs`` pairs ``(i, j)``, ``i != j``, of samples with the same label.

    A pair's class is drawn among the classes that have at least two samples, with
    probability proportional to their number of samples (as drawing a first sample
    uniformly would), then two different samples of that class uniformly. Pairs are
    drawn independently (with replacement across pairs).

    Returns two ``int64`` tensors ``[n_pairs]`` (indices into ``labels``), on the labels'
    device. The draws are made on the CPU (``generator`` is a CPU generator), so the same
    generator gives the same pairs whether the labels are on a GPU or not.
    """
    labels = torch.as_tensor(labels)
    if labels.dim() != 1 or labels.is_floating_point():
        raise InputError(f"labels must be a 1-D tensor of class indices, got {labels.dtype} {tuple(labels.shape)}")
    device = labels.device
    labels = labels.detach().cpu()
    if n_pairs < 1:
        raise InputError(f"n_pairs must be at least 1, got {n_pairs}")
    classes, counts = torch.unique(labels, return_counts=True)
    usable = counts >= 2
    if not bool(usable.any()):
        raise InputError(
            f"no class has two samples among these {len(labels)} labels, so there is no same-class pair; "
            "use a larger minibatch or draw the pairs from the whole dataset"
        )
    classes, counts = classes[usable], counts[usable]
    first = torch.empty(n_pairs, dtype=torch.long)
    second = torch.empty(n_pairs, dtype=torch.long)
    picks = torch.multinomial(counts.double(), n_pairs, replacement=True, generator=generator)
    for k, c in enumerate(picks.tolist()):
        members = (labels == classes[c]).nonzero().flatten()
        two = torch.randperm(len(members), generator=generator)[:2]
        first[k], second[k] = members[two[0]], members[two[1]]
    return first.to(device), second.to(device)


def augmentation_pairs(
    inputs: torch.Tensor, augment: Callable[[torch.Tensor], torch.Tensor]
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(inputs, augment(inputs))``: each sample paired with an augmented copy."""
    other = augment(inputs)
    if not torch.is_tensor(other) or other.shape != inputs.shape:
        shape = tuple(other.shape) if torch.is_tensor(other) else type(other).__name__
        raise InputError(f"augment must return a tensor of the input's shape {tuple(inputs.shape)}, got {shape}")
    return inputs, other


@contextlib.contextmanager
def batchnorm_running_stats(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block, the model's BatchNorm layers normalise with their running
    statistics (their ``training`` flag is off, and so they do not update them either);
    every flag is restored on exit. Use it around :meth:`Handle.pair_similarity` when
    the task loss trains BatchNorm with batch statistics: the term then sees the
    network as it is at evaluation time."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    flags = [m.training for m in norms]
    try:
        for m in norms:
            m.train(False)
        yield model
    finally:
        for m, flag in zip(norms, flags):
            m.train(flag)
