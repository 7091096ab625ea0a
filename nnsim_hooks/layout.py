"""A check, once per batch size, that the batch really is the first dimension everywhere.

Shapes cannot tell a sequence-first tensor ``[T, B, C]`` from a batch-first one when
T == B, nor see a module without parameters that mixes samples (``x - x.mean(0)``).
Running the model on the whole batch and on its two halves separately can: each
module's input, and the model's output, must be the two halves' joined along the first
dimension. A module whose input is not is treated like one run on a shared table (its
user takes its parameters); an output that is not means the model couples samples, and
per-sample gradients are not defined.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Set, Tuple

import torch
import torch.nn as nn
from torch.utils._pytree import tree_flatten

from . import batching
from .errors import BatchCouplingError
from .validation import call_model

logger = logging.getLogger(__name__)


def _first_tensor(args) -> Optional[torch.Tensor]:
    for t in tree_flatten(args)[0]:
        if torch.is_tensor(t):
            return t
    return None


def _joined(whole: torch.Tensor, first: torch.Tensor, second: torch.Tensor) -> bool:
    """Is ``whole`` the two halves joined along the first dimension?"""
    if whole.dim() == 0 or first.dim() != whole.dim() or second.dim() != whole.dim():
        return False
    if first.shape[1:] != whole.shape[1:] or second.shape[1:] != whole.shape[1:]:
        return False
    if first.shape[0] + second.shape[0] != whole.shape[0]:
        return False
    joined = torch.cat([first, second])
    if not whole.is_floating_point():
        return bool(torch.equal(joined, whole))
    finite = whole[torch.isfinite(whole)]
    scale = finite.abs().max().item() if finite.numel() else 0.0
    return bool(torch.allclose(joined, whole, rtol=1e-4, atol=1e-5 * scale + 1e-7, equal_nan=True))


def _trace(model: nn.Module, inputs: Any):
    """Every module call's first tensor input and output, in call order, and the outputs."""
    calls: List[List[Any]] = []  # [module, first input, first output]
    stack: List[List[Any]] = []
    handles = []

    def pre(m, args):
        entry = [m, _first_tensor(args), None]
        calls.append(entry)
        stack.append(entry)

    def post(m, args, output):
        if stack and stack[-1][0] is m:
            stack.pop()[2] = _first_tensor(output)

    try:
        for module in model.modules():
            handles.append(module.register_forward_pre_hook(pre))
            handles.append(module.register_forward_hook(post, always_call=True))
        with torch.no_grad():
            outputs = call_model(model, inputs)
    finally:
        for h in handles:
            h.remove()
    return calls, outputs


def not_batch_first(model: nn.Module, inputs: Any, batch: int) -> Set[int]:
    """Ids of the modules some call of which gets an input that is not its two halves'
    inputs joined. Raises :class:`BatchCouplingError` when the model's outputs are not."""
    half = batch // 2
    whole, outputs = _trace(model, inputs)
    first, out_first = _trace(model, batching.take(inputs, slice(0, half)))
    second, out_second = _trace(model, batching.take(inputs, slice(half, batch)))
    same_path = [id(c[0]) for c in whole] == [id(c[0]) for c in first] == [id(c[0]) for c in second]
    batch_first = lambda t: t is not None and t.dim() > 0 and t.shape[0] == batch  # noqa: E731
    leaves = zip(tree_flatten(outputs)[0], tree_flatten(out_first)[0], tree_flatten(out_second)[0])
    for a, b, c in leaves:
        if torch.is_tensor(a) and batch_first(a) and not _joined(a, b, c):
            raise BatchCouplingError(_mixing_message(model, whole, first, second, batch_first) if same_path else (
                "the model's output for a sample changes when the other samples of the batch change: some layer "
                "mixes the samples, so per-sample gradients are not defined."))
    if not same_path:
        logger.debug("layout check skipped: the halves took another path through the model")
        return set()
    bad: Set[int] = set()
    for (module, a, _), (_, b, _), (_, c, _) in zip(whole, first, second):
        if not batch_first(a):
            continue  # no batch first there at all: the provenance and shape checks handle it
        if b is None or c is None or not _joined(a, b, c):
            bad.add(id(module))
    return bad


def _mixing_message(model, whole, first, second, batch_first) -> str:
    """Name the first module whose input is per sample but whose output is not."""
    names = {id(m): n for n, m in model.named_modules()}
    culprit = None
    for (module, a, out), (_, b, out_b), (_, c, out_c) in zip(whole, first, second):
        ok_in = batch_first(a) and b is not None and c is not None and _joined(a, b, c)
        bad_out = batch_first(out) and (out_b is None or out_c is None or not _joined(out, out_b, out_c))
        if ok_in and bad_out:
            culprit = module  # keep the innermost (last to start among those enclosing the mix)
            if not any(True for _ in module.children()):
                break
    where = f"module '{names.get(id(culprit), '?')}' ({type(culprit).__name__})" if culprit is not None else "some layer"
    return (
        f"{where} mixes the samples: its output for a sample changes when the other samples of the batch "
        "change (a normalisation or a mean over the batch, for example), so per-sample gradients are not "
        "defined. Use per-sample layers, or call model.eval() for BatchNorm."
    )
