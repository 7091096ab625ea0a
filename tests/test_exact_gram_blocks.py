"""``similarity(exact=True)`` on more samples than ``batch_size``: one pass per batch, the
Gram blocks between batches from kept factors (RAM, then memory-mapped files), against
brute force over torch.func per-sample gradients and against the pair-of-half-batches loop."""

from __future__ import annotations

import logging
import math

import pytest
import torch

import nnsim_hooks
from nnsim_hooks.exact import gram_blocks
from nnsim_hooks.errors import InputError
from core_oracles import REFERENCE_OUTPUTS, brute_cosine, brute_matrix_kernel, flatten_grads, func_per_sample_grads
from test_exact_density import Tokens, cnn


def _count_passes(handle, monkeypatch):
    calls = []
    original = handle.engine.backprop

    def counting(inputs, targets=None):
        calls.append(len(inputs))
        return original(inputs, targets)

    monkeypatch.setattr(handle.engine, "backprop", counting)
    return calls


@pytest.mark.slow
@pytest.mark.parametrize("output", ["contrast", "full"])
def test_one_pass_per_batch_against_brute_force(output, monkeypatch):
    model = cnn()
    a = torch.randn(10, 3, 8, 8, dtype=torch.float64)
    b = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    d = None if output != "full" else 4
    fa = flatten_grads(func_per_sample_grads(model, a, REFERENCE_OUTPUTS[output]), d)
    fb = flatten_grads(func_per_sample_grads(model, b, REFERENCE_OUTPUTS[output]), d)
    brute = brute_cosine if d is None else brute_matrix_kernel
    with nnsim_hooks.attach(model, output=output, batch_size=4) as h:
        h.similarity(a[:4], progress=False)  # the one-off layout checks, before counting
        passes = _count_passes(h, monkeypatch)
        self_sim = h.similarity(a, progress=False)
        assert passes == [4, 4, 2]  # ceil(10 / 4), not the 21 pairs of half-batches
        cross = h.similarity(a, b, progress=False)
    torch.testing.assert_close(self_sim, brute(fa, fa), rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(cross, brute(fa, fb), rtol=1e-9, atol=1e-10)


def test_embedding_tied_weights_and_repeated_calls():
    model = Tokens().double().eval()
    ids = torch.randint(0, 11, (9, 5))
    flat = flatten_grads(func_per_sample_grads(model, ids, REFERENCE_OUTPUTS["contrast"]))
    with nnsim_hooks.attach(model, batch_size=4) as h:
        got = h.similarity(ids, progress=False)
    torch.testing.assert_close(got, brute_cosine(flat, flat), rtol=1e-9, atol=1e-10)


@pytest.mark.slow
def test_spilled_to_disk_past_max_memory_gives_the_same_numbers(monkeypatch, caplog):
    model = cnn()
    x = torch.randn(12, 3, 8, 8, dtype=torch.float64)
    spilled = []
    original = gram_blocks._KeptBlocks._spill
    monkeypatch.setattr(gram_blocks._KeptBlocks, "_spill", lambda self, t: spilled.append(t.shape) or original(self, t))
    with nnsim_hooks.attach(model, batch_size=4) as h:
        in_ram = h.similarity(x, progress=False)
        assert not spilled
        h.engine.backprop(x[:4])
        one_batch = sum(t.nbytes() for t in h.engine.gram_terms(h.engine.backprop(x[:4]), keep=True))
        with caplog.at_level(logging.INFO, logger="nnsim_hooks.exact.gram_blocks"):
            on_disk = h.similarity(x, max_memory=2 * one_batch, progress=False)
        pairs, _ = h._pair_gram(x, None, 12)
    assert spilled, "nothing went to disk"
    assert "on disk" in caplog.text
    torch.testing.assert_close(on_disk, in_ram, rtol=0, atol=1e-12)
    norms = torch.diagonal(pairs).sqrt()
    torch.testing.assert_close(in_ram, pairs / (norms[:, None] * norms[None, :]), rtol=1e-10, atol=1e-12)


@pytest.mark.slow
def test_kept_terms_choose_the_smaller_of_factors_and_gradients():
    """BatchNorm's per-sample gradient (16 numbers) and the first convolution's (224) are
    kept instead of their inputs and output gradients (704 numbers for the convolution);
    the second convolution (1,168 parameters, 768 numbers of factors) and the Linear
    layers keep their factors."""
    model = cnn()
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    with nnsim_hooks.attach(model, batch_size=4) as h:
        terms = {t.key: t for t in h.engine.gram_terms(h.engine.backprop(x), keep=True)}
    assert terms["1#0"].grads is not None and terms["1#0"].grads.shape == (4, 16)
    assert terms["0#0"].grads is not None and terms["0#0"].grads.shape == (4, 224)
    assert terms["3#0"].grads is None and terms["3#0"].activation.shape == (4, 8, 8, 8)
    assert terms["8#0"].grads is None and terms["10#0"].grads is None


def test_max_memory_too_small_or_invalid():
    model = cnn()
    x = torch.randn(9, 3, 8, 8, dtype=torch.float64)
    with nnsim_hooks.attach(model, batch_size=4) as h:
        with pytest.raises(InputError, match=r"max_memory=1000 bytes is too small.*max_memory >= \d+"):
            h.similarity(x, max_memory=1000, progress=False)
        for bad in (-1, 1.5, "1GB", True):
            with pytest.raises(InputError, match="max_memory must be"):
                h.similarity(x, max_memory=bad, progress=False)


@pytest.mark.slow
def test_falls_back_to_pairs_when_batches_are_made_of_other_parts(monkeypatch, caplog):
    model = cnn()
    x = torch.randn(10, 3, 8, 8, dtype=torch.float64)
    with nnsim_hooks.attach(model, batch_size=4) as h:
        ref = h.similarity(x, progress=False)
        original = h.engine.gram_terms
        seen = []

        def renamed(p, keep=False):
            terms = original(p, keep)
            seen.append(1)
            if len(seen) == 2:  # the second batch looks different: its blocks cannot be paired
                terms[0].key += "-other"
            return terms

        monkeypatch.setattr(h.engine, "gram_terms", renamed)
        passes = _count_passes(h, monkeypatch)
        with caplog.at_level(logging.INFO, logger="nnsim_hooks.exact.gram_blocks"):
            got = h.similarity(x, progress=False)
    assert "running pairs of batches" in caplog.text
    assert len(passes) == 2 + gram_blocks.passes_of_pairs(10, 4)
    assert gram_blocks.passes_of_pairs(10, 4) == math.comb(5, 2) + 5
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("case", ["self", "weights-per-head-bias-kv-zero-attn"])
def test_attention_across_batches(case):
    """Packed self-attention keeps its two products' factors (they concatenate across
    batches); a recomputed call keeps per-sample gradients. Both give brute force."""
    from nnsim_hooks.oracle import per_sample_loop
    from test_rules_attention import CASES, E, L, _model

    model = _model(CASES[case])
    x = torch.randn(7, L, E, dtype=torch.float64)
    flat = flatten_grads(per_sample_loop(model, x, output="sum"))
    with nnsim_hooks.attach(model, output="sum", batch_size=3) as h:
        got = h.similarity(x, progress=False)
        terms = {t.key: t for t in h.engine.gram_terms(h.engine.backprop(x[:3]), keep=True)}
    torch.testing.assert_close(got, brute_cosine(flat, flat), rtol=1e-9, atol=1e-10)
    if case == "self":
        assert terms["attn#0/in_proj"].grads is None and terms["attn#0/in_proj"].activation.shape == (3, L, E)
        assert terms["attn#0/out_proj"].backprops.shape == (1, 3, L, E)
    else:
        assert terms["attn#0"].grads is not None
