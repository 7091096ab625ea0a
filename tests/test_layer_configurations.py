"""Layer configurations drawn the way Opacus's grad-sample tests draw them
(``opacus/tests/grad_samples/``: channels, kernel sizes, strides, paddings, dilations,
groups, bias, input shapes, batch sizes from 0), seeded, in float64, each checked
against a per-sample autograd loop.

The default draw is small (a few configurations per layer type); ``-m slow`` runs a
larger one with other seeds. A failure names the configuration: rerun it with
``draw(kind, seed)``.

A batch of no samples must be refused with an ``InputError`` (see
``validation.check_inputs``); every other configuration must give the loop's gradients.
"""

from __future__ import annotations

import math
import random
from typing import Any, Callable, Dict, List, Tuple

import pytest
import torch
import torch.nn as nn
from opacus.layers import DPGRU, DPLSTM, DPRNN

import nnsim_hooks
from nnsim_hooks.errors import InputError
from core_oracles import assert_grads_close
from layer_oracles import Head, call, loop_per_sample_grads, weighted_outputs


class Recurrent(nn.Module):
    """Batch-first in; out: the layer's outputs and last hidden state, batch first."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        first = self.layer.batch_first
        out, h = self.layer(x if first else x.transpose(0, 1))
        h = h[0] if isinstance(h, tuple) else h
        out = out if first else out.transpose(0, 1)
        return torch.tanh(torch.cat([out.flatten(1), h.transpose(0, 1).flatten(1)], 1))


class SelfAttention(nn.Module):
    def __init__(self, layer: nn.MultiheadAttention):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        first = self.layer.batch_first
        x = x if first else x.transpose(0, 1)
        out = self.layer(x, x, x, need_weights=False)[0]
        return torch.tanh(out if first else out.transpose(0, 1))


class FlatBags(nn.Module):
    """Padded ids ``[B, T]`` and bag lengths in; the bag layer gets flat ids and offsets."""

    def __init__(self, bag: nn.EmbeddingBag):
        super().__init__()
        self.bag = bag

    def forward(self, ids, lengths):
        inside = torch.arange(ids.shape[1]) < lengths[:, None]
        offsets = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
        return torch.tanh(self.bag(ids[inside], offsets if self.bag.include_last_offset else offsets[:-1]))


def _randomize(module: nn.Module, rng: random.Random) -> nn.Module:
    """Non-trivial running statistics and affine parameters (a fresh norm is the identity)."""
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    for m in module.modules():
        if getattr(m, "running_mean", None) is not None:
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen))
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
        if isinstance(m, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)) or type(m).__name__ == "RMSNorm":
            for p in m.parameters(recurse=False):
                p.data.copy_(torch.randn(p.shape, generator=gen))
    return module


# -- the draws: (description, model, inputs) from a seeded generator ----------------------

Case = Tuple[Dict[str, Any], nn.Module, Any]


def _batch(rng: random.Random, i: int, special: Tuple[int, ...] = ()) -> int:
    """Batch sizes as Opacus draws them (0 to 4), with the edge cases first: 1, 0 and the
    layer's own ``special`` sizes (layers * directions for recurrent layers)."""
    firsts = (1, 0) + special
    return firsts[i] if i < len(firsts) else rng.randint(1, 4)


def _spatial(rng, n: int, low: int, high: int) -> List[int]:
    return [rng.randint(low, high) for _ in range(n)]


def _conv(rng: random.Random, i: int, n: int) -> Case:
    while True:
        c = rng.choice([1, 3, 4])
        out = rng.choice([2 * c, max(1, c // 2)])  # Opacus's expander / shrinker
        kernel = rng.randint(2, 4)
        stride = rng.randint(1, 2)
        padding = rng.choice([0, 1, 2, "same", "valid"])
        dilation = rng.randint(1, 3)
        groups = rng.choice([g for g in range(1, 17) if c % g == 0 and out % g == 0])
        modes = ["zeros", "zeros", "reflect", "replicate", "circular"] if padding not in (0, "valid") else ["zeros"]
        mode = rng.choice(modes)
        size = _spatial(rng, n, {1: 6, 2: 5, 3: 4}[n], {1: 14, 2: 9, 3: 6}[n])
        if padding == "same" and stride != 1:
            continue
        pad = 0 if padding == "valid" else (dilation * (kernel - 1)) // 2 + 1 if padding == "same" else padding
        if any(s + 2 * (0 if isinstance(padding, str) else padding) < dilation * (kernel - 1) + 1 for s in size):
            continue
        if mode == "reflect" and any(pad >= s for s in size):
            continue
        desc = dict(C=c, out=out, kernel=kernel, stride=stride, padding=padding, dilation=dilation, groups=groups,
                    bias=rng.random() < 0.7, padding_mode=mode, size=size)
        layer = getattr(nn, f"Conv{n}d")(c, out, kernel, stride=stride, padding=padding, dilation=dilation,
                                         groups=groups, bias=desc["bias"], padding_mode=mode)
        b = _batch(rng, i)
        return dict(desc, N=b), Head(layer), torch.randn(b, c, *size)


def _conv_transpose(rng: random.Random, i: int, n: int) -> Case:
    while True:
        c = rng.choice([1, 2, 4])
        out = rng.choice([2 * c, max(1, c // 2)])
        kernel = rng.randint(2, 4)
        stride = rng.randint(1, 3)
        dilation = rng.randint(1, 3)
        padding = rng.randint(0, 2)
        output_padding = rng.randint(0, max(stride, dilation) - 1)  # legal: < stride or < dilation
        groups = rng.choice([g for g in range(1, 5) if c % g == 0 and out % g == 0])
        size = _spatial(rng, n, 2, {1: 7, 2: 5, 3: 3}[n])
        if any((s - 1) * stride - 2 * padding + dilation * (kernel - 1) + output_padding + 1 < 1 for s in size):
            continue
        desc = dict(C=c, out=out, kernel=kernel, stride=stride, padding=padding, output_padding=output_padding,
                    dilation=dilation, groups=groups, bias=rng.random() < 0.7, size=size)
        layer = getattr(nn, f"ConvTranspose{n}d")(c, out, kernel, stride=stride, padding=padding,
                                                  output_padding=output_padding, groups=groups, bias=desc["bias"],
                                                  dilation=dilation)
        b = _batch(rng, i)
        return dict(desc, N=b), Head(layer), torch.randn(b, c, *size)


def _linear(rng, i) -> Case:
    tokens = _spatial(rng, rng.randint(0, 2), 1, 4)
    d_in, d_out = rng.randint(1, 6), rng.randint(1, 5)
    b = _batch(rng, i)
    desc = dict(N=b, tokens=tokens, in_features=d_in, out_features=d_out, bias=rng.random() < 0.7)
    return desc, Head(nn.Linear(d_in, d_out, bias=desc["bias"])), torch.randn(b, *tokens, d_in)


def _bilinear(rng, i) -> Case:
    tokens = _spatial(rng, rng.randint(0, 1), 1, 3)
    d1, d2, d_out = rng.randint(1, 4), rng.randint(1, 4), rng.randint(1, 3)
    b = _batch(rng, i)
    desc = dict(N=b, tokens=tokens, in1=d1, in2=d2, out=d_out, bias=rng.random() < 0.7)
    inputs = (torch.randn(b, *tokens, d1), torch.randn(b, *tokens, d2))
    return desc, Head(nn.Bilinear(d1, d2, d_out, bias=desc["bias"])), inputs


def _embedding(rng, i) -> Case:
    v, dim, t = rng.randint(3, 12), rng.randint(1, 5), rng.randint(1, 6)
    padding_idx = rng.choice([None, None, rng.randrange(v)])
    b = _batch(rng, i)
    desc = dict(N=b, num_embeddings=v, embedding_dim=dim, T=t, padding_idx=padding_idx)
    return desc, Head(nn.Embedding(v, dim, padding_idx=padding_idx)), torch.randint(0, v, (b, t))


def _embedding_bag(rng, i) -> Case:
    v, dim, width = rng.randint(3, 12), rng.randint(1, 5), rng.randint(1, 6)
    mode = rng.choice(["sum", "mean", "max"])
    b = _batch(rng, i)
    desc = dict(N=b, num_embeddings=v, embedding_dim=dim, mode=mode, include_last_offset=rng.random() < 0.3,
                padding_idx=rng.choice([None, rng.randrange(v)]), flat=rng.random() < 0.7)
    bag = nn.EmbeddingBag(v, dim, mode=mode, padding_idx=desc["padding_idx"],
                          include_last_offset=desc["include_last_offset"] and desc["flat"])
    ids = torch.randint(0, v, (b, width))
    if desc["flat"]:
        lengths = torch.tensor([rng.randint(0, width) for _ in range(b)], dtype=torch.long)
        return desc, FlatBags(bag), (ids, lengths)
    return desc, Head(bag), ids


def _layer_norm(rng, i) -> Case:
    shape = _spatial(rng, rng.randint(1, 3), 1, 5)
    k = rng.randint(1, len(shape))
    b = _batch(rng, i)
    desc = dict(N=b, shape=shape, normalized_shape=shape[-k:], bias=rng.random() < 0.6)
    return desc, Head(_randomize(nn.LayerNorm(shape[-k:], bias=desc["bias"]), rng)), torch.randn(b, *shape)


def _rms_norm(rng, i) -> Case:
    shape = _spatial(rng, rng.randint(1, 3), 1, 5)
    k = rng.randint(1, len(shape))
    b = _batch(rng, i)
    desc = dict(N=b, shape=shape, normalized_shape=shape[-k:])
    return desc, Head(_randomize(nn.RMSNorm(shape[-k:]), rng)), torch.randn(b, *shape)


def _group_norm(rng, i) -> Case:
    groups, per = rng.randint(1, 3), rng.randint(1, 3)
    size = _spatial(rng, rng.randint(0, 2), 1, 4)
    if per * math.prod(size) == 1:  # PyTorch refuses groups of one value
        per = 2
    b = _batch(rng, i)
    desc = dict(N=b, groups=groups, C=groups * per, size=size)
    return desc, Head(_randomize(nn.GroupNorm(groups, groups * per), rng)), torch.randn(b, groups * per, *size)


def _instance_norm(rng, i, n: int) -> Case:
    c = rng.randint(1, 4)
    size = _spatial(rng, n, 2, {1: 6, 2: 4, 3: 3}[n])
    b = _batch(rng, i)
    desc = dict(N=b, C=c, size=size, track_running_stats=rng.random() < 0.5)
    layer = getattr(nn, f"InstanceNorm{n}d")(c, affine=True, track_running_stats=desc["track_running_stats"])
    return desc, Head(_randomize(layer, rng)), torch.randn(b, c, *size)


def _batch_norm(rng, i, n: int) -> Case:
    c = rng.randint(1, 4)
    size = _spatial(rng, n - 1 + rng.randint(0, 1) if n == 1 else n, 1, 4)
    b = _batch(rng, i)
    desc = dict(N=b, C=c, size=size, eval=True)
    return desc, Head(_randomize(getattr(nn, f"BatchNorm{n}d")(c), rng)), torch.randn(b, c, *size)


def _prelu(rng, i) -> Case:
    c = rng.randint(1, 4)
    size = _spatial(rng, rng.randint(0, 2), 1, 4)
    b = _batch(rng, i)
    desc = dict(N=b, C=c, size=size, num_parameters=rng.choice([1, c]))
    layer = nn.PReLU(desc["num_parameters"], init=rng.uniform(-0.5, 0.5))
    return desc, Head(layer), torch.randn(b, c, *size)


def _attention(rng, i) -> Case:
    heads, per_head, t = rng.randint(1, 3), rng.randint(1, 3), rng.randint(1, 5)
    b = _batch(rng, i)
    desc = dict(N=b, num_heads=heads, embed_dim=heads * per_head, T=t, batch_first=rng.random() < 0.5,
                bias=rng.random() < 0.7, add_bias_kv=rng.random() < 0.3, add_zero_attn=rng.random() < 0.3)
    layer = nn.MultiheadAttention(heads * per_head, heads, bias=desc["bias"], add_bias_kv=desc["add_bias_kv"],
                                  add_zero_attn=desc["add_zero_attn"], batch_first=desc["batch_first"])
    return desc, SelfAttention(layer), torch.randn(b, t, heads * per_head)


RECURRENT = {"RNN": nn.RNN, "GRU": nn.GRU, "LSTM": nn.LSTM, "DPRNN": DPRNN, "DPGRU": DPGRU, "DPLSTM": DPLSTM}


def _recurrent(rng, i, name: str) -> Case:
    layers, bidirectional = rng.randint(1, 3), rng.random() < 0.5
    states = layers * (2 if bidirectional else 1)
    b = _batch(rng, i, special=(states,))
    desc = dict(N=b, layer=name, input_size=rng.randint(1, 4), hidden_size=rng.randint(1, 4), num_layers=layers,
                bidirectional=bidirectional, batch_first=rng.random() < 0.5, bias=rng.random() < 0.7,
                T=rng.randint(1, 4))
    layer = RECURRENT[name](desc["input_size"], desc["hidden_size"], num_layers=layers, bias=desc["bias"],
                            batch_first=desc["batch_first"], bidirectional=bidirectional)
    return desc, Recurrent(layer), torch.randn(b, desc["T"], desc["input_size"])


DRAWS: Dict[str, Callable[[random.Random, int], Case]] = {
    **{f"conv{n}d": (lambda rng, i, n=n: _conv(rng, i, n)) for n in (1, 2, 3)},
    **{f"conv_transpose{n}d": (lambda rng, i, n=n: _conv_transpose(rng, i, n)) for n in (1, 2, 3)},
    "linear": _linear,
    "bilinear": _bilinear,
    "embedding": _embedding,
    "embedding_bag": _embedding_bag,
    "layer_norm": _layer_norm,
    "group_norm": _group_norm,
    **{f"instance_norm{n}d": (lambda rng, i, n=n: _instance_norm(rng, i, n)) for n in (1, 2, 3)},
    **{f"batch_norm{n}d": (lambda rng, i, n=n: _batch_norm(rng, i, n)) for n in (1, 2, 3)},
    "prelu": _prelu,
    "multihead_attention": _attention,
    **{name.lower(): (lambda rng, i, name=name: _recurrent(rng, i, name)) for name in RECURRENT},
}
if hasattr(nn, "RMSNorm"):
    DRAWS["rms_norm"] = _rms_norm


def draw(kind: str, seed: int, i: int) -> Case:
    """Configuration ``i`` of layer type ``kind`` from ``seed`` (the same on any machine)."""
    rng = random.Random(f"{kind}/{seed}/{i}")
    torch.manual_seed(rng.randrange(2**31))
    return DRAWS[kind](rng, i)


def _as_double(inputs):
    if torch.is_tensor(inputs):
        return inputs.double() if inputs.is_floating_point() else inputs
    return tuple(_as_double(t) for t in inputs)


def check(kind: str, seed: int, i: int, d: int = 2) -> None:
    desc, model, inputs = draw(kind, seed, i)
    model, inputs = model.double().eval(), _as_double(inputs)
    where = f"{kind} {desc} (draw({kind!r}, {seed}, {i}))"
    with nnsim_hooks.attach(model, output=lambda out, targets=None: out.flatten(1)[:, :d]) as h:
        if desc["N"] == 0:
            with pytest.raises(InputError, match="no samples"):
                h.per_sample_gradients(inputs)
            return
    with torch.no_grad():
        out_shape = call(model, inputs).shape[1:]
    w = torch.randn(d, *out_shape, dtype=torch.float64)
    ref = loop_per_sample_grads(model, inputs, weighted_outputs(w))
    with nnsim_hooks.attach(model, output=weighted_outputs(w)) as h:
        try:
            got = h.per_sample_gradients(inputs)
        except Exception as exc:  # name the configuration
            raise AssertionError(f"{where}: {type(exc).__name__}: {exc}") from exc
    try:
        if all(float(r.abs().max()) < 1e-12 for r in ref.values()):
            # No gradient (every id on padding_idx; LayerNorm over one value, whose
            # normalised input is 0 up to rounding): a relative check cannot fail.
            assert list(got) == list(ref)
            assert all(got[n].shape == r.shape and float(got[n].abs().max()) < 1e-12 for n, r in ref.items())
        else:
            assert_grads_close(got, ref, rtol=1e-8, atol=1e-10)
    except AssertionError as exc:
        raise AssertionError(f"{where}: {exc}") from exc


#: configurations per layer type: the first ones take the edge batch sizes (1, 0, and
#: layers * directions for recurrent layers), then random ones
FAST, SLOW = 4, 40


@pytest.mark.parametrize("kind", sorted(DRAWS))
def test_drawn_configurations(kind):
    for i in range(FAST):
        check(kind, 0, i)


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(DRAWS))
def test_drawn_configurations_large(kind):
    for i in range(SLOW):
        check(kind, 1, i)
