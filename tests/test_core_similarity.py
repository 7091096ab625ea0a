"""``similarity(exact=True)`` against brute force over all pairs of flattened torch.func
gradients: the cosine for one output, ``Tr(K(x,x)^-1/2 K(x,x') K(x',x')^-1/2)/d`` for d;
``b=None`` and ``b``, one pass and several (more samples than ``batch_size``), the ghost and
the materialised Gram paths of the factored layers."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import nnsim_hooks
from nnsim_hooks.rules import factored
from core_oracles import (
    REFERENCE_OUTPUTS,
    brute_cosine,
    brute_matrix_kernel,
    flatten_grads,
    func_per_sample_grads,
)


def small_net(classes=3):
    """Conv (dense Gram path: many positions), grouped conv, Linear (ghost path: no tokens)."""
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, stride=2, groups=2),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(4 * 3 * 3, 6),
        nn.ReLU(),
        nn.Linear(6, classes),
    ).double().eval()


@pytest.fixture
def net_and_data():
    model = small_net()
    a = torch.randn(7, 3, 7, 7, dtype=torch.float64)
    b = torch.randn(5, 3, 7, 7, dtype=torch.float64)
    return model, a, b


@pytest.mark.parametrize("batch_size", [64, 6], ids=["one-pass", "multi-pass"])
def test_cosine_against_brute_force(net_and_data, batch_size):
    model, a, b = net_and_data
    ref = lambda x: flatten_grads(func_per_sample_grads(model, x, REFERENCE_OUTPUTS["contrast"]))  # noqa: E731
    ga, gb = ref(a), ref(b)
    with nnsim_hooks.attach(model, output="contrast", batch_size=batch_size) as h:
        self_sim = h.similarity(a)
        cross = h.similarity(a, b)
    assert self_sim.dtype == torch.float64 and self_sim.shape == (7, 7) and cross.shape == (7, 5)
    torch.testing.assert_close(self_sim, brute_cosine(ga, ga), rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(cross, brute_cosine(ga, gb), rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(torch.diagonal(self_sim), torch.ones(7, dtype=torch.float64))


def test_model_similarity_takes_both_gram_paths(net_and_data, monkeypatch):
    """small_net's first conv (49 positions) is materialised, its Linear layers (one position)
    use ghost inner products; the grouped conv materialises per group. All agree with brute force."""
    from nnsim_hooks.rules import base  # the rules' Gram comes from their factors there

    taken = []
    real = factored.factored_gram
    real_bmm = torch.bmm
    state = {"bmm": 0}

    def counting_bmm(*args, **kwargs):
        state["bmm"] += 1
        return real_bmm(*args, **kwargs)

    def spy(cols, rows, weight, bias):
        before = state["bmm"]
        out = real(cols, rows, weight, bias)
        taken.append("materialised" if state["bmm"] > before else "ghost")
        return out

    monkeypatch.setattr(factored.torch, "bmm", counting_bmm)
    monkeypatch.setattr(base, "factored_gram", spy)
    model, a, _ = net_and_data
    with nnsim_hooks.attach(model, output="contrast") as h:
        got = h.similarity(a)
    assert taken == ["materialised", "ghost", "ghost"]  # conv 0, linear 5, linear 7 (conv 2 is grouped)
    flat = flatten_grads(func_per_sample_grads(model, a, REFERENCE_OUTPUTS["contrast"]))
    torch.testing.assert_close(got, brute_cosine(flat, flat), rtol=1e-9, atol=1e-10)


def test_cosine_with_targets_for_both_sets(net_and_data):
    model, a, b = net_and_data
    ya, yb = torch.randint(0, 3, (7,)), torch.randint(0, 3, (5,))
    ga = flatten_grads(func_per_sample_grads(model, a, REFERENCE_OUTPUTS["loss"], ya))
    gb = flatten_grads(func_per_sample_grads(model, b, REFERENCE_OUTPUTS["loss"], yb))
    with nnsim_hooks.attach(model, output="loss") as h:
        cross = h.similarity(a, b, targets_a=ya, targets_b=yb)
    torch.testing.assert_close(cross, brute_cosine(ga, gb), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("batch_size", [64, 6], ids=["one-pass", "multi-pass"])
def test_matrix_kernel_against_brute_force(net_and_data, batch_size):
    model, a, b = net_and_data
    ja = flatten_grads(func_per_sample_grads(model, a, REFERENCE_OUTPUTS["full"]), d=3)
    jb = flatten_grads(func_per_sample_grads(model, b, REFERENCE_OUTPUTS["full"]), d=3)
    with nnsim_hooks.attach(model, output="full", batch_size=batch_size) as h:
        self_sim = h.similarity(a)
        cross = h.similarity(a, b)
    torch.testing.assert_close(self_sim, brute_matrix_kernel(ja, ja), rtol=1e-8, atol=1e-9)
    torch.testing.assert_close(cross, brute_matrix_kernel(ja, jb), rtol=1e-8, atol=1e-9)
    torch.testing.assert_close(torch.diagonal(self_sim), torch.ones(7, dtype=torch.float64))


def test_matrix_kernel_is_invariant_to_rotating_the_outputs(net_and_data):
    """Tr(K_C) is invariant to an orthogonal change of the output space (the paper, section 1)."""
    model, a, _ = net_and_data
    q, _ = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64))
    with nnsim_hooks.attach(model, output="full") as h:
        plain = h.similarity(a)
    with nnsim_hooks.attach(model, output=lambda out, t: out @ q) as h:
        rotated = h.similarity(a)
    torch.testing.assert_close(plain, rotated, rtol=1e-8, atol=1e-9)


def test_tuple_inputs(net_and_data):
    """A model taking two tensors: a and b are tuples, concatenated member by member."""

    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = small_net()
            self.side = nn.Linear(2, 3).double()

        def forward(self, x, s):
            return self.net(x) + self.side(s)

    model = TwoInputs().eval()
    a = (torch.randn(4, 3, 7, 7, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64))
    b = (torch.randn(3, 3, 7, 7, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64))
    with nnsim_hooks.attach(model, output="sum", batch_size=2) as h:
        got = h.similarity(a, b)
        grads_a = h.per_sample_gradients(a)
    ref_a = {}
    ref_b = {}
    for store, (x, s) in ((ref_a, a), (ref_b, b)):
        for i in range(x.shape[0]):
            model.zero_grad()
            out = model(x[i : i + 1], s[i : i + 1]).sum()
            grads = torch.autograd.grad(out, list(model.parameters()))
            store[i] = torch.cat([g.reshape(-1) for g in grads])
    ga, gb = torch.stack(list(ref_a.values())), torch.stack(list(ref_b.values()))
    torch.testing.assert_close(got, brute_cosine(ga, gb), rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(flatten_grads(grads_a), ga, rtol=1e-9, atol=1e-12)


# -- the two Gram paths of the factored layers -------------------------------------------


def _explicit_gram(cols, rows, bias):
    """Per-sample gradients materialised with einsum, then their Gram matrix."""
    d, batch = rows.shape[:2]
    w = torch.einsum("jbru,bcu->bjrc", rows, cols).reshape(batch * d, -1)
    parts = [w]
    if bias:
        parts.append(rows.sum(-1).transpose(0, 1).reshape(batch * d, -1))
    flat = torch.cat(parts, 1).double()
    return flat @ flat.T


@pytest.mark.parametrize(
    "length, expect_ghost",
    [(1, True), (200, False)],
    ids=["one-position-ghost", "many-positions-materialised"],
)
@pytest.mark.parametrize("d", [1, 2])
def test_factored_gram_paths(monkeypatch, length, expect_ghost, d):
    batch, c, r = 4, 5, 3
    cols = torch.randn(batch, c, length, dtype=torch.float64)
    rows = torch.randn(d, batch, r, length, dtype=torch.float64)
    calls = {"bmm": 0}
    real_bmm = torch.bmm

    def counting_bmm(*args, **kwargs):
        calls["bmm"] += 1
        return real_bmm(*args, **kwargs)

    monkeypatch.setattr(factored.torch, "bmm", counting_bmm)
    got = factored.factored_gram(cols, rows, weight=True, bias=True)
    torch.testing.assert_close(got, _explicit_gram(cols, rows, bias=True), rtol=1e-10, atol=1e-10)
    assert (calls["bmm"] == 0) == expect_ghost, f"expected the {'ghost' if expect_ghost else 'materialised'} path"


def test_factored_gram_materialised_in_row_blocks(monkeypatch):
    """Above MAX_ELEMENTS the materialised path works a block of rows at a time."""
    batch, c, r, length = 3, 4, 7, 50
    cols = torch.randn(batch, c, length, dtype=torch.float64)
    rows = torch.randn(2, batch, r, length, dtype=torch.float64)
    monkeypatch.setattr(factored, "MAX_ELEMENTS", 2 * batch * 2 * c)  # two rows per block
    got = factored.factored_gram(cols, rows, weight=True, bias=False)
    torch.testing.assert_close(got, _explicit_gram(cols, rows, bias=False), rtol=1e-10, atol=1e-10)
