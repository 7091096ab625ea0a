"""Exact dataset-scale sums of the kernel, with no sketch: ``Handle.density`` and
``Handle.consistency`` (the paper, §2, §3).

Both are ``g_i . S`` for a few accumulators ``S = sum_j g_j w_j`` of the whole dataset, so
each takes two passes over the data:

1. per batch, the self kernels ``K_jj`` (the Gram's diagonal blocks) and the weighted
   sums of the batch's per-sample gradients, added into the accumulators;
2. per batch, each sample's products with the accumulators.

Density uses the normalized kernel, whitening each sample by ``W_j = K_jj^{-1/2}``
(``1 / |g_j|`` for one output): ``N_S(x_i) = Tr(W_i J_i S) / d`` with ``S = sum_j J_j^T W_j``.
Consistency uses the raw kernel ``K_ij = J_i J_j^T``: ``sum_j K_ij p_j`` and ``sum_j K_ij``.
Memory: K copies of the parameters (K = d for density; C + 1 or d + 1 for consistency).

For K mixing weights ``W [B, d, K]`` the accumulators are ``S_k = sum_j sum_m W[j, m, k]
g_{j,m}`` and the products ``P[i, m, k] = g_{i,m} . S_k``. Each rule gives both
(:meth:`~nnsim_hooks.rules.base.LayerRule.sums`, :meth:`~nnsim_hooks.rules.base.LayerRule.dots`):
for a layer whose gradient is ``sum_u delta_u a_u^T`` the sum is the weight gradient of a
backward whose output gradients were mixed by W (one matmul or convolution weight-gradient,
never a per-sample gradient) and the product is the layer's own forward run with the weight
``S_k`` (a "ghost" product); other rules and generic-rule modules use their materialised
per-sample gradients, one module at a time.
"""

from __future__ import annotations

import warnings
from typing import Any, Iterator, List, Optional, Tuple

import numpy as np
import torch

from ..errors import DataError, InputError
from ..engine.outputs import CLASSIFIER_OUTPUTS
from ..model_device import model_device_dtype
from .kernels import inverse_sqrt

#: Largest accumulator set allowed before asking for values= (K x the parameter count).
MAX_ACCUMULATORS = 256
#: Generic-rule per-sample gradients kept within a first-pass batch, for its two uses.
REUSE_BYTES = 512 << 20


class _Data:
    """The data's batches, on the model's device, read the same way on every pass."""

    def __init__(self, handle, data, batch_size: Optional[int], use_targets: Optional[bool] = None):
        from ..data.batch_source import BatchSource

        size = handle.batch_size if batch_size is None else batch_size
        try:
            self.source = BatchSource(data, size)
        except DataError as exc:
            raise InputError(f"exact dataset sums read the data twice, in the same order: {exc}") from exc
        if self.source.total == 0:
            raise InputError(f"the dataset is empty ({self.source.describe()} of length 0): there is nothing to sum")
        self.handle = handle
        self.device, _ = model_device_dtype(handle.model)
        self.source.pin_memory = self.device.type == "cuda"
        self.use_targets = handle.wants_targets if use_targets is None else use_targets
        self.count: Optional[int] = None

    def passes(self, desc: str, progress: bool) -> Iterator[Tuple[int, Any, Any]]:
        """``(start, inputs, targets)`` per batch; the second pass must see as many samples."""
        from tqdm.auto import tqdm

        from ..data.batch_source import to_device

        seen = 0
        total = self.source.n_batches(0)
        for batch in tqdm(self.source.batches(0), total=total, desc=desc, unit="batch", disable=not progress,
                          leave=False):
            if batch.size == 0:
                continue
            targets = batch.targets if self.use_targets else None
            yield seen, to_device(batch.inputs, self.device), None if targets is None else to_device(targets, self.device)
            seen += batch.size
        if seen == 0:
            raise InputError(f"the data ({self.source.describe()}) yielded no samples: there is nothing to sum")
        if self.count is not None and seen != self.count:
            raise InputError(
                f"the data yielded {self.count} samples on the first pass and {seen} on the second: exact sums read it "
                "twice and need the same samples in the same order both times"
            )
        self.count = seen


def _whitening(self_k: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``K_jj^{-1/2}`` ``[B, d, d]`` (zero for samples without a direction) and their mask."""
    if self_k.shape[1] == 1:
        norms = self_k[:, 0, 0].clamp_min(0).sqrt()
        undefined = norms <= 0
        w = torch.where(undefined, torch.zeros_like(norms), 1.0 / torch.where(undefined, torch.ones_like(norms), norms))
        return w.view(-1, 1, 1), undefined
    w, undefined = inverse_sqrt(self_k)
    w = torch.where(undefined.view(-1, 1, 1), torch.zeros_like(w), w)
    return w, undefined


def _add(total: Optional[dict], part: dict) -> dict:
    if total is None:
        return part
    for name, s in part.items():
        total[name] = total[name] + s if name in total else s
    return total


def _warn(undefined: np.ndarray, what: str) -> None:
    idx = np.flatnonzero(undefined)
    if len(idx):
        warnings.warn(
            f"nnsim_hooks: {len(idx)} sample(s) {idx[:10].tolist()}{'...' if len(idx) > 10 else ''} have a zero or "
            f"degenerate gradient, so {what} is undefined for them; it is returned as NaN",
            RuntimeWarning,
            stacklevel=4,
        )


def exact_density(handle, data, include_self: bool = True, batch_size: Optional[int] = None,
                  progress: bool = True, use_targets: Optional[bool] = None) -> np.ndarray:
    """See :meth:`nnsim_hooks.Handle.density`."""
    engine = handle.engine
    source = _Data(handle, data, batch_size, use_targets)
    sums = None
    whiten: List[torch.Tensor] = []
    undefined: List[torch.Tensor] = []
    for _, inputs, targets in source.passes("exact density: sums", progress):
        p = engine.backprop(inputs, targets)
        engine.reuse_generic(p, REUSE_BYTES)
        w, bad = _whitening(engine.self_kernels(p))
        sums = _add(sums, engine.weighted_sums(p, w))
        whiten.append(w)
        undefined.append(bad.cpu())
    out = []
    for start, inputs, targets in source.passes("exact density: products", progress):
        p = engine.backprop(inputs, targets)
        w = _rows(whiten, start, p.batch)
        out.append(torch.einsum("bmk,bmk->b", w.double(), engine.dots(p, sums)).cpu() / p.d)
    density = torch.cat(out).numpy().astype(np.float64)
    bad = torch.cat(undefined).numpy()
    if not include_self:
        density -= 1.0  # k_ii = Tr(I) / d = 1
    density[bad] = np.nan
    _warn(bad, "the density")
    return density


def _rows(parts: List[torch.Tensor], start: int, n: int) -> torch.Tensor:
    """Rows ``start:start+n`` of the concatenation of ``parts`` (kept per batch)."""
    offset = 0
    picked = []
    for part in parts:
        lo, hi = max(start, offset), min(start + n, offset + len(part))
        if lo < hi:
            picked.append(part[lo - offset : hi - offset])
        offset += len(part)
    if sum(len(x) for x in picked) != n:
        raise InputError(
            f"the data yielded {offset} samples on the first pass and more on the second: exact sums read it twice "
            "and need the same samples in the same order both times"
        )
    return torch.cat(picked)


def _default_values(handle, p) -> torch.Tensor:
    outputs = p.outputs
    if not torch.is_tensor(outputs):
        raise InputError(
            f"consistency() needs values: the model returns {type(outputs).__name__}, not a tensor; pass values=[N, C]"
        )
    if handle.output_name in CLASSIFIER_OUTPUTS and outputs.dim() == 2:
        return torch.softmax(outputs.double(), 1)
    return outputs.reshape(outputs.shape[0], -1).double()


def _check_values(values, n_hint: Optional[int]) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    values = np.asarray(values)
    if values.ndim == 1:
        values = values[:, None]
    if values.ndim != 2 or not np.issubdtype(values.dtype, np.number) or values.shape[1] == 0:
        raise InputError(f"values must be numbers [N, C], got {values.dtype} {list(values.shape)}")
    if n_hint is not None and len(values) != n_hint:
        raise InputError(f"values has {len(values)} rows but the data holds {n_hint} samples; give one row per sample")
    if not np.isfinite(values).all():
        bad = np.flatnonzero(~np.isfinite(values).all(1))[:10].tolist()
        raise InputError(f"values hold NaN or Inf in rows {bad}; give finite values")
    return values.astype(np.float64)


def exact_consistency(handle, data, values=None, include_self: bool = True, batch_size: Optional[int] = None,
                      progress: bool = True, return_average: bool = False, use_targets: Optional[bool] = None):
    """See :meth:`nnsim_hooks.Handle.consistency`."""
    engine = handle.engine
    source = _Data(handle, data, batch_size, use_targets)
    given = None if values is None else _check_values(values, source.source.total)
    sums = None
    kept_values: List[torch.Tensor] = []
    self_ks: List[torch.Tensor] = []
    undefined: List[torch.Tensor] = []
    for start, inputs, targets in source.passes("exact consistency: sums", progress):
        p = engine.backprop(inputs, targets)
        if given is None:
            v = _default_values(handle, p)
        else:
            if start + p.batch > len(given):
                raise InputError(f"values has {len(given)} rows but the data holds more samples; give one per sample")
            v = torch.from_numpy(given[start : start + p.batch]).to(p.values.device)
        d, c = p.d, v.shape[1]
        if d > 1 and c != d:
            raise InputError(
                f"with d = {d} differentiated outputs the kernel K_ij is d x d, so values must have d = {d} columns "
                f"(the averaged quantity is d-dimensional); got {c}"
            )
        k = c + 1 if d == 1 else d + 1
        if k > MAX_ACCUMULATORS:
            raise InputError(
                f"consistency() keeps {k} accumulators the size of the model's parameters for {c} value columns; "
                f"give values=[N, C] with at most {MAX_ACCUMULATORS - 1} columns (for dense outputs, a summary)"
            )
        engine.reuse_generic(p, REUSE_BYTES)
        self_k = engine.self_kernels(p)
        if d == 1:  # W_j = [p_j, 1]: sum_j g_j p_j^T and sum_j g_j
            weights = torch.cat([v, torch.ones(p.batch, 1, dtype=v.dtype, device=v.device)], 1).unsqueeze(1)
        else:  # W_j = [y_j, I]: sum_j J_j^T y_j and sum_j J_j^T
            eye = torch.eye(d, dtype=v.dtype, device=v.device).expand(p.batch, d, d)
            weights = torch.cat([v.unsqueeze(2), eye], 2)
        sums = _add(sums, engine.weighted_sums(p, weights))
        kept_values.append(v.cpu())
        self_ks.append(self_k.cpu())
        trace = torch.diagonal(self_k, dim1=1, dim2=2).sum(-1)
        undefined.append((trace <= 0).cpu())
    if given is not None and source.count != len(given):
        raise InputError(f"values has {len(given)} rows but the data holds {source.count} samples")
    dists, avgs = [], []
    for start, inputs, targets in source.passes("exact consistency: products", progress):
        p = engine.backprop(inputs, targets)
        prod = engine.dots(p, sums).cpu()  # [B, d, K]
        v = _rows(kept_values, start, p.batch)
        self_k = _rows(self_ks, start, p.batch)
        if p.d == 1:
            num, den = prod[:, 0, :-1], prod[:, 0, -1]
            if not include_self:
                num = num - self_k[:, 0, 0, None] * v
                den = den - self_k[:, 0, 0]
            avg = num / torch.where(den != 0, den, torch.full_like(den, float("nan")))[:, None]
        else:
            num, den = prod[:, :, 0], prod[:, :, 1:]  # sum_j K_ij y_j [B, d]; sum_j K_ij [B, d, d]
            if not include_self:
                num = num - (self_k @ v.unsqueeze(2)).squeeze(2)
                den = den - self_k
            avg = _solve(den, num)
        dists.append(torch.linalg.vector_norm(v - avg, dim=1))
        avgs.append(avg)
    dist = torch.cat(dists).numpy().astype(np.float64)
    bad = torch.cat(undefined).numpy()
    dist[bad] = np.nan
    _warn(bad, "the consistency")
    if return_average:
        avg = torch.cat(avgs).numpy().astype(np.float64)
        avg[bad] = np.nan
        return dist, avg
    return dist


def _solve(den: torch.Tensor, num: torch.Tensor) -> torch.Tensor:
    """``den^{-1} num`` per sample, NaN where ``den`` is singular."""
    out = torch.full_like(num, float("nan"))
    scale = den.abs().flatten(1).amax(1)
    ok = torch.linalg.matrix_rank(den, rtol=1e-12) == den.shape[-1]
    ok &= scale > 0
    if bool(ok.any()):
        out[ok] = torch.linalg.solve(den[ok], num[ok].unsqueeze(2)).squeeze(2)
    return out
