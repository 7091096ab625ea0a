"""From inner products of gradients to the paper's kernels (the paper section 1).

- d = 1: the cosine ``g(x).g(x') / (|g(x)| |g(x')|)``.
- d > 1: ``K_C(x, x') = K(x,x)^{-1/2} K(x,x') K(x',x')^{-1/2}`` and the scalar
  ``Tr(K_C)/d``; equivalently each sample is whitened, ``a(x) = K(x,x)^{-1/2} J(x)``,
  and the similarity is the inner product of the flattened ``a`` divided by d.

A sample whose gradient is zero (or, for d > 1, whose K(x,x) is singular) has no
direction: its similarities are NaN and a warning says which samples.
"""

from __future__ import annotations

import warnings
from typing import Tuple

import torch

# Eigenvalues below this fraction of the largest count as zero when whitening.
SINGULAR_RTOL = 1e-10


def _warn_undefined(bad: torch.Tensor, what: str) -> None:
    idx = bad.nonzero().flatten().tolist()
    if idx:
        warnings.warn(
            f"nnsim_hooks: {len(idx)} sample(s) {idx[:10]}{'...' if len(idx) > 10 else ''} have a zero or "
            f"degenerate gradient, so {what} is undefined for them; it is returned as NaN",
            RuntimeWarning,
            stacklevel=3,
        )


def inverse_sqrt(k: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Symmetric ``k^{-1/2}`` of a batch of PSD matrices ``[n, d, d]``, and a mask of the
    singular ones (their rows are NaN)."""
    vals, vecs = torch.linalg.eigh(k)
    top = vals.amax(-1, keepdim=True)
    singular = (vals <= SINGULAR_RTOL * top).any(-1) | (top.squeeze(-1) <= 0)
    inv = torch.where(vals > 0, vals.clamp_min(torch.finfo(vals.dtype).tiny).rsqrt(), torch.zeros_like(vals))
    w = vecs @ torch.diag_embed(inv) @ vecs.transpose(-1, -2)
    w[singular] = float("nan")
    return w, singular


def kernel_from_gram(gram: torch.Tensor, d: int, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """The similarity between samples ``rows`` and ``cols`` from the Gram matrix of all
    per-sample (per-output) gradients, ``[n*d, n*d]`` ordered sample-major."""
    n = gram.shape[0] // d
    g = gram.reshape(n, d, n, d)
    if d == 1:
        g = g[:, 0, :, 0]
        diag = torch.diagonal(g)
        norms = diag.clamp_min(0).sqrt()
        zero = norms <= 0
        _warn_undefined(zero[torch.unique(torch.cat([rows, cols]))], "the cosine similarity")
        norms = torch.where(zero, torch.full_like(norms, float("nan")), norms)
        return g[rows][:, cols] / (norms[rows, None] * norms[None, cols])
    self_k = g[torch.arange(n), :, torch.arange(n), :]  # [n, d, d]
    w, singular = inverse_sqrt(self_k)
    _warn_undefined(singular[torch.unique(torch.cat([rows, cols]))], "the normalized kernel Tr(K_C)/d")
    cross = g[rows][:, :, cols, :]  # [na, d, nb, d]
    return torch.einsum("aij,ajbk,bki->ab", w[rows], cross, w[cols]) / d


def normalize_features(f: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sketched rows ``[B, d, D]`` -> unit feature rows ``[B, d*D]`` whose inner products
    estimate the kernel, the estimated gradient norm ``sqrt(Tr K(x,x))`` and a mask of
    samples without a direction (NaN rows)."""
    b, d, dim = f.shape
    if d == 1:
        norms = f[:, 0].norm(dim=1)
        undefined = norms <= 0
        out = f[:, 0] / norms[:, None]
        out[undefined] = float("nan")
        return out, norms, undefined
    k = f.double() @ f.double().transpose(1, 2)
    norms = torch.diagonal(k, dim1=1, dim2=2).sum(-1).clamp_min(0).sqrt().to(f.dtype)
    w, undefined = inverse_sqrt(k)
    out = (w.to(f.dtype) @ f).reshape(b, d * dim) / d**0.5
    return out, norms, undefined
