"""The paper's denoising factor as a d x d matrix, for networks with d outputs (the paper, §3, §6).

At convergence on noisy labels the prediction is approximately a kernel-weighted average,
``f(x_i) ~ (sum_j K_ij)^{-1} sum_j K_ij y_j``, with the d x d kernel ``K_ij = J(x_i) J(x_j)^T``.
For i.i.d. label noise of covariance ``sigma^2 I`` the prediction noise at x_i then has
covariance ``sigma^2 F_i`` with

    F_i = sum_j A_ij A_ij^T,   A_ij = (sum_k K_ik)^{-1} K_ij
        = S_i^{-1} Q_i S_i^{-T},   S_i = sum_j K_ij,   Q_i = sum_j K_ij K_ij^T.

This is what the authors compute (``Lydorn/netsimilarity``, on the **raw** kernel); for
d = 1 it is ``1 / N_eff``. Its ``Tr(F_i)/d`` is not the scalar ``1/N_eff`` of the trace kernel
``Tr(K_C)/d`` that :meth:`GradientIndex.denoising_factor` gives (they differ by a few to
~20 % at d = 2; ``paper/matrix_denoising.py`` measures it).

No N x N x d x d tensor is formed: ``S_i = R_i G`` with ``G = sum_j R_j^T`` (one pass),
and ``Q_i`` either from the P x P second moment ``C = sum_j R_j^T R_j`` (``Q_i = R_i C R_i^T``,
when P is small) or from blocks of pairs (memory ``block^2 d^2``), where ``R_i`` is ``J(x_i)``
(``kernel="raw"``) or the whitened ``K(x_i,x_i)^{-1/2} J(x_i)`` (``kernel="cosine"``: the
normalized matrix kernel ``K_C``).

From a stored index (:func:`index_matrix_denoising_factor`) only ``kernel="cosine"`` is
possible: index rows are the *whitened* sketched Jacobians ``K(x,x)^{-1/2} J(x)`` and only
the scalar norm ``sqrt(Tr K(x,x))`` is kept beside them, not the d x d ``K(x,x)^{1/2}`` that
un-whitening needs, so the raw matrix kernel cannot be rebuilt from an index. Use the exact
Jacobians (:func:`matrix_denoising_factor`) for the authors' raw version.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple, Optional

import numpy as np
import torch

from ..errors import InputError
from .kernels import inverse_sqrt

KERNELS = ("raw", "cosine")
# Largest P for which the P x P second moment is used (float64: 128 MB at 4096).
MOMENT_LIMIT = 4096


class MatrixDenoising(NamedTuple):
    """``matrix``: float64 ``[N, d, d]``, the prediction-noise covariance over the label-noise
    variance at each sample; ``trace``: float64 ``[N]``, ``Tr(matrix)/d`` (the scalar to set
    beside ``1/N_eff``). NaN for samples whose ``sum_j K_ij`` is singular."""

    matrix: torch.Tensor
    trace: torch.Tensor


def matrix_denoising_factor(
    source,
    inputs=None,
    *,
    targets=None,
    d: Optional[int] = None,
    kernel: str = "raw",
    include_self: bool = True,
    method: str = "auto",
    block_size: int = 512,
) -> MatrixDenoising:
    """The authors' d x d denoising factor ``F_i = sum_j A_ij A_ij^T`` for every sample.

    Args:
        source: exact per-sample Jacobians: a tensor ``[N, d, P]``; or the dict of
            :meth:`Handle.per_sample_gradients` (``[N, d, *param]`` per parameter; give
            ``d=``, since a dict of a scalar output, ``[N, *param]``, looks the same); or a
            :class:`~nnsim_hooks.Handle` together with ``inputs`` (the Jacobians are then taken
            batch by batch, ``handle.batch_size`` samples at a time).
        inputs, targets: the dataset, when ``source`` is a handle.
        d: number of outputs, for a dict source.
        kernel: ``"raw"`` (``K_ij = J_i J_j^T``, as the authors) or ``"cosine"`` (the
            normalized ``K_C``).
        include_self: include ``j = i`` in the sums (the authors do).
        method: ``"moment"`` (P x P second moment), ``"pairwise"`` (blocks of pairs) or
            ``"auto"`` (the cheaper one; the moment only when P <= 4096).
        block_size: samples per block of the pairwise method.

    Returns:
        :class:`MatrixDenoising` (``matrix [N, d, d]``, ``trace [N]``), float64, on the
        Jacobians' device. For d = 1, ``matrix[:, 0, 0] = 1 / N_eff``.
    """
    if kernel not in KERNELS:
        raise InputError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if method not in ("auto", "moment", "pairwise"):
        raise InputError(f"method must be 'auto', 'moment' or 'pairwise', got {method!r}")
    if not isinstance(block_size, int) or block_size < 1:
        raise InputError(f"block_size must be a positive integer, got {block_size!r}")
    rows = _jacobian_rows(source, inputs, targets, d)
    if kernel == "cosine":
        rows = _whiten(rows)
    n, dd, p = rows.shape
    if method == "auto":
        # Cost of the moment path ~ N d P^2, of the pairs ~ N^2 d^2 P.
        method = "moment" if p <= MOMENT_LIMIT and p <= n * dd else "pairwise"
    sums = rows @ rows.sum(0).transpose(0, 1)  # S_i = R_i sum_j R_j^T, [N, d, d]
    if method == "moment":
        second = _second_moment(rows, block_size)
        squares = torch.einsum("iap,pq,ibq->iab", rows, second, rows)
    else:
        squares = _pairwise_squares(rows, block_size)
    if not include_self:
        self_k = rows @ rows.transpose(1, 2)
        sums = sums - self_k
        squares = squares - self_k @ self_k.transpose(1, 2)
    return _from_sums(sums, squares)


def index_matrix_denoising_factor(index, *, d: Optional[int] = None, kernel: str = "cosine",
                                  include_self: bool = True) -> MatrixDenoising:
    """The d x d denoising factor of the normalized kernel ``K_C`` from a stored index of
    d-output features: O(N D^2) through the D x D moment of the whitened rows when
    D <= 4096, else O(N^2 D) over blocks of pairs (no D x D matrix).

    ``kernel="raw"`` raises :class:`~nnsim_hooks.errors.InputError`: index rows are
    whitened and the d x d ``K(x,x)^{1/2}`` needed to undo it is not stored (see the module
    docstring); use :func:`matrix_denoising_factor` on exact Jacobians. ``d`` is read from
    the index fingerprint (row width / sketch_dim), or must be given for indexes made with
    ``GradientIndex.from_features``. Samples not valid in the index add nothing and get NaN.
    """
    if kernel != "cosine":
        raise InputError(
            f"kernel={kernel!r} cannot be computed from an index: its rows are the whitened Jacobians "
            "K(x,x)^(-1/2) J(x) and the d x d K(x,x) is not stored, so the raw kernel J_i J_j^T cannot be rebuilt. "
            "Use kernel='cosine' here, or nnsim_hooks.exact.matrix_denoising.matrix_denoising_factor(handle, inputs, kernel='raw') "
            "on exact Jacobians"
        )
    width = index.dim
    if d is None:
        fp = index.fingerprint or {}
        dim = (fp.get("sketch") or {}).get("dim")
        if not dim:
            raise InputError("this index has no fingerprint saying its sketch_dim; pass d= (the number of outputs)")
        d = width // int(dim)
    if not isinstance(d, int) or d < 1 or width % d:
        raise InputError(f"d={d!r} does not divide the index row width {width}; pass the number of outputs")
    dim = width // d
    gsum = np.zeros((d, dim))
    for rows in _index_blocks(index, d):
        gsum += rows.sum(0)
    # Q_i from the D x D moment of the rows when D is small, else from blocks of pairs.
    second = None
    if dim <= MOMENT_LIMIT:
        second = np.zeros((dim, dim))
        for rows in _index_blocks(index, d):
            flat = rows.reshape(-1, dim)
            second += flat.T @ flat
    sums, squares = [], []
    for rows in _index_blocks(index, d):
        s = rows @ gsum.T
        if second is not None:
            q = (rows @ second) @ rows.transpose(0, 2, 1)
        else:
            q = np.zeros((len(rows), d, d))
            for other in _index_blocks(index, d, block=512):
                k = np.einsum("iap,jbp->ijab", rows, other)
                q += np.einsum("ijab,ijcb->iac", k, k)
        if not include_self:
            k = rows @ rows.transpose(0, 2, 1)
            s, q = s - k, q - k @ k.transpose(0, 2, 1)
        sums.append(s)
        squares.append(q)
    out = _from_sums(torch.from_numpy(np.concatenate(sums)), torch.from_numpy(np.concatenate(squares)),
                     warn=False)
    bad = torch.from_numpy(~np.asarray(index.valid, dtype=bool))
    out.matrix[bad] = float("nan")
    out.trace[bad] = float("nan")
    return out


# -- helpers ------------------------------------------------------------------------------


def _index_blocks(index, d: int, block: int = 4096):
    """Index rows as whitened ``[b, d, D]`` float64 blocks (the stored rows are ``a / sqrt(d)``)."""
    f = index.features
    for start in range(0, len(f), block):
        rows = np.nan_to_num(np.asarray(f[start:start + block], dtype=np.float64))
        yield rows.reshape(len(rows), d, -1) * np.sqrt(d)


def _jacobian_rows(source, inputs, targets, d: Optional[int]) -> torch.Tensor:
    """``[N, d, P]`` float64 rows from a tensor, a gradient dict or a handle."""
    from ..attach import Handle

    if isinstance(source, Handle):
        if inputs is None:
            raise InputError("matrix_denoising_factor(handle, inputs): give the inputs whose Jacobians to use")
        return _handle_rows(source, inputs, targets)
    if inputs is not None:
        raise InputError("inputs= is only for a Handle source; Jacobians given directly need no inputs")
    if isinstance(source, dict):
        if not source:
            raise InputError("the gradient dict is empty")
        if not isinstance(d, int) or d < 1:
            raise InputError(
                "a gradient dict needs d= (the number of outputs): per_sample_gradients gives [N, d, *param] for "
                "d outputs but [N, *param] for a scalar one, which cannot be told apart; pass d=1 for a scalar output"
            )
        n = next(iter(source.values())).shape[0]
        parts = []
        for name, g in source.items():
            if g.ndim < 2 or g.shape[0] != n or (d > 1 and g.shape[1] != d):
                raise InputError(f"gradient {name!r} has shape {list(g.shape)}; expected [N={n}, d={d}, *param]")
            parts.append(g.reshape(n, d, -1) if d > 1 else g.reshape(n, 1, -1))
        return torch.cat(parts, dim=2).double()
    if isinstance(source, (np.ndarray, torch.Tensor)):
        rows = torch.as_tensor(source)
        if rows.ndim != 3 or not rows.is_floating_point():
            raise InputError(f"Jacobians must be a float tensor [N, d, P], got {rows.dtype} {list(rows.shape)}")
        if d is not None and rows.shape[1] != d:
            raise InputError(f"Jacobians have d={rows.shape[1]} outputs ({list(rows.shape)}) but d={d} was given")
        return rows.double()
    raise InputError(f"source must be a tensor [N, d, P], a per_sample_gradients dict or a Handle, got "
                     f"{type(source).__name__}")


def _handle_rows(handle, inputs, targets) -> torch.Tensor:
    from ..data import batching
    from ..validation import batch_size_of

    engine = handle.engine
    n = batch_size_of(inputs)
    parts = []
    for start, end in batching.chunks(n, handle.batch_size):
        idx = torch.arange(start, end)
        p = engine.backprop(batching.take(inputs, idx), batching.take(targets, idx))
        grads = engine.grads(p)
        b = end - start
        parts.append(torch.cat([g.reshape(b, p.d, -1) for g in grads.values()], dim=2).double())
    return torch.cat(parts)


def _whiten(rows: torch.Tensor) -> torch.Tensor:
    """``K(x,x)^{-1/2} J(x)``; samples without a direction (singular ``K(x,x)``) become zero
    rows, so that they are no one's neighbour (their own factor is then NaN)."""
    w, singular = inverse_sqrt(rows @ rows.transpose(1, 2))
    out = w @ rows
    out[singular] = 0.0
    return out


def _second_moment(rows: torch.Tensor, block: int) -> torch.Tensor:
    p = rows.shape[2]
    out = torch.zeros(p, p, dtype=rows.dtype, device=rows.device)
    for start in range(0, len(rows), block):
        flat = rows[start:start + block].reshape(-1, p)
        out += flat.T @ flat
    return out


def _pairwise_squares(rows: torch.Tensor, block: int) -> torch.Tensor:
    """``Q_i = sum_j K_ij K_ij^T`` over blocks of pairs (memory ``block^2 d^2``)."""
    n, d, _ = rows.shape
    out = torch.zeros(n, d, d, dtype=rows.dtype, device=rows.device)
    for s0 in range(0, n, block):
        ri = rows[s0:s0 + block]
        for s1 in range(0, n, block):
            k = torch.einsum("iap,jbp->ijab", ri, rows[s1:s1 + block])
            out[s0:s0 + block] += torch.einsum("ijab,ijcb->iac", k, k)
    return out


def _from_sums(sums: torch.Tensor, squares: torch.Tensor, warn: bool = True) -> MatrixDenoising:
    """``F_i = S_i^{-1} Q_i S_i^{-T}`` and ``Tr(F_i)/d``; NaN where ``S_i`` is singular."""
    d = sums.shape[-1]
    scale = sums.abs().flatten(1).amax(1)
    finite = torch.isfinite(sums).flatten(1).all(1)
    singular = ~finite | (scale <= 0)
    safe = torch.where(singular[:, None, None], torch.eye(d, dtype=sums.dtype, device=sums.device), sums)
    # Condition check: a nearly singular sum (similarities that cancel) gives no usable factor.
    sv = torch.linalg.svdvals(safe)
    singular |= sv[:, -1] <= 1e-12 * sv[:, 0]
    inv = torch.linalg.inv(torch.where(singular[:, None, None], torch.eye(d, dtype=sums.dtype,
                                                                          device=sums.device), sums))
    matrix = inv @ squares @ inv.transpose(1, 2)
    matrix[singular] = float("nan")
    if warn and bool(singular.any()):
        idx = singular.nonzero().flatten().tolist()
        warnings.warn(f"nnsim_hooks: sum_j K_ij is singular for {len(idx)} sample(s) {idx[:10]}; their matrix "
                      "denoising factor is NaN", RuntimeWarning, stacklevel=3)
    trace = torch.diagonal(matrix, dim1=1, dim2=2).sum(-1) / d
    return MatrixDenoising(matrix, trace)


__all__ = ["MatrixDenoising", "matrix_denoising_factor", "index_matrix_denoising_factor"]
