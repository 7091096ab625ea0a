"""The factored diagonal blocks (each sample's own kernel) against the full factored Gram
and against materialised per-sample gradients, on shapes that take each branch."""

from __future__ import annotations

import pytest
import torch

from nnsim_hooks.rules import factored
from nnsim_hooks.rules.factored import factored_gram, factored_self_gram


@pytest.mark.parametrize("d", [1, 3])
@pytest.mark.parametrize("shape", [(5, 7, 1), (4, 6, 40), (40, 30, 3)], ids=["one-position", "many", "wide"])
@pytest.mark.parametrize("bias", [False, True])
def test_self_gram_is_the_gram_diagonal(d, shape, bias, monkeypatch):
    r, c, length = shape
    b = 5
    torch.manual_seed(0)
    cols = torch.randn(b, c, length, dtype=torch.float64)
    rows = torch.randn(d, b, r, length, dtype=torch.float64)
    grads = torch.einsum("mbrl,bcl->bmrc", rows, cols).reshape(b, d, -1)
    if bias:
        grads = torch.cat([grads, rows.sum(-1).transpose(0, 1)], 2)
    ref = grads @ grads.transpose(1, 2)
    full = factored_gram(cols, rows, True, bias).reshape(b, d, b, d)
    i = torch.arange(b)
    torch.testing.assert_close(full[i, :, i, :], ref)
    for limit in (factored.MAX_ELEMENTS, 7):  # and in chunks of a sample or two
        monkeypatch.setattr(factored, "MAX_ELEMENTS", limit)
        torch.testing.assert_close(factored_self_gram(cols, rows, True, bias), ref)
