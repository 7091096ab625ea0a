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
  ``nn.MultiheadAttention``'s): the generic rule with the graph kept, from the ops that
  use the parameters directly once that split has matched a re-run
  (:mod:`nnsim_hooks.engine.generic`), else the torch.func re-run of that module alone,
  per sample under ``vmap`` (:func:`~nnsim_hooks.rules.fallback.fallback_grad_sample`).

Each pair's kernels ``K(a,a)``, ``K(a,b)``, ``K(b,b)`` are the blocks of one ``[2d, 2d]``
matrix, summed over the layers. This module holds only that maths on top of the
per-sample quantities.

A single pair (the authors' setting, one per minibatch) with no dropout layer active
takes their double back-propagation instead, one input at a time: for two inputs it
costs less than the hooks' fixed costs, and gives the same numbers.

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
import torch.nn as nn

from ..data import batching
from ..engine.units import drop_skipped, fast_call
from ..errors import InputError, ModelError
from ..exact.kernels import SINGULAR_RTOL
from ..rules.base import trains
from ..rules.fallback import fallback_grad_sample
from ..model_device import model_device_dtype
from ..validation import batch_size_of, call_model, check_inputs, check_targets


def _math_attention():
    """The math kernel for scaled_dot_product_attention (the fused ones have no double backward)."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - torch < 2.3
        return contextlib.nullcontext()
    return sdpa_kernel(SDPBackend.MATH)


# -- per-layer blocks ------------------------------------------------------------------
#
# Each pair's kernels are the blocks of one ``[P, 2d, 2d]`` matrix, rows and columns
# ``(a, output j)`` then ``(b, output j)``: ``K(a,a)``, ``K(a,b)`` / ``K(b,a)``, ``K(b,b)``.
# Computing the whole matrix in one batched product per layer costs a third more
# arithmetic than the three blocks apart, but few ops and no slices of the captured
# tensors, whose backward (a zero-filled copy each) dominated the double backward.


def _by_pair(x: torch.Tensor, p: int) -> torch.Tensor:
    """``[2P, ...]`` (all a, then all b) -> ``[P, 2, ...]``."""
    return x.reshape(2, p, *x.shape[1:]).transpose(0, 1)


def _gram_of_grads(grads: List[torch.Tensor], p: int) -> torch.Tensor:
    """``[P, 2d, 2d]`` from per-sample gradients ``[2P, d, ...]`` (all of them at once)."""
    d = grads[0].shape[1]
    flat = torch.cat([g.reshape(2 * p, d, -1) for g in grads], dim=-1)
    x = _by_pair(flat, p).reshape(p, 2 * d, -1)
    return x @ x.transpose(1, 2)


def _ghost_gram(cols: torch.Tensor, rows: torch.Tensor, p: int) -> torch.Tensor:
    """``[P, 2d, 2d]`` for the weight ``sum_u rows_u cols_u^T`` of ``cols`` ``[2P, c, L]`` and
    ``rows`` ``[d, 2P, r, L]``: ``sum_{u,v} (a_u . a'_v)(delta_u . delta'_v)`` over the
    positions of both samples of each pair (``2L`` of them)."""
    d, _, r, length = rows.shape
    x = _by_pair(cols, p).transpose(1, 2).reshape(p, cols.shape[1], 2 * length)  # [P, c, 2L]
    aa = x.transpose(1, 2) @ x  # [P, 2L, 2L]
    y = _by_pair(rows.transpose(0, 1), p)  # [P, 2, d, r, L]
    y = y.permute(0, 2, 3, 1, 4).reshape(p, d, r, 2 * length)  # [P, d, r, 2L]
    if d == 1:
        dd = y[:, 0].transpose(1, 2) @ y[:, 0]  # [P, 2L, 2L]
        return (aa * dd).reshape(p, 2, length, 2, length).sum((2, 4))
    dd = torch.einsum("pjru,pkrv->pjkuv", y, y).reshape(p, d, d, 2, length, 2, length)
    out = torch.einsum("psutv,pjksutv->psjtk", aa.reshape(p, 2, length, 2, length), dd)
    return out.reshape(p, 2 * d, 2 * d)


def _factored_parts(cols: torch.Tensor, rows: torch.Tensor, p: int, weight: bool, bias: bool
                    ) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """A layer whose weight gradient is ``sum_u delta_u a_u^T`` (``cols`` ``[2P, c, L]``,
    ``rows`` ``[d, 2P, r, L]``): ``(grams [P, 2d, 2d], per-sample gradients [2P, d, ...])``,
    the ghost products when they cost less than the per-sample weight gradients."""
    d, _, r, length = rows.shape
    c = cols.shape[1]
    grads = [rows.sum(-1).transpose(0, 1)] if bias else []  # [2P, d, r]
    if not weight:
        return [], grads
    ghost_cost = 4 * p * length * length * (c + d * d * r)
    dense_cost = 2 * p * d * length * r * c + 4 * p * d * d * r * c
    if ghost_cost <= dense_cost:
        return [_ghost_gram(cols, rows, p)], grads
    return [], grads + [torch.einsum("jbru,bcu->bjrc", rows, cols)]  # per-sample weight gradients


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


def _kernel(gram: torch.Tensor, d: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """k ``[P]`` from the pairs' ``[P, 2d, 2d]`` kernels and the mask of undefined pairs (k = 0
    there, no gradient)."""
    kaa, kbb, kab = gram[:, :d, :d], gram[:, d:, d:], gram[:, :d, d:]
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
        self._dropouts: Optional[List[nn.Module]] = None

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
            if n_a == 1 and not self._draws_dropout_masks():
                gram, d = self._one_pair(inputs, targets)
            else:
                gram, d = self._compute(inputs, targets, n_a)
            k = self._similarity(gram, d)
        return k if differentiable else k.detach()

    def _draws_dropout_masks(self) -> bool:
        if self._dropouts is None:
            model = self.handle.engine.model
            self._dropouts = [m for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
        return any(m.training and m.p > 0 for m in self._dropouts)

    def _one_pair(self, inputs, targets) -> Tuple[torch.Tensor, int]:
        """A single pair (the authors' setting): their double back-propagation, one input at
        a time, ``autograd.grad(f(x), params, create_graph=True)``. For two inputs it costs
        less than the hooks' fixed costs; the numbers are the same. Not taken while a
        dropout layer is active: the documented masks are those of one forward of both."""
        engine = self.handle.engine
        runner, model = engine.passes, engine.model
        check_inputs(model, inputs)
        targets = check_targets(targets, 2, model_device_dtype(model)[0])
        runner.check_model_state(create_graph=True)
        params = list({id(q): q for t in engine.targets.values() for q in map(t.module.get_parameter, t.param_names)
                       }.values())
        rows = []
        for i in range(2):
            t = None if targets is None else targets[i : i + 1]
            values, _ = runner.values_of(call_model(model, batching.take(inputs, slice(i, i + 1))), t, 1)
            for j in range(values.shape[1]):
                grads = torch.autograd.grad(values[0, j], params, create_graph=True, allow_unused=True)
                rows.append(torch.cat([(torch.zeros_like(q) if g is None else g).reshape(-1)
                                       for q, g in zip(params, grads)]))
        jac = torch.stack(rows)  # [2d, n]: a's rows, then b's
        return (jac @ jac.T).unsqueeze(0), len(rows) // 2

    def _similarity(self, gram: torch.Tensor, d: int) -> torch.Tensor:
        k, undefined = _kernel(gram, d)
        if bool(undefined.any()):
            idx = undefined.nonzero().flatten().tolist()
            warnings.warn(
                f"nnsim_hooks: pair(s) {idx[:10]}{'...' if len(idx) > 10 else ''} have a zero or degenerate gradient "
                "on one side, so their similarity is undefined; it is returned as 0, with no gradient",
                RuntimeWarning,
                stacklevel=4,
            )
        return k

    def _compute(self, inputs, targets, p: int) -> Tuple[torch.Tensor, int]:
        """P pairs in one captured pass: the pairs' ``[P, 2d, 2d]`` kernels, and d."""
        engine = self.handle.engine
        captured = engine.backprop(inputs, targets, create_graph=True)
        d = captured.d
        plan = engine.passes.plan
        counts = plan.call_counts(captured.calls)
        grams: List[torch.Tensor] = []  # [P, 2d, 2d] each
        summed: Dict[str, torch.Tensor] = {}  # per-sample gradients [2P, d, ...] by the model's names
        materialised: List[torch.Tensor] = []  # per-sample gradients of a factored layer's call
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
                    part, grads_part = _factored_parts(*factors, p, trains(module, "weight"), trains(module, "bias"))
                    grams += part
                    materialised += grads_part
                    continue
                grads = drop_skipped(rule.grad_sample(module, activation, backprops), call)
            else:  # a rule that does not keep the graph: the generic rule on this call
                names = [n for n in target.param_names if n not in call.skip]
                grads = fallback_grad_sample(call, d, names, create_graph=True)[0] if names else {}
            for local, g in grads.items():
                name = target.param_names[local]
                summed[name] = summed[name] + g if name in summed else g
        materialised += summed.values()
        if materialised:
            grams.append(_gram_of_grads(materialised, p))
        if not grams:
            raise ModelError("none of the selected parameters was reached by the model's forward pass")
        gram = grams[0] if len(grams) == 1 else torch.stack(grams).sum(0)
        return gram, d
