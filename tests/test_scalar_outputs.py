"""Models whose output squeezes to ``[B]`` (the authors' Simple1DInputNet ends with ``.squeeze()``):
``[1, 1] -> []`` on a one-sample batch must still be sample 0's output, at every batch size."""

import pytest
import torch
import torch.nn as nn

import nnsim_hooks
from nnsim_hooks.errors import OutputSpecError
from nnsim_hooks.oracle import per_sample_loop

DT = torch.float64


class Squeezed(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1))

    def forward(self, x):
        return self.net(x).squeeze()


class BatchMean(Squeezed):
    def forward(self, x):
        return self.net(x).mean()


def _cosines(x):
    """The oracle: per-sample gradients one sample at a time (a plain loop, no hooks)."""
    model = Squeezed().to(DT)
    grads = per_sample_loop(model, x, output="sum")
    flat = torch.cat([g.reshape(len(x), -1) for g in grads.values()], 1)
    unit = flat / flat.norm(dim=1, keepdim=True)
    return unit @ unit.T


@pytest.mark.parametrize("batch", [1, 3])
def test_similarity_at_batch_sizes_1_and_3(batch):
    x = torch.randn(batch, 3, dtype=DT, generator=torch.Generator().manual_seed(batch))
    with nnsim_hooks.attach(Squeezed().to(DT)) as h:
        sims = h.similarity(x)
        features = h.features(x)
        assert h.output_name == "sum"
    torch.testing.assert_close(sims, _cosines(x), rtol=0, atol=1e-10)
    assert features.shape[0] == batch and torch.isfinite(features).all()


def test_pair_similarity_with_one_pair():
    a, b = torch.randn(1, 3, dtype=DT), torch.randn(1, 3, dtype=DT)
    with nnsim_hooks.attach(Squeezed().to(DT)) as h:
        k = h.pair_similarity(a, b)
    torch.testing.assert_close(k, _cosines(torch.cat([a, b]))[0, 1:], rtol=0, atol=1e-10)


def test_build_index_with_a_last_batch_of_one():
    x = torch.randn(9, 3, dtype=DT, generator=torch.Generator().manual_seed(0))
    model = Squeezed().to(DT)
    with nnsim_hooks.attach(model, batch_size=4, sketch_dim=64) as h:
        index = h.build_index(torch.utils.data.TensorDataset(x), progress=False)
        direct = h.features(x)
    assert len(index) == 9
    with nnsim_hooks.attach(model, batch_size=9, sketch_dim=64) as h:
        whole = h.features(x)  # one batch: the same sketch, so the same rows
    torch.testing.assert_close(direct, whole, rtol=1e-6, atol=1e-8)


def test_zero_d_output_for_a_larger_batch_is_an_output_spec_error():
    with nnsim_hooks.attach(BatchMean().to(DT)) as h:
        with pytest.raises(OutputSpecError, match=r"0-d tensor for a batch of 3 samples; expected .*\[3, \.\.\.\]"):
            h.similarity(torch.randn(3, 3, dtype=DT))
