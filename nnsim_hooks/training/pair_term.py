"""The similarity of pairs of inputs as a differentiable training term (the paper section 4).

:meth:`Handle.pair_similarity` gives, for pairs ``(a_i, b_i)``, the cosine
``k_i = g(a_i).g(b_i) / (|g(a_i)| |g(b_i)|)`` (``Tr(K_C)/d`` for d outputs) as a tensor
that back-propagates into the parameters (double back-propagation), so that
``loss = task + lam * (1 - k).mean()`` trains the model to make the pairs similar.

One pass for all P pairs: the 2P inputs run through the model as one batch on the
engine's captured pass (:mod:`nnsim_hooks.engine.captured_pass`) with ``create_graph``,
so that each hooked module's input ``a`` and output gradient ``delta`` stay in the
graph; parameters used outside their module's hooks are found, and handed to the
generic rule, exactly as for every other query. From what was captured, per pair and
per unit:

- a rule with :meth:`~nnsim_hooks.rules.base.LayerRule.factors` (Linear, ungrouped
  convolutions), for a module called once: the ghost inner products
  ``sum_{u,v} (a_u . a'_v)(delta_u . delta'_v)`` over token / output positions, or the
  per-sample weight gradients ``sum_u delta_u a_u^T`` when they are smaller;
- the other rules that declare ``differentiable`` (norms, embeddings, ...): their
  per-sample gradients;
- everything else (modules on the generic rule, such as a ViT's root holding
  ``cls_token`` and ``pos_embed``; rules that do not keep the graph, such as
  ``nn.MultiheadAttention``'s): the generic rule's torch.func re-run of that module
  alone, per sample under ``vmap``, with the graph kept
  (:func:`~nnsim_hooks.rules.fallback.fallback_grad_sample`).

This module holds only the pair-block maths on top of those per-sample quantities.

What it does with training-mode layers:

- **Dropout**: the 2P inputs go through the model once, in whatever mode the model is
  in, so each input gets one dropout mask, drawn as for ``model(torch.cat([a, b]))``,
  and its gradient is the gradient of that masked network (the one the task loss of
  that forward would see). Modules on the torch.func path are re-run one sample at a
  time with masks of their own (``randomness="different"``).
- **BatchNorm with batch statistics** mixes the samples: per-sample gradients are not
  defined, and a :class:`~nnsim_hooks.errors.BatchCouplingError` says so. Either use
  GroupNorm / LayerNorm, or compute the term with BatchNorm on its running statistics:
  ``with nnsim_hooks.training.batchnorm_running_stats(model): k = h.pair_similarity(a, b)``.
- **Fused attention** (``scaled_dot_product_attention``) has no double backward on
  CPU: the term runs with the math kernel (``sdpa_kernel(SDPBackend.MATH)``).

A pair where one gradient is zero (or, for d outputs, ``K(x, x)`` is singular) has no
cosine: its k is 0, with no gradient through it, and a warning names the pairs.
Under ``torch.no_grad()`` the values are computed without a graph (not differentiable).
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Dict, List, Optional, Tuple

import torch

from ..data import batching
from ..engine.units import drop_skipped, fast_call
from ..errors import InputError, ModelError
from ..exact.kernels import SINGULAR_RTOL
from ..rules.base import trains
from ..rules.fallback import fallback_grad_sample
from ..validation import batch_size_of

Blocks = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # K(a,a), K(b,b), K(a,b): [P, d, d] each


def _math_attention():
    """The math kernel for scaled_dot_product_attention (the fused ones have no double backward)."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - torch < 2.3
        return contextlib.nullcontext()
    return sdpa_kernel(SDPBackend.MATH)


# -- per-layer blocks ------------------------------------------------------------------


def _blocks_of_grads(g: torch.Tensor, p: int) -> Blocks:
    """Blocks from per-sample gradients ``[2P, d, ...]``."""
    flat = g.reshape(g.shape[0], g.shape[1], -1)
    ga, gb = flat[:p], flat[p:]
    return (
        torch.einsum("pjn,pkn->pjk", ga, ga),
        torch.einsum("pjn,pkn->pjk", gb, gb),
        torch.einsum("pjn,pkn->pjk", ga, gb),
    )


def _factored_blocks(cols: torch.Tensor, rows: torch.Tensor, p: int, weight: bool, bias: bool) -> Blocks:
    """Blocks of a layer whose weight gradient is ``sum_u delta_u a_u^T``: ``cols``
    ``[2P, c, L]`` (activations / patches), ``rows`` ``[d, 2P, r, L]`` (output gradients)."""
    d, _, r, length = rows.shape
    c = cols.shape[1]
    out = [torch.zeros(p, d, d, dtype=rows.dtype, device=rows.device) for _ in range(3)]
    pairs = ((slice(0, p), slice(0, p)), (slice(p, None), slice(p, None)), (slice(0, p), slice(p, None)))
    if bias:
        s = rows.sum(-1)  # [d, 2P, r]
        for i, (x, y) in enumerate(pairs):
            out[i] = out[i] + torch.einsum("jpr,kpr->pjk", s[:, x], s[:, y])
    if not weight:
        return tuple(out)
    ghost_cost = 3 * p * length * length * (c + d * d * r)
    dense_cost = 2 * p * d * length * r * c + 3 * p * d * d * r * c
    if ghost_cost <= dense_cost:
        for i, (x, y) in enumerate(pairs):
            aa = torch.einsum("pcu,pcv->puv", cols[x], cols[y])
            dd = torch.einsum("jpru,kprv->pjkuv", rows[:, x], rows[:, y])
            out[i] = out[i] + torch.einsum("puv,pjkuv->pjk", aa, dd)
        return tuple(out)
    g = torch.einsum("jbru,bcu->bjrc", rows, cols)  # per-sample weight gradients
    return tuple(o + b for o, b in zip(out, _blocks_of_grads(g, p)))


# -- the differentiable inverse square root ---------------------------------------------


class _InverseSqrt(torch.autograd.Function):
    """``K^{-1/2}`` of symmetric positive definite ``[P, d, d]``, with the divided-difference
    (Daleckii-Krein) backward, finite also for repeated eigenvalues (unlike eigh's)."""

    @staticmethod
    def forward(ctx, k):
        vals, vecs = torch.linalg.eigh(k)
        f = vals.rsqrt()
        ctx.save_for_backward(vals, vecs, f)
        return vecs @ torch.diag_embed(f) @ vecs.transpose(-1, -2)

    @staticmethod
    def backward(ctx, grad):
        vals, vecs, f = ctx.saved_tensors
        li, lj = vals[..., :, None], vals[..., None, :]
        fi, fj = f[..., :, None], f[..., None, :]
        diff = li - lj
        close = diff.abs() <= 1e-9 * torch.maximum(li.abs(), lj.abs())
        slope = -0.25 * (fi**3 + fj**3)  # f'(l) = -l^{-3/2} / 2, averaged for near-equal pairs
        phi = torch.where(close, slope, (fi - fj) / torch.where(close, torch.ones_like(diff), diff))
        inner = vecs.transpose(-1, -2) @ grad @ vecs
        return vecs @ (phi * inner) @ vecs.transpose(-1, -2)


def _kernel(blocks: Blocks, d: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """k ``[P]`` from the blocks and the mask of undefined pairs (k = 0 there, no gradient)."""
    kaa, kbb, kab = blocks
    if d == 1:
        xa, xb, xy = kaa[:, 0, 0], kbb[:, 0, 0], kab[:, 0, 0]
        undefined = (xa.detach() <= 0) | (xb.detach() <= 0)
        denom = torch.where(undefined, torch.ones_like(xa), xa * xb).sqrt()
        k = torch.where(undefined, torch.zeros_like(xy), xy / denom)
        return k, undefined
    with torch.no_grad():
        undefined = torch.zeros(kaa.shape[0], dtype=torch.bool, device=kaa.device)
        for m in (kaa, kbb):
            vals = torch.linalg.eigvalsh(m)
            top = vals[:, -1]
            undefined |= (vals[:, 0] <= SINGULAR_RTOL * top) | (top <= 0)
    eye = torch.eye(d, dtype=kaa.dtype, device=kaa.device).expand_as(kaa)
    mask = undefined[:, None, None]
    wa = _InverseSqrt.apply(torch.where(mask, eye, kaa))
    wb = _InverseSqrt.apply(torch.where(mask, eye, kbb))
    k = torch.einsum("pij,pjk,pki->p", wa, torch.where(mask, torch.zeros_like(kab), kab), wb) / d
    return k, undefined


# -- the term ---------------------------------------------------------------------------


class PairSimilarity:
    """The computation behind :meth:`Handle.pair_similarity` for one handle."""

    def __init__(self, handle):
        self.handle = handle

    def __call__(self, a, b, targets_a=None, targets_b=None) -> torch.Tensor:
        n_a, n_b = batch_size_of(a), batch_size_of(b)
        if n_a != n_b:
            raise InputError(
                f"pair_similarity compares a[i] with b[i]: a and b need the same length, got len(a) = {n_a} and "
                f"len(b) = {n_b}"
            )
        if n_a == 0:
            raise InputError("pair_similarity got no pairs: a and b are empty")
        if (targets_a is None) != (targets_b is None):
            raise InputError("give targets for both a and b (targets_a=, targets_b=) or for neither")
        try:
            inputs = batching.concat(a, b)
            targets = batching.concat(targets_a, targets_b)
        except (RuntimeError, ValueError) as exc:
            raise InputError(f"a and b must be batches of the same kind of input: {exc}") from exc
        differentiable = torch.is_grad_enabled()
        with torch.enable_grad(), _math_attention():
            k = self._compute(inputs, targets, n_a)
        return k if differentiable else k.detach()

    def _compute(self, inputs, targets, p: int) -> torch.Tensor:
        engine = self.handle.engine
        captured = engine.backprop(inputs, targets, create_graph=True)
        d = captured.d
        plan = engine.passes.plan
        counts = plan.call_counts(captured.calls)
        total: Optional[List[torch.Tensor]] = None
        summed: Dict[str, torch.Tensor] = {}  # per-sample gradients [2P, d, ...] by the model's names
        for target, calls in plan.units(captured.calls):
            call = fast_call(plan, calls)
            if call is None:  # the generic rule, with the graph kept
                grads = engine.unit_grads(target, calls, captured)
            elif target.rule.differentiable:
                rule, module = target.rule, call.module
                activation, backprops = rule.operands(call, d)
                alone = counts[id(module)] == 1 and not call.skip and not (set(target.param_names.values()) & plan.shared)
                factors = rule.factors(module, activation, backprops) if alone else None
                if factors is not None:
                    part = _factored_blocks(*factors, p, trains(module, "weight"), trains(module, "bias"))
                    total = list(part) if total is None else [x + y for x, y in zip(total, part)]
                    continue
                grads = drop_skipped(rule.grad_sample(module, activation, backprops), call)
            else:  # a rule that does not keep the graph: the generic rule on this call
                names = [n for n in target.param_names if n not in call.skip]
                grads = fallback_grad_sample(call, d, names, create_graph=True)[0] if names else {}
            for local, g in grads.items():
                name = target.param_names[local]
                summed[name] = summed[name] + g if name in summed else g
        for g in summed.values():
            part = _blocks_of_grads(g, p)
            total = list(part) if total is None else [x + y for x, y in zip(total, part)]
        if total is None:
            raise ModelError("none of the selected parameters was reached by the model's forward pass")
        k, undefined = _kernel(tuple(total), d)
        if bool(undefined.any()):
            idx = undefined.nonzero().flatten().tolist()
            warnings.warn(
                f"nnsim_hooks: pair(s) {idx[:10]}{'...' if len(idx) > 10 else ''} have a zero or degenerate gradient "
                "on one side, so their similarity is undefined; it is returned as 0, with no gradient",
                RuntimeWarning,
                stacklevel=4,
            )
        return k
