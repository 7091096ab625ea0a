"""The paper's label-free quantities for a d-output network from its exact N·d × N·d kernel
(PAPER §3, §6): the authors' d×d denoising factor and the consistency residual.

``nnsim_hooks.exact.matrix_denoising.matrix_denoising_factor`` holds every Jacobian at once,
N·d·P float64 (2 GB for 1,024 patches of a 122k-parameter U-Net); here the raw kernel
``K_ij = J_i J_jᵀ`` is built from blocks of Jacobians recomputed as needed (two blocks held,
in float32), and everything else is read off it. The two agree (tests/test_paper_registration.py).
"""

from __future__ import annotations

from typing import List, NamedTuple

import torch

import nnsim_hooks


class KernelQuantities(NamedTuple):
    """``factor`` [N, d, d]: ``F_i = S_i⁻¹ Q_i S_i⁻ᵀ``; ``trace`` [N]: ``Tr(F_i)/d``;
    ``average`` [N, d]: ``S_i⁻¹ Σ_j K_ij f_j``, the kernel average of the predictions;
    ``residual`` [N]: ``‖f_i − average_i‖``, the consistency check. float64."""

    factor: torch.Tensor
    trace: torch.Tensor
    average: torch.Tensor
    residual: torch.Tensor


def jacobian_block(handle, x: torch.Tensor) -> torch.Tensor:
    """Per-sample Jacobians [B, d, P] (float32) of the handle's d outputs."""
    grads = handle.per_sample_gradients(x)
    return torch.cat([g.reshape(len(x), g.shape[1], -1) for g in grads.values()], 2)


def raw_kernel(model: torch.nn.Module, x: torch.Tensor, block: int = 256) -> torch.Tensor:
    """The raw kernel of ``model``'s d outputs over ``x``, float64 [N, N, d, d]:
    ``K[i, j] = J(x_i) J(x_j)ᵀ`` over all parameters."""
    n = len(x)
    starts: List[int] = list(range(0, n, block))
    out = None
    with nnsim_hooks.attach(model, output="full", batch_size=block) as h:
        for a in starts:
            ja = jacobian_block(h, x[a:a + block])
            if out is None:
                d = ja.shape[1]
                out = torch.empty(n, n, d, d, dtype=torch.float64)
            for b in starts:
                if b < a:
                    continue
                jb = ja if b == a else jacobian_block(h, x[b:b + block])
                k = torch.einsum("iap,jbp->ijab", ja, jb).double()
                out[a:a + len(ja), b:b + len(jb)] = k
                out[b:b + len(jb), a:a + len(ja)] = k.permute(1, 0, 3, 2)
    return out


def kernel_quantities(kernel: torch.Tensor, predictions: torch.Tensor) -> KernelQuantities:
    """The authors' factor and the consistency residual from the raw kernel [N, N, d, d] and
    the network's d outputs [N, d] (self included in every sum, as the authors)."""
    sums = kernel.sum(1)  # S_i = Σ_j K_ij
    squares = torch.einsum("ijab,ijcb->iac", kernel, kernel)  # Q_i = Σ_j K_ij K_ijᵀ
    inv = torch.linalg.inv(sums)
    factor = inv @ squares @ inv.transpose(1, 2)
    f = predictions.double()
    average = (inv @ torch.einsum("ijab,jb->ia", kernel, f)[..., None])[..., 0]
    trace = torch.diagonal(factor, dim1=1, dim2=2).sum(-1) / factor.shape[-1]
    return KernelQuantities(factor, trace, average, (f - average).norm(dim=1))
