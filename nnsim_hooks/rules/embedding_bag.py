"""nn.EmbeddingBag: each sample is one bag of ids, its output a sum, mean or max of rows.

The bags are laid out as an :class:`~nnsim_hooks.rules.embedding.EmbeddingRule` call:
ids ``[B, T]`` (bags padded to the longest) and, per id, the gradient its row gets,
``[d, B, T, E]``: the bag's output gradient times the id's weight in the bag
(``per_sample_weights`` for ``mode="sum"``, 1 / bag size for ``"mean"``, 0 on padding,
on ``padding_idx`` and past the end of the bag) or, for ``"max"``, only in the
coordinates where the id's row is the bag's maximum. The Embedding rule's gradients,
Gram and sketch then apply unchanged.

Both calling conventions work: ids ``[B, T]`` (one bag per row), and the flat ids
``[N]`` with ``offsets`` ``[B]`` (``[B + 1]`` with ``include_last_offset``), whose
batch is the output's first dimension, not the input's.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn

from .embedding import EmbeddingRule
from .registry import register_rule


def _arguments(args, kwargs) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """``(input, offsets, per_sample_weights)`` of one ``EmbeddingBag.forward`` call."""
    values = dict(zip(("input", "offsets", "per_sample_weights"), args))
    values.update(kwargs)
    return values["input"], values.get("offsets"), values.get("per_sample_weights")


def padded_bags(module: nn.EmbeddingBag, ids, offsets, weights):
    """Bags as rows: ids ``[B, T]`` (0 past a bag's end), which entries are in the bag
    ``[B, T]`` and their ``per_sample_weights`` ``[B, T]`` (None: all 1)."""
    if ids.dim() == 2:
        return ids, torch.ones_like(ids, dtype=torch.bool), weights
    n = ids.shape[0]
    offsets = offsets.long()
    if module.include_last_offset:
        starts, ends = offsets[:-1], offsets[1:]
    else:
        starts, ends = offsets, torch.cat([offsets[1:], offsets.new_tensor([n])])
    lengths = ends - starts
    width = int(lengths.max()) if lengths.numel() else 0
    steps = torch.arange(width, device=ids.device)
    inside = steps < lengths[:, None]
    positions = torch.where(inside, starts[:, None] + steps, torch.zeros_like(steps))
    if n == 0:  # every bag empty: nothing to gather
        return ids.new_zeros(inside.shape), inside, None
    return ids[positions], inside, None if weights is None else weights[positions]


@register_rule(nn.EmbeddingBag)
class EmbeddingBagRule(EmbeddingRule):
    name = "embedding_bag"

    def supports(self, module: nn.EmbeddingBag) -> bool:
        return True  # scale_grad_by_freq counts within each bag, one sample: see operands

    def batched(self, module, args, kwargs, outputs, batch):
        ids = _arguments(args, kwargs)[0]
        if ids.dim() != 1:
            return None  # one bag per row: the batch is first, as checked by default
        # Flat ids and offsets: one bag per sample, and each output row is one bag.
        return all(out.dim() > 0 and out.shape[0] == batch for out in outputs)

    def operands(self, call, d: int):
        ids, offsets, weights = _arguments(call.args, call.kwargs)
        ids, inside, weights = padded_bags(call.module, ids, offsets, weights)
        module = call.module
        delta = call.backprops(d)  # [d, B, E]
        if module.padding_idx is not None:
            inside = inside & (ids != module.padding_idx)
        share = inside.to(delta.dtype)
        if weights is not None:
            share = share * weights.to(delta.dtype)
        if module.scale_grad_by_freq:
            # PyTorch divides by the id's count in the input, here the sample's own bag.
            same = (ids[:, :, None] == ids[:, None, :]) & inside[:, None, :]
            share = share / same.sum(-1).clamp(min=1).to(delta.dtype)
        if module.mode == "mean":
            share = share / inside.sum(1, keepdim=True).clamp(min=1).to(delta.dtype)
        if module.mode == "max":
            # Each coordinate of the output comes from one id: the first maximal one.
            rows = module.weight.detach()[ids].to(delta.dtype)  # [B, T, E]
            rows = rows.masked_fill(~inside[..., None], float("-inf"))
            first = rows.argmax(1, keepdim=True)  # [B, 1, E]
            chosen = torch.zeros_like(rows).scatter_(1, first, 1.0) * inside.any(1).to(delta.dtype)[:, None, None]
            return ids, delta[:, :, None, :] * (chosen * share[..., None]).unsqueeze(0)
        return ids, delta[:, :, None, :] * share[None, :, :, None]  # [d, B, T, E]
