"""paper.registration's pieces against oracles: the generated map is the image's shapes moved by
the truth, the label noise is independent of the image, and the kernel-block path gives the
library's d×d denoising factor and consistency."""

import numpy as np
import pytest
import torch

import nnsim_hooks
from nnsim_hooks.exact.matrix_denoising import matrix_denoising_factor
from paper.registration_data import MAX_NOISE, MAX_SHIFT, make_patches
from paper.registration_kernel import kernel_quantities, raw_kernel
from paper.registration_net import PatchMean, UNet, predict


def centroids(masks: torch.Tensor) -> torch.Tensor:
    """Mass centres [n, 2] (x, y) of soft masks [n, P, P]."""
    p = masks.shape[-1]
    c = torch.arange(p, dtype=torch.float64)
    m = masks.double()
    total = m.sum((1, 2))
    return torch.stack([(m * c[None, None, :]).sum((1, 2)) / total, (m * c[None, :, None]).sum((1, 2)) / total], 1)


def test_map_shows_the_shapes_moved_by_the_truth():
    data = make_patches(200, seed=3)
    assert data.truth.abs().max() <= MAX_SHIFT + 1e-5 and data.noise.abs().max() <= MAX_NOISE + 1e-5
    moved = centroids(data.x[:, 1]) - centroids(data.objects.float())
    truth = data.truth.mean((2, 3)).double()
    noise = data.noise.mean((2, 3)).double()
    for axis in range(2):
        # shapes cut by the border and occlusions blur it, but the map moves with the truth ...
        assert np.corrcoef(moved[:, axis], truth[:, axis])[0, 1] > 0.85
        # ... and the label noise is independent of what the patch shows
        assert abs(np.corrcoef(moved[:, axis], noise[:, axis])[0, 1]) < 0.15


@pytest.mark.slow  # about 3 s of CPU
def test_kernel_blocks_agree_with_the_library():
    """Blocks that do not divide N, against matrix_denoising_factor (all Jacobians at once)
    and Handle.consistency (two passes of parameter-sized sums): independent paths."""
    data = make_patches(22, seed=0)
    torch.manual_seed(0)
    model = PatchMean(UNet((2, 4, 4, 8)))
    f = predict(model, data.x)
    kq = kernel_quantities(raw_kernel(model, data.x, block=8), f)
    with nnsim_hooks.attach(model, output="full", batch_size=8) as h:
        ref = matrix_denoising_factor(h, data.x, kernel="raw")
        residual = h.consistency(data.x, f, progress=False)
    np.testing.assert_allclose(kq.factor.numpy(), ref.matrix.numpy(), rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose(kq.trace.numpy(), ref.trace.numpy(), rtol=1e-4)
    np.testing.assert_allclose(kq.residual.numpy(), residual, rtol=1e-3, atol=1e-6)
    # matrix Cauchy-Schwarz: N equal neighbours is the most a sample can average
    assert (kq.trace.numpy() >= (1 - 1e-6) / len(data.x)).all()
