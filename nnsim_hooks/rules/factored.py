"""Shared maths of the layers whose weight gradient is ``sum_u delta_u a_u^T``.

Linear layers (u = token), convolutions (u = output position, a_u = input patch) and
transposed convolutions (roles swapped) all reduce to two factors per sample:

- ``cols``: ``[B, c, L]``, what multiplies the weight's columns (activations, patches);
- ``rows``: ``[d, B, r, L]``, the output gradient for each of the d outputs.

From these this module gives the Gram matrix of the per-sample gradients (ghost inner
products ``sum_{u,u'} (a_u . a'_u')(delta_u . delta'_u')`` when that is cheaper than
materialising, as it is for few positions) and the Kronecker-factored sketch.
"""

from __future__ import annotations

from typing import Dict

import torch

# Above this many elements an intermediate is built in chunks (about 256 MB in float32).
MAX_ELEMENTS = 1 << 26


def _sample_major(rows: torch.Tensor) -> torch.Tensor:
    """``[d, B, r, L]`` -> ``[B*d, r, L]`` with row index ``b*d + j``."""
    d, b = rows.shape[:2]
    return rows.transpose(0, 1).reshape(b * d, *rows.shape[2:])


def factored_gram(cols: torch.Tensor, rows: torch.Tensor, weight: bool, bias: bool) -> torch.Tensor:
    """Gram ``[B*d, B*d]`` (float64) of the per-sample gradients of ``W`` (and ``b``)."""
    d, batch, r, length = rows.shape
    c = cols.shape[1]
    n = batch * d
    delta = _sample_major(rows)  # [n, r, L]
    total = torch.zeros(n, n, dtype=torch.float64, device=rows.device)
    if bias:
        s = delta.sum(-1)
        total += (s @ s.T).double()
    if not weight:
        return total
    ghost_cost = n * n * length * length * (r + c)
    dense_cost = n * r * c * length + n * n * r * c
    if ghost_cost <= dense_cost and n * n * length * length <= MAX_ELEMENTS:
        act = cols.transpose(1, 2)  # [B, L, c]
        aa = torch.einsum("buc,evc->beuv", act, act)  # [B, B, L, L]
        aa = aa.repeat_interleave(d, 0).repeat_interleave(d, 1)  # -> [n, n, L, L]
        dd = torch.einsum("nru,mrv->nmuv", delta, delta)
        total += (aa * dd).sum((2, 3)).double()
        return total
    # Materialise W's per-sample gradient a block of rows at a time.
    act = cols.repeat_interleave(d, 0)  # [n, c, L]
    step = max(1, MAX_ELEMENTS // max(1, n * c))
    for start in range(0, r, step):
        g = torch.bmm(delta[:, start : start + step], act.transpose(1, 2)).reshape(n, -1)
        total += (g @ g.T).double()
    return total


def factored_self_gram(cols: torch.Tensor, rows: torch.Tensor, weight: bool, bias: bool) -> torch.Tensor:
    """The diagonal blocks of :func:`factored_gram`: ``[B, d, d]`` (float64), each sample's
    own ``J_i J_i^T``, at a fraction of the full Gram's cost."""
    d, batch, r, length = rows.shape
    c = cols.shape[1]
    total = torch.zeros(batch, d, d, dtype=torch.float64, device=rows.device)
    if bias:
        s = rows.sum(-1)  # [d, B, r]
        total += torch.einsum("mbr,nbr->bmn", s, s).double()
    if not weight:
        return total
    cols = cols.to(rows.dtype)
    ghost_cost = length * length * (c + d * d * r)
    dense_cost = d * r * c * length + d * d * r * c
    if ghost_cost <= dense_cost:
        # sum_{u,v} (a_u . a_v)(delta_mu . delta_nv), a sample at a time in chunks
        step = max(1, MAX_ELEMENTS // max(1, d * d * length * length))
        for start in range(0, batch, step):
            a = cols[start : start + step]
            aa = a.transpose(1, 2) @ a  # [b, L, L]
            g = rows[:, start : start + step]  # [d, b, r, L]
            dd = torch.einsum("mbru,nbrv->bmnuv", g, g)
            total[start : start + step] += (dd * aa[:, None, None]).sum((3, 4)).double()
        return total
    step = max(1, MAX_ELEMENTS // max(1, d * r * c))
    for start in range(0, batch, step):
        g = torch.einsum("mbrl,bcl->bmrc", rows[:, start : start + step], cols[start : start + step])
        flat = g.reshape(g.shape[0], d, -1)
        total[start : start + step] += (flat @ flat.transpose(1, 2)).double()
    return total


def factored_sketch(module, cols, rows, sketches) -> Dict[str, torch.Tensor]:
    """Sketch of W (and b) for a layer with factors ``cols`` ``[B, c, L]`` and ``rows``
    ``[d, B, r, L]``."""
    out: Dict[str, torch.Tensor] = {}
    if module.weight.requires_grad:
        s = sketches["weight"]
        out["weight"] = s.combine_factors(s.rows_of(rows, 2), s.cols_of(cols, 1).unsqueeze(0))
    bias = getattr(module, "bias", None)
    if bias is not None and bias.requires_grad:
        out["bias"] = sketches["bias"].project_gradients(rows.sum(-1).transpose(0, 1))
    return out


def mix(rows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``[d, B, ...]`` output gradients mixed by ``W [B, d, K]`` -> ``[K, B, ...]``."""
    d, b = rows.shape[:2]
    flat = rows.reshape(d, b, -1)
    return torch.einsum("mbx,bmk->kbx", flat, weights.to(flat.dtype)).reshape(weights.shape[2], *rows.shape[1:])



def factored_sums(cols: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``[K, r, c]``: the accumulators of ``grad = sum_t rows_t cols_t^T``."""
    return torch.einsum("kbrt,bct->krc", mix(rows, weights), cols.to(rows.dtype))


def factored_dots(cols: torch.Tensor, rows: torch.Tensor, sums: torch.Tensor) -> torch.Tensor:
    """``[B, d, K]``: each sample's products with the accumulators ``sums`` ``[K, r, c]``."""
    # the layer's forward with the weights S_k, over all samples and positions: [K, B, T, r]
    y = torch.matmul(cols.to(rows.dtype).transpose(1, 2).unsqueeze(0), sums.to(rows.dtype).transpose(1, 2).unsqueeze(1))
    return per_sample_dots(rows.transpose(2, 3), y)


def per_sample_dots(g: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``[B, d, K]`` from ``g [d, B, ...]`` and ``y [K, B, ...]`` (summed over the rest), as one
    batched product (einsum would first copy both into its own layout)."""
    d, b, k = g.shape[0], g.shape[1], y.shape[0]
    y = y.expand(k, b, *g.shape[2:])
    return torch.bmm(g.transpose(0, 1).reshape(b, d, -1), y.movedim(0, -1).reshape(b, -1, k))
