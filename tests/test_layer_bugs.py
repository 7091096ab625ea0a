"""Regressions for five layer bugs found by drawing layer configurations the way Opacus's
grad-sample tests draw them (issue 16, item 6). Each case failed with a raw error before
its fix; each is checked on every public path (per-sample gradients, exact similarity,
sketched features) against a per-sample autograd loop.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from opacus.layers import DPGRU, DPLSTM, DPRNN

import nnsim_hooks
from nnsim_hooks.errors import InputError
from core_oracles import assert_grads_close, brute_cosine, flatten_grads
from layer_oracles import Head, call, loop_per_sample_grads, weighted_outputs


def fallback_twin(model: nn.Module, layer_name: str) -> nn.Module:
    """A copy of ``model`` whose module ``layer_name`` is a subclass of its type: no fast
    rule matches it (the table is keyed by exact type), so torch.func computes it. Same
    parameter names and shapes, hence the same sketch."""
    twin = copy.deepcopy(model)
    layer = twin.get_submodule(layer_name)
    layer.__class__ = type("Twin" + type(layer).__name__, (type(layer),), {})
    return twin


def check_every_path(model: nn.Module, inputs, layer_name: str, d: int = 2, fast: bool = True, twin=None) -> None:
    """Per-sample gradients (d outputs), exact similarity and features (one output)
    against the loop, the brute-force cosine and the features of ``twin`` (None: the
    torch.func twin), a model with the same parameters on which the layer has no fast
    rule (``fast=False``: it has none anyway; its features are only checked to be unit rows)."""
    model = model.double().eval()
    inputs = as_double(inputs)
    with torch.no_grad():
        out_shape = call(model, inputs).shape[1:]
    w = torch.randn(d, *out_shape, dtype=torch.float64)
    ref = loop_per_sample_grads(model, inputs, weighted_outputs(w))
    one = weighted_outputs(w[:1])
    ref1 = {n: g[:, 0] for n, g in ref.items()}
    with nnsim_hooks.attach(model, output=weighted_outputs(w)) as h:
        assert_grads_close(h.per_sample_gradients(inputs), ref, rtol=1e-9, atol=1e-10)
        assert not fast or layer_name in h.coverage.fast, "the case must exercise a fast rule"
    # exact_limit=0: every parameter is sketched in the first stage, through the
    # rule's own factored sketch where it has one.
    with nnsim_hooks.attach(model, output=one, sketch_dim=32, exact_limit=0) as h:
        flat = flatten_grads(ref1)
        torch.testing.assert_close(h.similarity(inputs), brute_cosine(flat, flat), rtol=1e-9, atol=1e-10,
                                   equal_nan=True)
        features = h.features(inputs)
    if not fast:
        torch.testing.assert_close(features.norm(dim=1), torch.ones(len(features), dtype=features.dtype))
        return
    twin = fallback_twin(model, layer_name) if twin is None else twin.double().eval()
    with nnsim_hooks.attach(twin, output=one, sketch_dim=32, exact_limit=0) as h:
        twin_features = h.features(inputs)
        assert layer_name not in h.coverage.fast
    torch.testing.assert_close(features, twin_features, rtol=1e-9, atol=1e-10, equal_nan=True)


def as_double(inputs):
    if torch.is_tensor(inputs):
        return inputs.double() if inputs.is_floating_point() else inputs
    return tuple(as_double(t) for t in inputs)


# -- 1. an empty batch ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "layer, x",
    [
        (nn.Conv2d(3, 4, 3), torch.randn(0, 3, 8, 8)),
        (nn.ConvTranspose1d(2, 3, 3, stride=2), torch.randn(0, 2, 5)),
        (nn.Embedding(10, 4), torch.randint(0, 10, (0, 5))),
        (nn.Linear(3, 2), torch.randn(0, 3)),
    ],
    ids=["conv2d", "conv_transpose1d", "embedding", "linear"],
)
@pytest.mark.parametrize("output", ["sum", "callable"])
def test_empty_batch_is_refused_on_every_path(layer, x, output):
    model = Head(layer).double()
    x = x.double() if x.is_floating_point() else x
    fn = "sum" if output == "sum" else (lambda out, targets=None: out.flatten(1).sum(1))
    with nnsim_hooks.attach(model, output=fn) as h:
        for run in (h.per_sample_gradients, h.similarity, h.features, lambda v: h.similarity(v, exact=False)):
            with pytest.raises(InputError, match=r"no samples.*\[0, .*skip empty batches"):
                run(x)
    # An empty side of a pair of batches is no pass of its own: an empty block.
    shape = (2, *x.shape[1:])
    full = torch.randn(shape, dtype=x.dtype) if x.is_floating_point() else torch.randint(0, 10, shape)
    with nnsim_hooks.attach(model, output="sum") as h:
        assert h.similarity(x, full).shape == (0, 2)
        assert h.similarity(full, x).shape == (2, 0)


# -- 3. LayerNorm without bias over every non-batch dimension ------------------------------


@pytest.mark.parametrize("shape", [(5,), (3, 4)], ids=["1-d", "2-d"])
def test_layernorm_without_bias_over_all_dims(shape):
    layer = nn.LayerNorm(shape, bias=False)
    nn.init.normal_(layer.weight)
    check_every_path(Head(layer), torch.randn(4, *shape), "layer")


# -- 2. ConvTranspose with output_padding >= stride (legal when dilation > stride) ----------


@pytest.mark.parametrize(
    "layer, x",
    [
        (nn.ConvTranspose1d(2, 3, 3, stride=1, dilation=3, output_padding=2), torch.randn(3, 2, 5)),
        (nn.ConvTranspose2d(2, 3, 3, stride=2, dilation=3, output_padding=2, padding=1), torch.randn(3, 2, 4, 5)),
        (nn.ConvTranspose2d(4, 2, (2, 3), stride=(1, 2), dilation=(2, 3), output_padding=(1, 2), groups=2),
         torch.randn(3, 4, 3, 4)),
        (nn.ConvTranspose3d(2, 2, 2, stride=1, dilation=2, output_padding=1, bias=False), torch.randn(3, 2, 3, 2, 3)),
    ],
    ids=["1d-stride-1", "2d-padded", "2d-groups-per-dim", "3d-no-bias"],
)
def test_conv_transpose_output_padding_past_stride(layer, x):
    check_every_path(Head(layer), x, "layer")


# -- 5. recurrent layers when the batch size is layers * directions -------------------------


class Recurrent(nn.Module):
    """A batch-first model around a recurrent layer: its outputs and its last hidden state
    (``[layers * directions, B, H]``), optionally started from a state computed from the input."""

    def __init__(self, layer: nn.Module, initial_state: bool = False):
        super().__init__()
        self.layer = layer
        self.batch_first = layer.batch_first
        states = layer.num_layers * (2 if layer.bidirectional else 1)
        self.start = nn.Linear(layer.input_size, states * layer.hidden_size) if initial_state else None

    def forward(self, x):
        hx = None
        if self.start is not None:
            h0 = self.start(x.mean(1)).reshape(x.shape[0], -1, self.layer.hidden_size).transpose(0, 1).contiguous()
            hx = (h0, torch.tanh(h0)) if isinstance(self.layer, (nn.LSTM, DPLSTM)) else h0
        out, h = self.layer(x if self.batch_first else x.transpose(0, 1), hx)
        h = h[0] if isinstance(h, tuple) else h
        seq = out.sum(1 if self.batch_first else 0)
        return torch.cat([seq, h.transpose(0, 1).flatten(1)], dim=1)


@pytest.mark.parametrize(
    "make, states",
    [
        (lambda bf: nn.RNN(3, 4, num_layers=2, batch_first=bf), 2),
        (lambda bf: nn.GRU(3, 4, num_layers=2, bidirectional=True, batch_first=bf), 4),
        (lambda bf: nn.LSTM(3, 4, num_layers=1, bidirectional=True, batch_first=bf), 2),
        (lambda bf: DPLSTM(3, 4, num_layers=2, bidirectional=True, batch_first=bf), 4),
        (lambda bf: DPGRU(3, 4, num_layers=3, batch_first=bf), 3),
        (lambda bf: DPRNN(3, 4, num_layers=2, batch_first=bf), 2),
    ],
    ids=["rnn", "gru-bidirectional", "lstm-bidirectional", "dp-lstm", "dp-gru", "dp-rnn"],
)
def test_recurrent_at_every_batch_size(make, states):
    """Batch-first layers: their h_n ``[layers * directions, B, H]`` has the batch's size
    first when B == layers * directions, and was taken as batch-first."""
    for batch in (1, states, states + 1):
        layer = make(True)
        check_every_path(Recurrent(layer), torch.randn(batch, 5, 3), "layer", fast=False)


def test_recurrent_with_initial_state_from_the_input():
    """h0 ``[layers * directions, B, H]`` is an input too: at B == layers * directions it
    also passes for batch-first."""
    model = Recurrent(nn.LSTM(3, 4, num_layers=2, bidirectional=True, batch_first=True), initial_state=True)
    for batch in (3, 4):
        check_every_path(model, torch.randn(batch, 5, 3), "layer", fast=False)


# -- 4. EmbeddingBag with flat ids and offsets ----------------------------------------------


class FlatBags(nn.Module):
    """Padded ids ``[B, T]`` and bag lengths ``[B]`` in; the bag layer gets the flat ids
    ``[N]`` and the offsets ``[B]`` (``[B + 1]`` with ``include_last_offset``)."""

    def __init__(self, bag: nn.EmbeddingBag):
        super().__init__()
        self.bag = bag

    def forward(self, ids, lengths, weights=None):
        inside = torch.arange(ids.shape[1]) < lengths[:, None]
        offsets = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
        offsets = offsets if self.bag.include_last_offset else offsets[:-1]
        return torch.tanh(self.bag(ids[inside], offsets, None if weights is None else weights[inside]))


class OneBagAtATime(FlatBags):
    """The same maths, the bag layer called once per sample (outputs ``[1, E]``, not the
    batch): the model's generic rule computes it, without the EmbeddingBag rule."""

    def forward(self, ids, lengths, weights=None):
        rows = [super(OneBagAtATime, self).forward(ids[i : i + 1], lengths[i : i + 1],
                                                   None if weights is None else weights[i : i + 1])
                for i in range(ids.shape[0])]
        return torch.cat(rows)


class FixedBags(nn.Module):
    """Bags of one length: offsets from ``torch.arange``, not derived from the inputs."""

    def __init__(self, bag: nn.EmbeddingBag):
        super().__init__()
        self.bag = bag

    def forward(self, ids):
        b, t = ids.shape
        return torch.tanh(self.bag(ids.reshape(-1), torch.arange(0, b * t, t)))


@pytest.mark.parametrize(
    "options",
    [dict(mode="sum"), dict(mode="mean", include_last_offset=True), dict(mode="max", padding_idx=2),
     dict(mode="sum", scale_grad_by_freq=True), dict(mode="sum", per_sample_weights=True)],
    ids=["sum", "mean-last-offset", "max-padding-idx", "sum-by-frequency", "per-sample-weights"],
)
def test_embedding_bag_with_flat_ids_and_offsets(options):
    options = dict(options)
    weighted = options.pop("per_sample_weights", False)
    bag = nn.EmbeddingBag(7, 3, **options)
    ids = torch.tensor([[2, 1, 2, 5, 0], [3, 3, 3, 6, 2], [4, 0, 0, 0, 0], [6, 5, 2, 1, 1]])
    lengths = torch.tensor([3, 5, 0, 4])  # one empty bag
    inputs = (ids, lengths) + ((torch.randn(4, 5),) if weighted else ())
    check_every_path(FlatBags(bag), inputs, "bag", twin=OneBagAtATime(bag))


def test_embedding_bag_with_offsets_not_from_the_inputs():
    bag = nn.EmbeddingBag(7, 3, mode="mean")
    ids = torch.randint(0, 7, (4, 3))
    check_every_path(FixedBags(bag), ids, "bag")


def test_embedding_bag_as_the_whole_model_with_flat_ids_is_refused():
    """Called as Opacus's tests call it, ``model(ids [N], offsets [B])``, the inputs have no
    common batch dimension: refused, naming the shapes (wrap the layer as FlatBags does)."""
    bag = nn.EmbeddingBag(7, 3).double()
    with nnsim_hooks.attach(bag, output="sum") as h:
        with pytest.raises(InputError, match=r"share the batch size 9.*\[9\].*\[4\]"):
            h.per_sample_gradients((torch.randint(0, 7, (9,)), torch.tensor([0, 2, 5, 7])))


def test_embedding_bag_similarity_across_batches_of_other_bag_widths():
    """Batches pad their bags to their own longest: the kept factors of two batches do
    not line up, and their Gram block comes from materialised gradients."""
    model = FlatBags(nn.EmbeddingBag(7, 3, mode="mean")).double()
    ids = torch.randint(0, 7, (6, 5))
    lengths = torch.tensor([3, 5, 1, 4, 2, 2])  # widths 5, 4 and 2 in batches of two
    w = torch.randn(1, 3, dtype=torch.float64)
    ref = loop_per_sample_grads(model, (ids, lengths), weighted_outputs(w))
    flat = flatten_grads({n: g[:, 0] for n, g in ref.items()})
    with nnsim_hooks.attach(model, output=weighted_outputs(w), batch_size=2) as h:
        sim = h.similarity((ids, lengths), progress=False)
    torch.testing.assert_close(sim, brute_cosine(flat, flat), rtol=1e-9, atol=1e-10)
