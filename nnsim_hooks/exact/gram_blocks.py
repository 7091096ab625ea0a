"""The exact Gram matrix of many samples in one pass per batch.

Each batch goes through the model once; what its per-sample gradients are made of is
kept (:class:`GramTerm`: a layer's hook factors, activation and output gradient, or a
module's materialised per-sample gradients where those are smaller), in RAM up to
``max_memory`` bytes and in memory-mapped files of a temporary folder past it. Every
off-diagonal block of the Gram matrix is then computed from the kept terms of two
batches, with no further pass through the model: O(N / B) passes instead of the
O((N / B)^2) of running every pair of half-batches together.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from dataclasses import dataclass
from typing import Any, List, Optional, Tuple

import numpy as np
import torch

from ..data import batching
from ..errors import InputError
from ..rules.base import Grads

logger = logging.getLogger(__name__)

#: RAM the kept terms may take before they spill to disk (similarity(max_memory=None)).
DEFAULT_MAX_MEMORY = 2 << 30


@dataclass
class GramTerm:
    """One additive part of a batch's Gram matrix: ``grads`` ``[B*d, P]`` (flattened
    per-sample gradients, sample-major) or a fast rule's factors."""

    key: str  # identifies the part across batches (same module call, same parameters)
    owner: str  # the module it belongs to, for error messages
    grads: Optional[torch.Tensor] = None
    rule: Any = None
    module: Any = None
    activation: Optional[torch.Tensor] = None
    backprops: Optional[torch.Tensor] = None  # [d, B, ...]
    # A rule of the whole call (attention), whose operands are not two tensors: its own
    # Gram of this batch, valid within one pass, never kept across batches.
    whole_call: bool = False

    @staticmethod
    def of_grads(key: str, owner: str, grads: Grads) -> "GramTerm":
        flat = [g.reshape(g.shape[0] * g.shape[1], -1) for g in grads.values()]
        return GramTerm(key, owner, grads=flat[0] if len(flat) == 1 else torch.cat(flat, 1))

    @property
    def rows(self) -> int:
        if self.whole_call:
            return self.backprops[0].shape[0] * self.backprops[0].shape[1]
        if self.grads is not None:
            return self.grads.shape[0]
        return self.backprops.shape[0] * self.backprops.shape[1]

    def tensors(self) -> List[torch.Tensor]:
        return [self.grads] if self.grads is not None else [self.activation, self.backprops]

    def with_tensors(self, tensors: List[torch.Tensor]) -> "GramTerm":
        if self.grads is not None:
            return GramTerm(self.key, self.owner, grads=tensors[0])
        return GramTerm(self.key, self.owner, rule=self.rule, module=self.module, activation=tensors[0],
                        backprops=tensors[1])

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def gram(self) -> torch.Tensor:
        """``[B*d, B*d]`` float64."""
        if self.grads is not None:
            return (self.grads @ self.grads.T).double()
        return self.rule.gram(self.module, self.activation, self.backprops)

    def self_gram(self, d: int) -> torch.Tensor:
        """The diagonal ``d x d`` blocks of :meth:`gram`, ``[B, d, d]`` float64, without the rest."""
        if self.grads is not None:
            flat = self.grads.reshape(-1, d, self.grads.shape[1])
            return (flat @ flat.transpose(1, 2)).double()
        return self.rule.self_gram(self.module, self.activation, self.backprops)

    def cross(self, other: "GramTerm") -> torch.Tensor:
        """``[B*d, B'*d]`` float64 inner products of this batch's gradients with ``other``'s."""
        if self.grads is not None:
            return (self.grads @ other.grads.T).double()
        if (self.activation.shape[1:] != other.activation.shape[1:]
                or self.backprops.shape[2:] != other.backprops.shape[2:]):
            # Factors that do not line up (bags or sequences padded per batch to another
            # length): the inner products of the two batches' materialised gradients.
            mine = self.rule.grad_sample(self.module, self.activation, self.backprops)
            theirs = other.rule.grad_sample(other.module, other.activation, other.backprops)
            flat = lambda g: g.reshape(g.shape[0] * g.shape[1], -1)  # noqa: E731
            return sum((flat(mine[n]) @ flat(theirs[n]).T).double() for n in mine)
        # The rule's own Gram of the two batches together, off-diagonal block: exactly
        # the numbers a pass over both batches would give.
        a = torch.cat([self.activation, other.activation])
        bp = torch.cat([self.backprops, other.backprops], 1)
        return self.rule.gram(self.module, a, bp)[: self.rows, self.rows :]


class _KeptBlocks:
    """The kept terms of each batch: CPU tensors up to ``max_memory`` bytes, then files."""

    def __init__(self, max_memory: int):
        self.max_memory = max_memory
        self.in_ram = 0
        self.on_disk = 0
        self.blocks: List[List[GramTerm]] = []
        self._dir: Optional[tempfile.TemporaryDirectory] = None

    def add(self, terms: List[GramTerm]) -> None:
        kept = []
        for term in terms:
            tensors = []
            for t in term.tensors():
                t = t.detach()
                size = t.numel() * t.element_size()
                if self.in_ram + size <= self.max_memory:
                    tensors.append(t.to("cpu", copy=True).contiguous())
                    self.in_ram += size
                else:
                    tensors.append(self._spill(t))
                    self.on_disk += size
            kept.append(term.with_tensors(tensors))
        self.blocks.append(kept)

    def _spill(self, t: torch.Tensor) -> np.memmap:
        if self._dir is None:
            self._dir = tempfile.TemporaryDirectory(prefix="nnsim-gram-")
            logger.info("exact similarity: kept factors past %d bytes go to %s", self.max_memory, self._dir.name)
        host = t.cpu().contiguous().numpy()
        path = os.path.join(self._dir.name, f"{len(os.listdir(self._dir.name))}.bin")
        mm = np.memmap(path, dtype=host.dtype, mode="w+", shape=host.shape)
        mm[...] = host
        mm.flush()
        return mm

    def load(self, i: int, device) -> List[GramTerm]:
        out = []
        for term in self.blocks[i]:
            tensors = [torch.from_numpy(np.array(t)) if isinstance(t, np.memmap) else t for t in term.tensors()]
            out.append(term.with_tensors([t.to(device) for t in tensors]))
        return out

    def close(self) -> None:
        self.blocks = []
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None


class _PlanChanged(Exception):
    """Two batches' gradients are not made of the same parts (the model's calls differ)."""


def check_max_memory(max_memory) -> int:
    if max_memory is None:
        return DEFAULT_MAX_MEMORY
    if isinstance(max_memory, bool) or not isinstance(max_memory, (int, np.integer)) or max_memory < 0:
        raise InputError(f"max_memory must be a number of bytes (an int >= 0) or None, got {max_memory!r}")
    return int(max_memory)


@torch.no_grad()
def kept_gram(engine, inputs, targets, n: int, batch_size: int, max_memory: int,
              progress: bool) -> Optional[Tuple[torch.Tensor, int]]:
    """``([n*d, n*d] float64 Gram, d)`` in ``ceil(n / batch_size)`` passes, or None when two
    batches' gradients are not made of the same parts (then run every pair of batches
    through the model together, see ``Handle._pair_gram``)."""
    from tqdm.auto import tqdm

    spans = list(batching.chunks(n, batch_size))
    kept = _KeptBlocks(max_memory)
    full: Optional[torch.Tensor] = None
    d = 1
    keys = None
    try:
        for s0, e0 in tqdm(spans, desc="exact similarity: passes", unit="batch", disable=not progress, leave=False):
            idx = slice(s0, e0)
            p = engine.backprop(batching.take(inputs, idx), batching.take(targets, idx))
            d = p.d
            terms = engine.gram_terms(p, keep=True)
            if keys is None:
                keys = [t.key for t in terms]
                need = 2 * sum(t.nbytes() for t in terms)
                if max_memory < need:
                    raise InputError(
                        f"max_memory={max_memory} bytes is too small: exact similarity pairs two batches at a time and "
                        f"the kept factors of two batches of {e0 - s0} samples take {need} bytes. Give "
                        f"max_memory >= {need}, or a smaller batch_size (attach(..., batch_size=...))"
                    )
                full = torch.zeros(n * d, n * d, dtype=torch.float64, device=p.values.device)
            elif [t.key for t in terms] != keys:
                raise _PlanChanged()
            full[s0 * d : e0 * d, s0 * d : e0 * d] = engine.gram_of_terms(terms)
            kept.add(terms)
        if kept.on_disk:
            logger.info("exact similarity: %d bytes of factors in RAM, %d on disk", kept.in_ram, kept.on_disk)
        device = full.device
        pairs = [(i, j) for i in range(len(spans)) for j in range(i + 1, len(spans))]
        bar = tqdm(total=len(pairs), desc="exact similarity: blocks", unit="block", disable=not progress, leave=False)
        for i in range(len(spans)):
            if i + 1 >= len(spans):
                break
            ti = kept.load(i, device)
            (a0, a1) = spans[i]
            for j in range(i + 1, len(spans)):
                tj = kept.load(j, device)
                (b0, b1) = spans[j]
                block = sum(x.cross(y) for x, y in zip(ti, tj))
                full[a0 * d : a1 * d, b0 * d : b1 * d] = block
                full[b0 * d : b1 * d, a0 * d : a1 * d] = block.T
                bar.update(1)
        bar.close()
        return full, d
    except _PlanChanged:
        logger.info("exact similarity: the batches' gradients are made of different parts; running pairs of batches")
        return None
    finally:
        kept.close()


def passes_of_pairs(n: int, batch_size: int) -> int:
    """Passes the pair-of-half-batches loop takes for ``n`` samples."""
    blocks = math.ceil(n / max(1, batch_size // 2))
    return blocks * (blocks + 1) // 2
