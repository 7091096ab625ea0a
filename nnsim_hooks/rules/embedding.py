"""nn.Embedding: the per-sample gradient adds delta_t to row id_t of the table.

``padding_idx`` rows get no gradient (as in PyTorch, unlike Opacus's sampler).
``scale_grad_by_freq`` rescales by counts inside the batch, so such tables go to the
torch.func fallback, which sees one sample at a time.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .base import Grads, LayerRule, gram_of_grads
from .factored import mix
from .registry import register_rule


def _ids_and_grads(module: nn.Embedding, activation: torch.Tensor, backprops: torch.Tensor):
    b = activation.shape[0]
    ids = activation.reshape(b, -1).long()
    d = backprops.shape[0]
    g = backprops.reshape(d, b, -1, module.embedding_dim)
    if module.padding_idx is not None:
        g = g * (ids != module.padding_idx).unsqueeze(0).unsqueeze(-1).to(g.dtype)
    return ids, g


@register_rule(nn.Embedding)
class EmbeddingRule(LayerRule):
    name = "embedding"
    differentiable = True

    def supports(self, module: nn.Embedding) -> bool:
        return not module.scale_grad_by_freq

    def grad_sample(self, module, activation, backprops) -> Grads:
        if not module.weight.requires_grad:
            return {}
        ids, g = _ids_and_grads(module, activation, backprops)
        d, b = g.shape[:2]
        out = torch.zeros(b, d, *module.weight.shape, dtype=g.dtype, device=g.device)
        index = ids.unsqueeze(1).unsqueeze(-1).expand(b, d, ids.shape[1], module.embedding_dim)
        out.scatter_add_(2, index, g.transpose(0, 1))
        return {"weight": out}

    def gram(self, module, activation, backprops) -> torch.Tensor:
        # Only the rows used by this batch can be non-zero: materialise just those.
        ids, g = _ids_and_grads(module, activation, backprops)
        d, b = g.shape[:2]
        used, inverse = torch.unique(ids, return_inverse=True)
        compact = torch.zeros(b, d, used.numel(), module.embedding_dim, dtype=g.dtype, device=g.device)
        index = inverse.unsqueeze(1).unsqueeze(-1).expand(b, d, ids.shape[1], module.embedding_dim)
        compact.scatter_add_(2, index, g.transpose(0, 1))
        return gram_of_grads({"weight": compact})

    def sketch(self, module, activation, backprops, sketches) -> Grads:
        if not module.weight.requires_grad:
            return {}
        s = sketches["weight"]
        ids, g = _ids_and_grads(module, activation, backprops)
        d, b, t, _ = g.shape
        if s.row_matrix is None:
            rows = torch.nn.functional.one_hot(ids, module.num_embeddings).to(g.dtype)  # [B, T, V]
        else:
            rows = s.row_matrix.T[ids]  # [B, T, R*k_r]: column id_t of S_row
        cols = s.cols_of(g, 3)  # [d, B, T, R*k_c]
        return {"weight": s.combine_factors(rows.transpose(1, 2).unsqueeze(0), cols.transpose(2, 3))}

    def sums(self, module, activation, backprops, weights) -> Grads:
        """Each k's table: the mixed output gradients added at their rows (one index_add)."""
        if not module.weight.requires_grad:
            return {}
        ids, g = _ids_and_grads(module, activation, backprops)
        r = mix(g, weights)  # [K, B, T, E]
        k = r.shape[0]
        table = torch.zeros(k, *module.weight.shape, dtype=r.dtype, device=r.device)
        table.index_add_(1, ids.reshape(-1), r.reshape(k, -1, module.embedding_dim))
        return {"weight": table}

    def dots(self, module, activation, backprops, sums):
        """Each output gradient dotted with the rows of ``S_k`` its ids pick."""
        if "weight" not in sums:
            return None
        ids, g = _ids_and_grads(module, activation, backprops)
        rows = sums["weight"].to(g.dtype)[:, ids]  # [K, B, T, E]
        return torch.einsum("mbte,kbte->bmk", g, rows)
