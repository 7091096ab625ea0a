"""The nn.MultiheadAttention rule against a per-sample loop, in float64.

Every configuration the rule handles (both layouts, cross attention, kdim/vdim, biases
on or off, bias_k/bias_v, the zero column, bool and float masks, causal calls, the
attention weights as an output) must give the loop's per-sample gradients for one and
for two differentiated outputs, the brute-force cosine through its Gram path, and, through
its factored sketch path, the sketch of the loop's gradients.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

import nnsim_hooks
from core_oracles import assert_grads_close, brute_cosine, flatten_grads
from nnsim_hooks.errors import ModelError
from nnsim_hooks.oracle import per_sample_loop

B, L, S, E, H = 4, 5, 3, 8, 2


class Block(nn.Module):
    """An nn.MultiheadAttention between two small layers, configured by ``call``:

    ``inputs``: "self" (query = key = value), "memory" (key = value from the first S
    tokens), "three" (query, key and value all different); ``masks``: which masks to pass,
    all derived from the input so that each sample keeps its own."""

    def __init__(self, inputs="self", masks=(), need_weights=False, average=True, is_causal=False, **mha):
        super().__init__()
        self.inputs, self.masks, self.need_weights, self.average, self.is_causal = (
            inputs, masks, need_weights, average, is_causal
        )
        self.embed = nn.Linear(E, E)
        self.key_net = nn.Linear(E, mha.get("kdim") or E)
        self.value_net = nn.Linear(E, mha.get("vdim") or E)
        self.pad_net = nn.Linear(E, 1)
        self.attn = nn.MultiheadAttention(E, H, **mha)
        self.head = nn.Linear(E, 3)

    def forward(self, x):  # [B, L, E]
        q = torch.tanh(self.embed(x))
        if self.inputs == "self" and self.key_net.out_features == E and self.value_net.out_features == E:
            k = v = q
        elif self.inputs == "memory" and self.key_net.out_features == self.value_net.out_features:
            k = v = self.key_net(x[:, :S])
        else:
            k, v = self.key_net(x[:, :S]), self.value_net(x[:, :S])
        src = k.shape[1]
        kwargs = {"need_weights": self.need_weights, "average_attn_weights": self.average}
        if "padding-bool" in self.masks:
            pad = x[:, :src, 0] > 0.5
            pad[:, 0] = False  # never mask every key of a sample
            kwargs["key_padding_mask"] = pad
        if "padding-float" in self.masks:  # depends on parameters: its own gradient flows
            kwargs["key_padding_mask"] = self.pad_net(x[:, :src]).squeeze(-1)
        if "causal" in self.masks:
            kwargs["attn_mask"] = torch.ones(L, src, dtype=torch.bool).triu(1)
            kwargs["is_causal"] = self.is_causal
        if "per-head" in self.masks:
            scores = x[:, :, :2] @ x[:, :src, :2].transpose(1, 2)  # [B, L, src]
            kwargs["attn_mask"] = torch.stack([scores, -scores], 1).reshape(B * H if x.shape[0] == B else -1, L, src)
        if not self.attn.batch_first:
            same = q is k and k is v
            q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
            if same:  # keep self-attention one tensor, as nn.TransformerEncoderLayer does
                k = v = q
        out, weights = self.attn(q, k, v, **kwargs)
        if not self.attn.batch_first:
            out = out.transpose(0, 1)
        y = self.head(torch.tanh(out)).flatten(1)
        if weights is not None:
            y = torch.cat([y, weights.flatten(1)], 1)
        return y


CASES = {
    "self": dict(batch_first=True),
    "self-sequence-first": dict(batch_first=False),
    "memory": dict(inputs="memory", batch_first=True),
    "three-inputs-sequence-first": dict(inputs="three", batch_first=False),
    "weights-averaged": dict(need_weights=True, batch_first=True),
    "weights-per-head-bias-kv-zero-attn": dict(
        need_weights=True, average=False, add_bias_kv=True, add_zero_attn=True, batch_first=True
    ),
    "bool-masks": dict(masks=("padding-bool", "causal"), inputs="memory", batch_first=True),
    "float-masks": dict(masks=("padding-float", "per-head"), inputs="memory", batch_first=False),
    "is-causal": dict(masks=("causal",), is_causal=True, batch_first=True),
    "no-bias": dict(bias=False, batch_first=True),
    "kdim-vdim-bias-kv": dict(kdim=6, vdim=5, add_bias_kv=True, batch_first=False),
}


def _model(config):
    torch.manual_seed(0)
    model = Block(**config).double().eval()
    for p in model.attn.parameters():  # bias_k/bias_v and in_proj_bias start at zero
        p.data.normal_(0, 0.5)
    return model


@pytest.mark.parametrize("config", CASES.values(), ids=CASES.keys())
def test_attention_rule_matches_a_per_sample_loop(config):
    model = _model(config)
    x = torch.randn(B, L, E, dtype=torch.float64)
    with torch.no_grad():
        width = model(x).shape[1]
    w = torch.randn(2, width, dtype=torch.float64)

    def one(outputs, targets=None):
        return outputs @ w[0]

    def two(outputs, targets=None):
        return outputs @ w.T

    ref1 = per_sample_loop(model, x, output=one)
    ref2 = per_sample_loop(model, x, output=two)
    with nnsim_hooks.attach(model, output=one, exact_limit=0, stage1_dim=512, sketch_dim=64) as h:
        got1 = h.per_sample_gradients(x)
        sim1 = h.similarity(x)
        features = h.features(x)
        rows = {r.module: r for r in h.coverage.rows}
        sketcher = h.sketcher
    with nnsim_hooks.attach(model, output=two) as h:
        got2 = h.per_sample_gradients(x)
    assert rows["attn"].rule == "attention" and rows["attn"].status == "fast"
    assert rows["attn.out_proj"].status == "fast" and "handled by 'attn'" in rows["attn.out_proj"].note
    assert_grads_close(got1, ref1, rtol=1e-9, atol=1e-10)
    assert_grads_close(got2, ref2, rtol=1e-9, atol=1e-10)
    flat = flatten_grads(ref1)
    torch.testing.assert_close(sim1, brute_cosine(flat, flat), rtol=1e-9, atol=1e-10)
    # The factored sketch path against the same sketch applied to materialised gradients.
    parts = {n: sketcher.params[n].to(x.device, x.dtype).project_gradients(g.unsqueeze(1)) for n, g in ref1.items()}
    expected = sketcher.combine(parts, B, 1, x.device, x.dtype)[:, 0]
    expected = expected / expected.norm(dim=1, keepdim=True)
    torch.testing.assert_close(features.double(), expected, rtol=1e-5, atol=1e-6)


def test_sequence_first_with_as_many_tokens_as_samples_is_still_right():
    """[T, B, E] with T == B cannot be told from batch-first by shapes: the layout check
    finds it and the enclosing module takes the attention on the generic rule."""
    model = _model(dict(batch_first=False))
    x = torch.randn(L, L, E, dtype=torch.float64)
    ref = per_sample_loop(model, x, output="sum")
    with nnsim_hooks.attach(model, output="sum") as h:
        got = h.per_sample_gradients(x)
    assert_grads_close(got, ref, rtol=1e-9, atol=1e-10)


def test_frozen_projection_is_left_out():
    model = _model(dict(batch_first=True))
    model.attn.in_proj_weight.requires_grad_(False)
    model.attn.out_proj.bias.requires_grad_(False)
    x = torch.randn(B, L, E, dtype=torch.float64)
    ref = per_sample_loop(model, x, output="sum")
    with nnsim_hooks.attach(model, output="sum") as h:
        got = h.per_sample_gradients(x)
    assert "attn.in_proj_weight" not in got and "attn.out_proj.bias" not in got
    assert_grads_close(got, ref, rtol=1e-9, atol=1e-10)


def test_attention_written_by_hand_stays_on_the_generic_rule():
    """A subclass may change the maths: it is matched by exact type, never isinstance."""

    class Scaled(nn.MultiheadAttention):
        def forward(self, query, key, value, **kwargs):
            out, w = super().forward(query * 2.0, key, value, **kwargs)
            return out, w

    model = _model(dict(batch_first=True))
    model.attn = Scaled(E, H, batch_first=True).double()
    x = torch.randn(B, L, E, dtype=torch.float64)
    ref = per_sample_loop(model, x, output="sum")
    with nnsim_hooks.attach(model, output="sum") as h:
        got = h.per_sample_gradients(x)
        rows = {r.module: r for r in h.coverage.rows}
    assert rows["attn"].status == "fallback"
    assert_grads_close(got, ref, rtol=1e-9, atol=1e-10)


def test_dropout_in_training_mode_is_refused():
    model = _model(dict(batch_first=True, dropout=0.1)).train()
    with nnsim_hooks.attach(model, output="sum") as h:
        with pytest.raises(ModelError, match=r"'attn'.*dropout=0.1.*model.eval\(\)"):
            h.per_sample_gradients(torch.randn(B, L, E, dtype=torch.float64))


# Packed self-attention reads the two matrix products from the call's autograd graph;
# everything else recomputes the attention. Both must give the loop's numbers (above);
# here: which path each configuration takes, and the exact density through each.
TAPPED = {"self", "self-sequence-first", "weights-averaged", "is-causal", "no-bias"}


@pytest.mark.parametrize("case", sorted(CASES))
def test_packed_self_attention_is_not_recomputed(case, monkeypatch):
    import nnsim_hooks.rules.attention as attention

    calls = []
    real = attention._forward
    monkeypatch.setattr(attention, "_forward", lambda *a: calls.append(1) or real(*a))
    model = _model(CASES[case])
    x = torch.randn(B, L, E, dtype=torch.float64)
    ref = per_sample_loop(model, x, output="sum")
    with nnsim_hooks.attach(model, output="sum", exact_limit=0, stage1_dim=512, sketch_dim=64) as h:
        got = h.per_sample_gradients(x)
        h.features(x)
    assert_grads_close(got, ref, rtol=1e-9, atol=1e-10)
    assert (not calls) == (case in TAPPED), f"{case}: recomputed {len(calls)} times"


@pytest.mark.parametrize("case", ["self", "weights-per-head-bias-kv-zero-attn"])
@pytest.mark.parametrize("output", ["sum", "two"])
def test_exact_density_through_the_attention_rule(case, output):
    """The factored weighted sums and products (both paths) against brute force."""
    model = _model(CASES[case])
    x = torch.randn(7, L, E, dtype=torch.float64)
    with torch.no_grad():
        width = model(x).shape[1]
    w = torch.randn(2, width, dtype=torch.float64)
    out = (lambda o, t=None: o @ w[0]) if output == "sum" else (lambda o, t=None: o @ w.T)
    ref_grads = per_sample_loop(model, x, output=out)
    d = 1 if output == "sum" else 2
    flat = torch.cat([g.reshape(7, d, -1) for g in ref_grads.values()], 2)  # [N, d, P]
    if d == 1:
        unit = flat[:, 0] / flat[:, 0].norm(dim=1, keepdim=True)
        ref = (unit @ unit.T).sum(1)
    else:  # PAPER: Tr(K_C)/d with per-sample whitening J_i -> (J_i J_i^T)^(-1/2) J_i
        gram = flat @ flat.transpose(1, 2)
        evals, evecs = torch.linalg.eigh(gram)
        white = evecs @ torch.diag_embed(evals.rsqrt()) @ evecs.transpose(1, 2) @ flat
        ref = torch.einsum("imp,jmp->ij", white, white).sum(1) / d
    with nnsim_hooks.attach(model, output=out, batch_size=3) as h:
        got = h.density(x, progress=False)
    np.testing.assert_allclose(got, ref.numpy(), rtol=1e-6, atol=1e-9)
