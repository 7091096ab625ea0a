"""The generic rule: torch.func on one module alone.

Used for every module that holds trainable parameters but has no fast rule: bare
``nn.Parameter`` uses (a ViT's ``cls_token`` and ``pos_embed`` live on the model
itself), subclasses whose ``forward`` changes the maths (timm's ``StdConv2d``), and
user modules. The module is re-run on its captured inputs, one sample at a time under
``vmap``, differentiating only its *own* parameters; its children keep their own rules.
If ``vmap`` cannot run the module, a per-sample loop is used instead: slower, same
numbers.

With ``create_graph=True`` (the training term, the paper, §4) the gradients stay in
the autograd graph: the parameters are not detached, the captured inputs and output
gradients carry their own graph, and regular autograd differentiates through
``vmap(vjp(...))``. Active dropout then draws each sample's masks anew
(``randomness="different"``), as documented for the term.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from typing import List, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, vjp, vmap
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..errors import BatchCouplingError, ModelError
from .base import Grads

logger = logging.getLogger(__name__)


def _batch_size(call) -> int:
    for leaf in call.out_leaves:
        if leaf.dim() > 0:
            return leaf.shape[0]
    raise ModelError(f"module '{call.module_name}' returned no tensor with a batch dimension")


def _cotangents(call, d: int, batch: int) -> List[torch.Tensor]:
    """Per output leaf: ``[B, d, *leaf.shape[1:]]`` (zeros where no gradient arrived)."""
    out = []
    for i, leaf in enumerate(call.out_leaves):
        if leaf.dim() == 0 or leaf.shape[0] != batch:
            raise ModelError(
                f"module '{call.module_name}' ({type(call.module).__name__}) has an output of shape "
                f"{tuple(leaf.shape)} whose first dimension is not the batch ({batch}); the generic rule "
                "needs the batch first. Exclude the module with layers=... or register a rule for it."
            )
        rows = []
        for j in range(d):
            g = call.grads[j][i] if j < len(call.grads) else None
            rows.append(torch.zeros_like(leaf) if g is None else g)
        out.append(torch.stack(rows, dim=1))
    return out


def fallback_grad_sample(call, d: int, names: List[str], create_graph: bool = False) -> Tuple[Grads, str]:
    """Per-sample gradients ``[B, d, *shape]`` of the parameters ``names`` (relative to
    the module: its own, or a child's that it uses directly), and which method produced
    them (``vmap`` or ``loop``); ``create_graph``: see the module docstring."""
    module = call.module
    params = [module.get_parameter(n) if create_graph else module.get_parameter(n).detach() for n in names]
    batch = _batch_size(call)
    cotangents = _cotangents(call, d, batch)
    flat_inputs, spec = tree_flatten((call.args, call.kwargs))
    batched = [torch.is_tensor(t) and t.dim() > 0 and t.shape[0] == batch for t in flat_inputs]
    positions = call.out_positions

    def run(param_values, inputs):
        args, kwargs = tree_unflatten(list(inputs), spec)
        values = dict(zip(names, param_values))
        out = functional_call(module, values, tuple(args), kwargs, strict=False)
        leaves, _ = tree_flatten(out)
        return tuple(leaves[k] for k in positions)

    with ComposedLayerNorm() if create_graph else contextlib.nullcontext():
        try:
            outputs, grads = _vmapped(run, params, flat_inputs, batched, cotangents, create_graph)
            method = "vmap"
        except Exception as exc:  # vmap lacks a batching rule, data-dependent control flow, ...
            logger.debug("vmap failed on module %r (%s); using a per-sample loop", call.module_name, exc)
            outputs, grads = _looped(run, params, flat_inputs, batched, cotangents, batch, d, create_graph)
            method = "loop"
    if not (create_graph and _draws_masks(module)):  # other masks give other outputs
        _check_reproduced(call, outputs)
    return dict(zip(names, grads)), method


def _draws_masks(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0 for m in module.modules())


def _check_reproduced(call, outputs) -> None:
    """One sample at a time the module must give what it gave on the whole batch; if not,
    it mixes the samples (batch statistics in a user module) and per-sample gradients are
    not defined for it."""
    for leaf, version, again in zip(call.out_leaves, call.out_versions, outputs):
        if leaf._version != version:
            continue  # modified in place after the call (ReLU(inplace=True)): nothing to compare
        ref = leaf.detach()
        again = again.detach().to(ref.dtype)
        tol = max(1e-3, 8 * torch.finfo(ref.dtype).eps) if ref.is_floating_point() else 0.0
        scale = float(ref.abs().max()) if ref.numel() else 0.0
        if again.shape != ref.shape or not torch.allclose(again, ref, rtol=tol, atol=tol * scale):
            raise BatchCouplingError(
                f"module '{call.module_name}' ({type(call.module).__name__}) gives other outputs when it runs on "
                "one sample at a time than on the whole batch: it mixes the samples (batch statistics, "
                "normalisation across the batch, ...), so per-sample gradients are not defined for it. Make it "
                "compute each sample from that sample alone (for BatchNorm: model.eval())."
            )


def _vmapped(run, params, flat_inputs, batched, cotangents, create_graph: bool = False):
    dims = [0 if b else None for b in batched]
    # Non-tensor leaves cannot go through vmap: pass them via the closure.
    tensor_slots = [i for i, t in enumerate(flat_inputs) if torch.is_tensor(t)]

    def per_sample(tensor_inputs, cots):
        inputs = list(flat_inputs)
        for slot, value in zip(tensor_slots, tensor_inputs):
            inputs[slot] = value.unsqueeze(0) if batched[slot] else value

        def f(*p):
            return tuple(leaf.squeeze(0) for leaf in run(p, inputs))

        primal, vjp_fn = vjp(f, *params)
        return primal, vmap(vjp_fn)(tuple(cots))  # over the d outputs

    tensor_inputs = [flat_inputs[i] for i in tensor_slots]
    in_dims = ([dims[i] for i in tensor_slots], [0] * len(cotangents))
    with contextlib.nullcontext() if create_graph else torch.no_grad(), warnings.catch_warnings():
        # Ops without a batching rule (fused attention) run one sample at a time inside
        # vmap: slower, same numbers. PyTorch warns each time; the coverage report says it.
        warnings.filterwarnings("ignore", message="There is a performance drop")
        randomness = "different" if create_graph else "error"
        return vmap(per_sample, in_dims=in_dims, randomness=randomness)(tensor_inputs, cotangents)


def _looped(run, params, flat_inputs, batched, cotangents, batch, d, create_graph: bool = False):
    results: List[List[torch.Tensor]] = [[] for _ in params]
    primals: List[List[torch.Tensor]] = [[] for _ in cotangents]
    with torch.enable_grad():
        for b in range(batch):
            leaves = [p.clone().requires_grad_(True) for p in params]
            inputs = [t[b : b + 1] if is_b else t for t, is_b in zip(flat_inputs, batched)]
            outs = run(leaves, inputs)
            for k, out in enumerate(outs):
                primals[k].append(out.detach())
            per_output: List[List[torch.Tensor]] = [[] for _ in params]
            for j in range(d):
                cots = [c[b : b + 1, j] for c in cotangents]
                grads = torch.autograd.grad(outs, leaves, cots, retain_graph=create_graph or j < d - 1,
                                            create_graph=create_graph, allow_unused=True)
                for k, (g, p) in enumerate(zip(grads, leaves)):
                    per_output[k].append(torch.zeros_like(p) if g is None else g)
            for k in range(len(params)):
                results[k].append(torch.stack(per_output[k]))
    return tuple(torch.cat(p) for p in primals), [torch.stack(r) for r in results]


class ComposedLayerNorm(TorchFunctionMode):
    """``layer_norm`` written as plain ops while a differentiable re-run goes: in PyTorch 2.x
    the fused kernel's derivatives are wrong when regular autograd differentiates
    through ``vmap(vjp(...))`` of it (values right, outer gradients off by percents; see
    tests/test_pair_similarity.py), while the composed ops are right."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (F.layer_norm, torch.layer_norm):
            return _layer_norm(*args, **kwargs)
        return func(*args, **kwargs)


def _layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5, *rest):
    dims = tuple(range(-len(tuple(normalized_shape)), 0))
    mean = input.mean(dims, keepdim=True)
    centred = input - mean
    out = centred * torch.rsqrt((centred * centred).mean(dims, keepdim=True) + eps)
    if weight is not None:
        out = out * weight
    if bias is not None:
        out = out + bias
    return out
