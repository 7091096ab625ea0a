"""Every per-layer rule (and the torch.func fallback) on generated shapes, in float64.

Each case is one small model; the differentiated output is a fixed random weighting of
all its outputs, so that every output position gets its own gradient. The hooks must give
the same per-sample gradients as torch.func (``vmap`` of ``jacrev``), for one output and
for d = 2 outputs, and the exact similarity (Gram path: ghost or materialised) must equal
the brute-force cosine of those gradients.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import nnsim_hooks
from core_oracles import (
    assert_grads_close,
    brute_cosine,
    brute_matrix_kernel,
    flatten_grads,
    func_per_sample_grads,
)

B = 3


def _randomize_stats(module: nn.Module) -> nn.Module:
    """Non-trivial running statistics and affine parameters for every norm layer."""
    for m in module.modules():
        if getattr(m, "running_mean", None) is not None:
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
        if isinstance(m, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)) or type(m).__name__ == "RMSNorm":
            for p in m.parameters(recurse=False):
                p.data.normal_()
    return module


# -- modules the fast rules must not be applied to, and bare parameter uses ------------------


class WSConv2d(nn.Conv2d):
    """Weight-standardised conv (like timm's StdConv2d): a subclass that changes the maths."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / (w.std(dim=(1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class ClsPosEmbed(nn.Module):
    """ViT-style tokens: a Linear patch embedding, a cls_token and a pos_embed on the module itself."""

    def __init__(self, dim=4, tokens=3):
        super().__init__()
        self.proj = nn.Linear(5, dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, tokens + 1, dim))

    def forward(self, x):
        x = self.proj(x)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        return torch.cat([cls, x], dim=1) + self.pos_embed


class LayerScale(nn.Module):
    def __init__(self, dim=4):
        super().__init__()
        self.gamma = nn.Parameter(torch.randn(dim))

    def forward(self, x):
        return x * self.gamma


class RelPosBias(nn.Module):
    """A relative-position table indexed by a buffer (Swin / timm RelPosBias style)."""

    def __init__(self, window=3, heads=2):
        super().__init__()
        self.table = nn.Parameter(torch.randn(2 * window - 1, heads))
        coords = torch.arange(window)
        self.register_buffer("index", coords[:, None] - coords[None, :] + window - 1, persistent=False)

    def forward(self, attn):  # attn [B, heads, W, W]
        return attn + self.table[self.index].permute(2, 0, 1)


class CalledTwice(nn.Module):
    """The same Linear applied twice (weight sharing within one forward)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(torch.tanh(self.lin(x)))


class Tied(nn.Module):
    """Two Linear modules holding the same weight Parameter."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


class PartlyFrozen(nn.Module):
    def __init__(self):
        super().__init__()
        self.frozen = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)
        self.frozen.requires_grad_(False)
        self.head.weight.requires_grad_(False)  # only head.bias is trainable

    def forward(self, x):
        return self.head(torch.tanh(self.frozen(x)))


class SubclassedAttention(nn.MultiheadAttention):
    """A subclass: the attention rule is matched by exact type, so this one is generic."""


class AttentionBlock(nn.Module):
    """nn.MultiheadAttention reads out_proj.weight itself: out_proj's forward never runs."""

    def __init__(self, attention=nn.MultiheadAttention):
        super().__init__()
        self.attn = attention(4, 2, batch_first=True)

    def forward(self, x):
        return self.attn(x, x, x, need_weights=False)[0]


class HeadUsedByParent(nn.Module):
    """The parent calls F.linear on its child's parameters; the child's forward never runs."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return F.linear(torch.tanh(self.body(x)), self.head.weight, self.head.bias)


class TiedEmbeddingHead(nn.Module):
    """Language-model style: the embedding table is also the output projection."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.mix = nn.Linear(4, 4)

    def forward(self, ids):
        h = torch.tanh(self.mix(self.emb(ids)))
        return F.linear(h, self.emb.weight)


class SharedBiasMlp(nn.Module):
    """timm RelPosMlp style: an MLP on a coordinate buffer (no batch) gives a bias shared by all samples."""

    def __init__(self, window=3, heads=2):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(2, 5), nn.Tanh(), nn.Linear(5, heads))
        coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij"), -1)
        self.register_buffer("coords", coords.reshape(-1, 2).float(), persistent=False)

    def forward(self, attn):  # [B, heads, W, W]
        bias = self.mlp(self.coords.to(attn.dtype))  # [W*W, heads]
        return attn + bias.T.reshape(1, attn.shape[1], attn.shape[2], attn.shape[3])


class WindowsInBatch(nn.Module):
    """maxvit style: windows folded into the batch dimension before a Linear."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.norm = nn.LayerNorm(3)

    def forward(self, x):  # [B, 4 tokens, 4]
        b = x.shape[0]
        y = self.lin(x.reshape(b * 2, 2, 4))
        return self.norm(y.reshape(b, 4, 3))


class SequenceFirstTransformer(nn.Module):
    """nn.TransformerEncoderLayer with batch_first=False: its layers see [T, B, C]."""

    def __init__(self):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(4, 2, dim_feedforward=6, dropout=0.0)

    def forward(self, x):  # [B, T, C]
        return self.layer(x.transpose(0, 1)).transpose(0, 1)


def _weight_norm_linear():
    return nn.utils.parametrizations.weight_norm(nn.Linear(4, 3))


def _cases():
    """(id, model factory, input factory, expected rule status of the hooked modules)."""
    r = torch.randn
    ids = lambda *shape: torch.randint(0, 7, shape)  # noqa: E731
    c = []
    add = lambda name, model, inputs, status="fast": c.append(pytest.param(model, inputs, status, id=name))  # noqa
    # Linear
    add("linear", lambda: nn.Linear(5, 3), lambda: r(B, 5))
    add("linear-tokens", lambda: nn.Linear(5, 3), lambda: r(B, 4, 5))
    add("linear-2-token-dims", lambda: nn.Linear(5, 3), lambda: r(B, 2, 3, 5))
    add("linear-no-bias", lambda: nn.Linear(5, 3, bias=False), lambda: r(B, 4, 5))
    add("linear-many-tokens", lambda: nn.Linear(3, 2), lambda: r(B, 40, 3))
    # Conv
    add("conv1d-stride-pad", lambda: nn.Conv1d(2, 3, 3, stride=2, padding=1), lambda: r(B, 2, 9))
    add("conv1d-same-dilated", lambda: nn.Conv1d(2, 3, 3, dilation=2, padding="same"), lambda: r(B, 2, 8))
    add("conv1d-valid", lambda: nn.Conv1d(2, 3, 4, padding="valid"), lambda: r(B, 2, 8))
    add("conv2d-mixed", lambda: nn.Conv2d(2, 3, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2)), lambda: r(B, 2, 7, 6))
    add("conv2d-same-even-kernel", lambda: nn.Conv2d(2, 3, 4, padding="same"), lambda: r(B, 2, 6, 5))
    add("conv2d-same-dilated-even", lambda: nn.Conv2d(2, 2, 2, padding="same", dilation=3), lambda: r(B, 2, 7, 7))
    for mode in ("reflect", "replicate", "circular"):
        add(f"conv2d-{mode}", lambda mode=mode: nn.Conv2d(2, 3, 3, padding=(1, 2), padding_mode=mode), lambda: r(B, 2, 6, 6))
        add(f"conv1d-same-{mode}", lambda mode=mode: nn.Conv1d(2, 2, 4, padding="same", padding_mode=mode), lambda: r(B, 2, 7))
    add("conv2d-groups", lambda: nn.Conv2d(4, 6, 3, groups=2, padding=1), lambda: r(B, 4, 5, 5))
    add("conv2d-depthwise", lambda: nn.Conv2d(3, 6, 3, groups=3, stride=2, bias=False), lambda: r(B, 3, 7, 7))
    add("conv2d-1x1-output", lambda: nn.Conv2d(2, 3, 3), lambda: r(B, 2, 3, 3))
    add("conv3d-stride-pad", lambda: nn.Conv3d(2, 2, 3, stride=2, padding=1), lambda: r(B, 2, 5, 5, 4))
    add("conv3d-same-replicate", lambda: nn.Conv3d(1, 2, 2, padding="same", padding_mode="replicate"), lambda: r(B, 1, 4, 3, 4))
    add("conv3d-groups-dilated", lambda: nn.Conv3d(4, 2, 2, groups=2, dilation=2), lambda: r(B, 4, 5, 5, 5))
    # ConvTranspose
    add("convT1d", lambda: nn.ConvTranspose1d(2, 3, 3, stride=2, padding=1, output_padding=1), lambda: r(B, 2, 5))
    add("convT2d-groups-dilated", lambda: nn.ConvTranspose2d(4, 2, 3, stride=2, padding=1, output_padding=1, dilation=2, groups=2), lambda: r(B, 4, 4, 3))
    add("convT2d-no-bias", lambda: nn.ConvTranspose2d(2, 3, (2, 3), stride=(1, 2), bias=False), lambda: r(B, 2, 3, 4))
    add("convT3d", lambda: nn.ConvTranspose3d(2, 2, 2, stride=2, padding=1), lambda: r(B, 2, 3, 3, 2))
    # BatchNorm in eval mode
    add("batchnorm1d-flat", lambda: _randomize_stats(nn.BatchNorm1d(4)), lambda: r(B, 4))
    add("batchnorm1d-seq", lambda: _randomize_stats(nn.BatchNorm1d(4)), lambda: r(B, 4, 5))
    add("batchnorm2d", lambda: _randomize_stats(nn.BatchNorm2d(3)), lambda: r(B, 3, 4, 4))
    add("batchnorm3d", lambda: _randomize_stats(nn.BatchNorm3d(2)), lambda: r(B, 2, 3, 3, 3))
    # LayerNorm / GroupNorm / InstanceNorm / RMSNorm
    add("layernorm", lambda: _randomize_stats(nn.LayerNorm(5)), lambda: r(B, 4, 5))
    add("layernorm-2d-shape", lambda: _randomize_stats(nn.LayerNorm((3, 5))), lambda: r(B, 2, 3, 5))
    add("layernorm-no-bias", lambda: _randomize_stats(nn.LayerNorm(5, bias=False)), lambda: r(B, 4, 5))
    add("groupnorm", lambda: _randomize_stats(nn.GroupNorm(2, 4)), lambda: r(B, 4, 3, 3))
    add("groupnorm-flat", lambda: _randomize_stats(nn.GroupNorm(2, 4)), lambda: r(B, 4))
    add("instancenorm1d-affine", lambda: _randomize_stats(nn.InstanceNorm1d(3, affine=True)), lambda: r(B, 3, 6))
    add("instancenorm2d-running", lambda: _randomize_stats(nn.InstanceNorm2d(3, affine=True, track_running_stats=True)), lambda: r(B, 3, 4, 4))
    add("instancenorm3d-affine", lambda: _randomize_stats(nn.InstanceNorm3d(2, affine=True)), lambda: r(B, 2, 3, 3, 3))
    if hasattr(nn, "RMSNorm"):
        add("rmsnorm", lambda: _randomize_stats(nn.RMSNorm(5)), lambda: r(B, 4, 5))
        add("rmsnorm-2d-shape-eps", lambda: _randomize_stats(nn.RMSNorm((3, 5), eps=1e-3)), lambda: r(B, 3, 5))
    # Embedding / PReLU
    add("embedding", lambda: nn.Embedding(7, 3), lambda: ids(B, 5))
    add("embedding-padding-idx", lambda: nn.Embedding(7, 3, padding_idx=2), lambda: torch.tensor([[2, 1, 2, 5], [0, 2, 3, 3], [6, 6, 2, 1]]))
    add("embedding-scale-by-freq", lambda: nn.Embedding(7, 3, scale_grad_by_freq=True), lambda: torch.tensor([[1, 1, 2, 5], [0, 4, 4, 4], [6, 3, 2, 1]]), "fallback")
    add("prelu-1", lambda: nn.PReLU(), lambda: r(B, 3, 4))
    add("prelu-C", lambda: nn.PReLU(3, init=0.1), lambda: r(B, 3, 2, 2))
    # The fallback: bare parameters, maths-changing subclasses, sharing, tying
    add("cls-pos-embed", lambda: ClsPosEmbed(), lambda: r(B, 3, 5), "mixed")
    add("layer-scale", lambda: LayerScale(), lambda: r(B, 2, 4), "fallback")
    add("relpos-table", lambda: RelPosBias(), lambda: r(B, 2, 3, 3), "fallback")
    add("ws-conv-subclass", lambda: WSConv2d(2, 3, 3, padding=1), lambda: r(B, 2, 4, 4), "fallback")
    add("called-twice", lambda: CalledTwice(), lambda: r(B, 4))
    add("tied-weights", lambda: Tied(), lambda: r(B, 4))
    add("partly-frozen", lambda: PartlyFrozen(), lambda: r(B, 4))
    # Parameters used outside their module's forward, or on tensors whose first dimension
    # is not the batch: an enclosing module that takes the batch first hosts them.
    add("multihead-attention", lambda: AttentionBlock(), lambda: r(B, 5, 4))
    add("multihead-attention-subclass", lambda: AttentionBlock(SubclassedAttention), lambda: r(B, 5, 4), "fallback")
    add("head-used-by-parent", lambda: HeadUsedByParent(), lambda: r(B, 4), "mixed")
    add("tied-embedding-head", lambda: TiedEmbeddingHead(), lambda: ids(B, 5), "mixed")
    # the MLP runs on a table shared by all samples: its rows say the model handles it
    add("shared-bias-mlp", lambda: SharedBiasMlp(), lambda: r(B, 2, 3, 3), "fallback")
    add("windows-in-batch", lambda: WindowsInBatch(), lambda: r(B, 4, 4), "mixed")
    # its Linear layers see [T, B, C] (the model hosts them); its attention knows where the batch is
    add("sequence-first-transformer", lambda: SequenceFirstTransformer(), lambda: r(B, 5, 4), "mixed")
    add("weight-norm-parametrization", _weight_norm_linear, lambda: r(B, 4), "fallback")
    return c


def _weights(out_shape, d):
    """Fixed random weights over the output positions, d rows."""
    return torch.randn(d, *out_shape, dtype=torch.float64)


@pytest.mark.parametrize("make_model, make_inputs, status", _cases())
def test_rule_matches_torch_func(make_model, make_inputs, status):
    model = make_model().double().eval()
    x = make_inputs()
    x = x.double() if x.is_floating_point() else x
    with torch.no_grad():
        out_shape = model(x).shape[1:]
    w = _weights(out_shape, 2)

    def one(outputs, targets=None):
        return (outputs * w[0]).reshape(outputs.shape[0], -1).sum(1)

    def two(outputs, targets=None):
        return torch.einsum("b...,d...->bd", outputs, w)

    ref1 = func_per_sample_grads(model, x, lambda z, t: (z * w[0]).sum())
    ref2 = func_per_sample_grads(model, x, lambda z, t: torch.einsum("...,d...->d", z, w))

    with nnsim_hooks.attach(model, output=one) as h:
        got1 = h.per_sample_gradients(x)
        sim1 = h.similarity(x)
        statuses = {r.status.split(" ")[0] for r in h.coverage.rows if not r.status.startswith("excluded")}
    jac = flatten_grads(ref2, d=2)
    invertible = jac.shape[2] >= 2 * 2  # K(x,x) is 2x2: needs enough parameters to be invertible
    with nnsim_hooks.attach(model, output=two) as h:
        got2 = h.per_sample_gradients(x)
        sim2 = h.similarity(x) if invertible else None

    expected = {"fast"} if status == "fast" else {"fallback"} if status == "fallback" else {"fast", "fallback"}
    assert statuses == expected
    assert_grads_close(got1, ref1, rtol=1e-9, atol=1e-10)
    assert_grads_close(got2, ref2, rtol=1e-9, atol=1e-10)
    flat1 = flatten_grads(ref1)
    torch.testing.assert_close(sim1, brute_cosine(flat1, flat1), rtol=1e-9, atol=1e-10)
    if invertible:
        torch.testing.assert_close(sim2, brute_matrix_kernel(jac, jac), rtol=1e-7, atol=1e-8)


class SwitchingHead(nn.Module):
    """Calls its head normally or reads the head's weights itself, depending on a flag."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)
        self.direct = False

    def forward(self, x):
        h = torch.tanh(self.body(x))
        return F.linear(h, self.head.weight, self.head.bias) if self.direct else self.head(h)


def test_parameter_uses_are_checked_again_when_the_forward_changes():
    """A clean first pass must not hide a later forward that uses parameters elsewhere."""
    model = SwitchingHead().double().eval()
    x = torch.randn(3, 4, dtype=torch.float64)
    with nnsim_hooks.attach(model, output="sum") as h:
        h.per_sample_gradients(x)  # clean: head runs itself
        h.per_sample_gradients(x)  # same forward again
        model.direct = True
        got = h.per_sample_gradients(x)
        root = {r.module: r for r in h.coverage.rows}[""]
        assert root.status == "fallback" and "head.weight" in root.note
    ref = func_per_sample_grads(model, x, lambda z, t: z.sum())
    assert_grads_close(got, ref, rtol=1e-9, atol=1e-10)
