"""Handle.pair_similarity (PAPER section 4) against double back-propagation through a per-pair loop.

The oracle differentiates each input alone (``autograd.grad(f(x), params, create_graph=True)``),
forms the cosine (or Tr(K_C)/d with an eigh-based inverse square root) and back-propagates
``sum_i w_i k_i`` with random w. Values must agree to 1e-8, parameter gradients to 1e-6
(relative to each parameter's largest gradient), in float64, with the models in train().
"""


import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import nnsim_hooks
from nnsim_hooks.errors import BatchCouplingError, InputError
from nnsim_hooks.engine.outputs import make_output_spec
from nnsim_hooks.training import batchnorm_running_stats

DT = torch.float64


def _inv_sqrt(k):
    vals, vecs = torch.linalg.eigh(k)
    return vecs @ torch.diag(vals.rsqrt()) @ vecs.T


def _jacobian(model, x, t, spec, params):
    out = model(x)
    values = spec.resolve(out)(out, t, 1).reshape(-1)
    rows = []
    for j in range(values.shape[0]):
        grads = torch.autograd.grad(values[j], params, create_graph=True, allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, grads)]))
    return torch.stack(rows)  # [d, p]


def oracle_pairs(model, a, b, output="auto", targets=None, params=None):
    """k per pair by a loop over pairs, one sample at a time, with a graph."""
    spec = make_output_spec(output)
    params = params or [p for p in model.parameters() if p.requires_grad]
    ks = []
    for i in range(len(a)):
        t = None if targets is None else targets[i : i + 1]
        ja = _jacobian(model, a[i : i + 1], t, spec, params)
        jb = _jacobian(model, b[i : i + 1], t, spec, params)
        if ja.shape[0] == 1:
            ks.append(ja[0] @ jb[0] / (ja[0].norm() * jb[0].norm()))
        else:
            ks.append(torch.trace(_inv_sqrt(ja @ ja.T) @ (ja @ jb.T) @ _inv_sqrt(jb @ jb.T)) / ja.shape[0])
    return torch.stack(ks)


def _param_grads(k, params, w):
    grads = torch.autograd.grad((w * k).sum(), params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def assert_matches_oracle(model, a, b, output="auto", targets=None, handle_kwargs=None, reference=None):
    params = [p for p in model.parameters() if p.requires_grad]
    w = torch.rand(len(a), generator=torch.Generator().manual_seed(1), dtype=DT) + 0.5
    ref_k = (reference or oracle_pairs)(model, a, b, output, targets)
    ref = _param_grads(ref_k, params, w)
    with nnsim_hooks.attach(model, output=output, **(handle_kwargs or {})) as h:
        for _ in range(2):  # a second call on the same handle must give the same numbers
            k = h.pair_similarity(a, b, targets_a=targets, targets_b=targets)
            got = _param_grads(k, params, w)
            torch.testing.assert_close(k, ref_k, rtol=0, atol=1e-8)
            names = [n for n, p in model.named_parameters() if p.requires_grad]
            for name, g, r in zip(names, got, ref):
                scale = max(float(r.abs().max()), 1e-12)
                err = float((g - r).abs().max()) / scale
                assert err < 1e-6, f"{name}: relative gradient error {err:.2e}"
    return k


def mlp(dropout=0.0):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(5, 16), nn.Tanh(), nn.Dropout(dropout), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4)
    ).to(DT).train()


def cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(inplace=True),
        nn.Conv2d(4, 6, 3, groups=2), nn.Tanh(), nn.Conv2d(6, 6, 3), nn.Tanh(), nn.Flatten(), nn.Linear(6 * 16, 5),
    ).to(DT).train()


def _data(*shape, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g, dtype=DT), torch.randn(n, *shape, generator=g, dtype=DT)


@pytest.mark.parametrize("output", ["contrast", "full"])
def test_mlp_matches_oracle(output):
    a, b = _data(5)
    assert_matches_oracle(mlp(), a, b, output)


def test_mlp_contrast_with_label_targets():
    a, b = _data(5)
    assert_matches_oracle(mlp(), a, b, "contrast", targets=torch.tensor([0, 3, 1, 1]))


@pytest.mark.parametrize("output", ["contrast", "full"])
def test_cnn_with_groupnorm_matches_oracle(output):
    a, b = _data(1, 8, 8, n=3 if output == "contrast" else 2)
    assert_matches_oracle(cnn(), a, b, output)


class GenericLayerNorm(nn.LayerNorm):
    """Not an exact nn.LayerNorm: no rule, so the torch.func path takes it."""


class Scale(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.w = nn.Parameter(torch.linspace(0.5, 1.5, n))

    def forward(self, x):
        return x * self.w


def test_torch_func_path_matches_oracle_with_layer_norm():
    # PyTorch's fused layer_norm gives wrong outer gradients through vmap(vjp); the
    # composed form the term uses there must match the loop.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), GenericLayerNorm(16), Scale(16), nn.Tanh(),
                          nn.Linear(16, 3)).to(DT).train()
    a, b = _data(5)
    assert_matches_oracle(model, a, b, "contrast")
    assert_matches_oracle(model, a, b, "full")


class TiedHead(nn.Module):
    """A Linear whose weight is also used outside its call: the parameter-use recorder must catch it."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 4)
        self.mid = nn.Linear(4, 4)

    def forward(self, x):
        h = torch.tanh(self.mid(torch.tanh(self.inp(x))))
        return F.linear(h, self.mid.weight)  # a stray use of mid.weight


def test_parameter_used_outside_its_module_is_counted():
    torch.manual_seed(0)
    model = TiedHead().to(DT).train()
    a, b = _data(4)
    assert_matches_oracle(model, a, b, "contrast")


class NoVmapScale(Scale):
    """A truth value taken from a tensor (vmap cannot): the generic rule's per-sample loop."""

    def forward(self, x):
        out = x * self.w
        if bool((x.abs() > 1e6).any()):  # never, for these inputs
            out = out * 0
        return out


def test_torch_func_loop_keeps_the_graph():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), NoVmapScale(6), nn.Tanh(), nn.Linear(6, 3)).to(DT).train()
    a, b = _data(5)
    assert_matches_oracle(model, a, b, "contrast")
    assert_matches_oracle(model, a, b, "full")
    with nnsim_hooks.attach(model) as h:
        h.pair_similarity(a, b)
        assert h.engine.fallback_methods == {"2": "loop"}


def _vit():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return timm.create_model("test_vit", pretrained=False, img_size=32, depth=1, num_classes=3).to(DT).train()


def _math_oracle(model, a, b, output, targets):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):  # the oracle needs a double backward too
        return oracle_pairs(model, a, b, output, targets)


@pytest.mark.parametrize("timm_rules", [True, False], ids=["timm-rules", "torch-func-layernorm"])
def test_timm_vit_matches_oracle(timm_rules, monkeypatch):
    model = _vit()
    from nnsim_hooks.rules.norm import LayerNormRule
    from nnsim_hooks.rules.registry import RULES
    import timm.layers.norm

    if timm_rules:  # what nnsim_hooks.integrations.timm_rules registers for it
        monkeypatch.setitem(RULES, timm.layers.norm.LayerNorm, LayerNormRule())
    else:
        monkeypatch.delitem(RULES, timm.layers.norm.LayerNorm, raising=False)
    a, b = _data(3, 32, 32, n=2)
    assert_matches_oracle(model, a, b, "contrast", reference=_math_oracle)


class MHANet(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(3, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.embed(x)
        h, _ = self.attn(h, h, h, need_weights=False)
        return self.head(h.mean(1))


def test_multihead_attention_matches_oracle():
    torch.manual_seed(0)
    model = MHANet().to(DT).train()
    a, b = _data(5, 3, n=2)
    assert_matches_oracle(model, a, b, "contrast", reference=_math_oracle)


def test_dropout_uses_one_forward_of_the_2p_inputs():
    model = mlp(dropout=0.4)
    a, b = _data(5, n=3)
    params = list(model.parameters())
    with nnsim_hooks.attach(model, output="contrast") as h:
        torch.manual_seed(123)
        k = h.pair_similarity(a, b)
        # The documented behaviour: the masks of model(cat([a, b])) drawn with the same seed.
        torch.manual_seed(123)
        values = make_output_spec("contrast")(model(torch.cat([a, b])), None, 6)
        grads = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(values[i], params, create_graph=True)])
                 for i in range(6)]
        ref = torch.stack([grads[i] @ grads[3 + i] / (grads[i].norm() * grads[3 + i].norm()) for i in range(3)])
        torch.testing.assert_close(k, ref, rtol=0, atol=1e-10)
        w = torch.rand(3, dtype=DT)
        for g, r in zip(_param_grads(k, params, w), _param_grads(ref, params, w)):
            torch.testing.assert_close(g, r, rtol=1e-8, atol=1e-10)
        model.eval()
        k_eval = h.pair_similarity(a, b)
        model.train()
    assert not torch.allclose(k, k_eval), "dropout was not active in the term"


def test_batchnorm_in_training_mode_is_refused_with_a_way_out():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3)).to(DT).train()
    model(torch.randn(16, 5, dtype=DT))  # some running statistics
    a, b = _data(5, n=3)
    with nnsim_hooks.attach(model) as h:
        with pytest.raises(BatchCouplingError, match="batchnorm_running_stats"):
            h.pair_similarity(a, b)
        with batchnorm_running_stats(model):
            k = h.pair_similarity(a, b)
    assert model[1].training
    model.eval()
    torch.testing.assert_close(k, oracle_pairs(model, a, b, "contrast"), rtol=0, atol=1e-8)


def test_lengths_differ():
    a, b = _data(5)
    with nnsim_hooks.attach(mlp()) as h:
        with pytest.raises(InputError, match=r"len\(a\) = 4 and len\(b\) = 3"):
            h.pair_similarity(a, b[:3])
        with pytest.raises(InputError, match="no pairs"):
            h.pair_similarity(a[:0], b[:0])
        with pytest.raises(InputError, match="targets for both"):
            h.pair_similarity(a, b, targets_a=torch.zeros(4, dtype=torch.long))


def test_zero_gradient_pair_gives_zero_without_nan():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 1, bias=False)).to(DT).train()
    with torch.no_grad():
        model[0].bias.fill_(-100.0)  # every ReLU off for these inputs: zero gradient
    a = torch.randn(2, 5, dtype=DT)
    b = torch.randn(2, 5, dtype=DT)
    a[1] = 0.0
    with torch.no_grad():
        model[0].weight[:, 0] = 200.0  # ... except where x_0 > 0.5
    a[0, 0] = b[0, 0] = b[1, 0] = 1.0
    with nnsim_hooks.attach(model, output="sum") as h:
        with pytest.warns(RuntimeWarning, match=r"pair\(s\) \[1\]"):
            k = h.pair_similarity(a, b)
    assert k[1] == 0 and torch.isfinite(k).all()
    grads = torch.autograd.grad(k.sum(), list(model.parameters()), allow_unused=True)
    assert all(g is None or torch.isfinite(g).all() for g in grads)


def test_no_grad_gives_values_without_graph():
    model = mlp()
    a, b = _data(5)
    with nnsim_hooks.attach(model) as h:
        with torch.no_grad():
            k = h.pair_similarity(a, b)
        k_graph = h.pair_similarity(a, b)
    assert k.grad_fn is None and not k.requires_grad
    assert k_graph.requires_grad
    torch.testing.assert_close(k, k_graph.detach())


def test_training_step_lowers_the_term():
    model = mlp()
    a, b = _data(5, n=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with nnsim_hooks.attach(model) as h:
        with torch.no_grad():
            before = float((1 - h.pair_similarity(a, b)).mean())
        for _ in range(5):
            loss = (1 - h.pair_similarity(a, b)).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            after = float((1 - h.pair_similarity(a, b)).mean())
    assert after < before


def test_torchvision_vit_matches_oracle():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(
        image_size=16, patch_size=8, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=3
    ).to(DT).train()
    nn.init.normal_(model.heads.head.weight, std=0.1)  # torchvision zeroes the head
    a, b = _data(3, 16, 16, n=2)
    assert_matches_oracle(model, a, b, "contrast", reference=_math_oracle)


@pytest.mark.parametrize("d", [1, 3])
def test_pair_kernels_of_a_factored_layer_both_ways(d):
    """The ghost products and the per-sample weight gradients give each pair's [2d, 2d]
    kernel matrix as an explicit loop over the pairs' gradients does."""
    from nnsim_hooks.training.pair_term import _gram_of_grads, _ghost_gram

    g = torch.Generator().manual_seed(0)
    p, c, r, length = 3, 4, 5, 6
    cols = torch.randn(2 * p, c, length, generator=g, dtype=DT)
    rows = torch.randn(d, 2 * p, r, length, generator=g, dtype=DT)
    weights = torch.einsum("jbru,bcu->bjrc", rows, cols)  # [2P, d, r, c]
    for i in range(p):
        both = torch.cat([weights[i].reshape(d, -1), weights[p + i].reshape(d, -1)])  # [2d, r*c]
        expected = both @ both.T
        torch.testing.assert_close(_ghost_gram(cols, rows, p)[i], expected, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(_gram_of_grads([weights], p)[i], expected, rtol=1e-10, atol=1e-10)


def _count_captured_passes(monkeypatch):
    from nnsim_hooks.engine.engine import Engine

    passes = []
    original = Engine.backprop
    monkeypatch.setattr(Engine, "backprop", lambda self, *a, **k: passes.append(1) or original(self, *a, **k))
    return passes


@pytest.mark.parametrize("output", ["contrast", "full"])
def test_single_pair_runs_one_input_at_a_time_and_matches_oracle(output, monkeypatch):
    passes = _count_captured_passes(monkeypatch)
    a, b = _data(5, n=1)
    assert_matches_oracle(mlp(), a, b, output, targets=torch.tensor([2]) if output == "contrast" else None)
    assert_matches_oracle(cnn(), *_data(1, 8, 8, n=1), output)
    assert passes == []  # no captured pass: the per-input double back-propagation


def test_single_pair_with_active_dropout_keeps_one_forward_of_both(monkeypatch):
    passes = _count_captured_passes(monkeypatch)
    model = mlp(dropout=0.4)
    a, b = _data(5, n=1)
    with nnsim_hooks.attach(model, output="contrast") as h:
        h.pair_similarity(a, b)
        assert len(passes) == 1
        model.eval()
        h.pair_similarity(a, b)
        assert len(passes) == 1  # dropout off: the per-input path


def test_single_pair_vit_matches_oracle(monkeypatch):
    from nnsim_hooks.rules.norm import LayerNormRule
    from nnsim_hooks.rules.registry import RULES

    model = _vit()
    import timm.layers.norm

    monkeypatch.setitem(RULES, timm.layers.norm.LayerNorm, LayerNormRule())
    a, b = _data(3, 32, 32, n=1)
    assert_matches_oracle(model, a, b, "contrast", reference=_math_oracle)
