"""A check, once per batch size, that the batch really is the first dimension everywhere.

Shapes cannot tell a sequence-first tensor ``[T, B, C]`` from a batch-first one when
T == B, nor see a module without parameters that mixes samples (``x - x.mean(0)``).
Running the model on the two halves of the batch separately can: each module's input
and output, and the model's output, must be the halves' ones joined along the first
dimension. A module whose input is not, or one of whose outputs only has the batch's
size first (a recurrent layer's ``h_n`` ``[layers * directions, B, H]`` when
layers * directions == B), is treated like one run on a shared table (its user takes
its parameters), as it is at every other batch size; a model output that is not means
the model couples samples, and per-sample gradients are not defined.

The whole batch's trace is the captured pass's own (recorded by the module stack), so
the check costs two forwards (with gradients on, as the captured pass; nothing is
backpropagated). Tensors are compared through per-sample
summaries (sum and norm), enough to see samples mixed or reordered.

:func:`gradient_mixing` does the same for the gradients reaching the hooked modules'
outputs (three forward+backward passes), which also shows mixing the values hide; the
engine only warns on it (some backward kernels differ by batch size, see engine.py).
"""

from __future__ import annotations

import logging
from typing import Any, List, Optional, Set, Tuple

import torch
import torch.nn as nn
from torch.utils._pytree import tree_flatten

from ..data import batching
from ..errors import BatchCouplingError
from .hooks import copies_to_hook
from ..model_device import model_device_dtype
from ..validation import call_model

logger = logging.getLogger(__name__)


def first_leaf_tensor(value) -> Optional[torch.Tensor]:
    """The first tensor anywhere in a module's (nested) arguments or outputs."""
    for t in tree_flatten(value)[0]:
        if torch.is_tensor(t):
            return t
    return None


def summary(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Per-sample sum and norm ``[rows, 2]`` (float64), or None."""
    if t is None or t.dim() == 0 or t.is_complex():
        return None
    flat = t.detach().reshape(t.shape[0], -1) if t.numel() else t.detach().new_zeros(t.shape[0], 0)  # [0]: an empty bag
    if not flat.is_floating_point():
        flat = flat.double()
    return torch.stack(
        [flat.sum(1, dtype=torch.float64), torch.linalg.vector_norm(flat, dim=1, dtype=torch.float64)], 1
    )


def _joined(whole, first, second, rtol: float = 1e-4, atol: float = 1e-6) -> bool:
    """Are ``whole``'s per-sample summaries the halves' ones joined (``atol`` relative to
    the largest summary)?"""
    if whole is None or first is None or second is None:
        return False
    if first.shape[0] + second.shape[0] != whole.shape[0]:
        return False
    joined = torch.cat([first, second])
    finite = torch.isfinite(whole)
    if not bool((finite == torch.isfinite(joined)).all()):
        return False
    scale = whole[finite].abs().max().item() if bool(finite.any()) else 0.0
    return bool(torch.allclose(joined[finite], whole[finite], rtol=rtol, atol=atol * scale + 1e-9))


def tolerances(model: nn.Module) -> Tuple[float, float]:
    """(rtol, atol relative to the largest summary) for comparing a batch with its halves.

    The same maths on another batch size rounds differently: more so in half precision,
    and on CUDA, where float32 convolutions and matmuls may run in TF32. Mixed samples
    change the numbers far more than that.
    """
    device, dtype = model_device_dtype(model)
    eps = torch.finfo(dtype).eps if dtype.is_floating_point else torch.finfo(torch.float32).eps
    rtol = max(1e-4, 100 * eps)
    if device.type != "cpu" and dtype == torch.float32:
        rtol = max(rtol, 1e-2)
    return rtol, rtol / 100


class Trace:
    """Per module call, in call order: the module, summaries of its first input and of its
    first output (shapes kept to compare layouts), and, with ``leaves``, the shape and
    summary of every output tensor."""

    def __init__(self, outputs: bool = False, leaves: bool = False):
        # [module, input shape, input summary, output shape, output summary, output leaves]
        self.calls: List[list] = []
        self._open: List[list] = []
        self.outputs = outputs  # summarise the first output (only to name the module that mixes samples)
        self.leaves = leaves  # summarise every output tensor, to compare the outputs' layouts

    def enter(self, module: nn.Module, args) -> None:
        t = first_leaf_tensor(args)
        entry = [module, None if t is None else tuple(t.shape), summary(t), None, None, []]
        self.calls.append(entry)
        self._open.append(entry)

    def leave(self, module: nn.Module, output) -> None:
        if not (self._open and self._open[-1][0] is module):
            return
        entry = self._open.pop()
        if self.outputs:
            t = first_leaf_tensor(output)
            entry[3], entry[4] = (None if t is None else tuple(t.shape)), summary(t)
        if self.leaves:
            # Every output, not only the first: a recurrent layer's h_n [layers * directions,
            # B, H] passes for batch-first when layers * directions == B.
            entry[5] = [(tuple(t.shape), summary(t)) for t in tree_flatten(output)[0] if torch.is_tensor(t)]


def _trace(model: nn.Module, inputs: Any, outputs: bool = False):
    trace = Trace(outputs, leaves=True)
    handles = []
    try:
        for module in model.modules():
            handles.append(module.register_forward_pre_hook(trace.enter))
            handles.append(module.register_forward_hook(lambda m, a, o: trace.leave(m, o), always_call=True))
        # With gradients on, as in the captured pass: some layers take another kernel
        # without them (nn.MultiheadAttention's fused fast path), and their rounding
        # differences would read as mixed samples.
        with torch.enable_grad():
            outputs = call_model(model, inputs)
    finally:
        for h in handles:
            h.remove()
    return trace, outputs


def _batch_first(shape, batch: int) -> bool:
    return shape is not None and len(shape) > 0 and shape[0] == batch


def _halves_batch_first(first, second, half: int, rest: int) -> bool:
    """Do the halves' versions of an output have their own batch sizes first?"""
    return (
        torch.is_tensor(first) and torch.is_tensor(second)
        and _batch_first(tuple(first.shape), half) and _batch_first(tuple(second.shape), rest)
    )


def not_batch_first(model: nn.Module, inputs: Any, batch: int, whole: Trace, outputs: Any) -> Set[int]:
    """Ids of the modules some call of which gets an input, or gives an output with the
    batch size first, that is not the halves' ones joined. Raises
    :class:`BatchCouplingError` naming the module that mixes samples."""
    half = batch // 2
    rtol, atol = tolerances(model)
    first, out_first = _trace(model, batching.take(inputs, slice(0, half)))
    second, out_second = _trace(model, batching.take(inputs, slice(half, batch)))
    same_path = [id(c[0]) for c in whole.calls] == [id(c[0]) for c in first.calls] == [id(c[0]) for c in second.calls]
    for a, b, c in zip(tree_flatten(outputs)[0], tree_flatten(out_first)[0], tree_flatten(out_second)[0]):
        if (
            torch.is_tensor(a)
            and _batch_first(tuple(a.shape), batch)
            and _halves_batch_first(b, c, half, batch - half)  # else only its size is the batch's (h_n [L, B, H])
            and not _joined(summary(a), summary(b), summary(c), rtol, atol)
        ):
            # Failure path: trace again, outputs included, to name the module.
            traces = [_trace(model, batching.take(inputs, sl), outputs=True)[0]
                      for sl in (slice(0, batch), slice(0, half), slice(half, batch))]
            raise BatchCouplingError(_mixing_message(model, *traces, batch, same_path))
    if not same_path:
        logger.debug("layout check skipped: the halves took another path through the model")
        return set()
    bad: Set[int] = set()
    for (module, shape, a, *_, outs), (_, _, b, *_, outs_b), (_, _, c, *_, outs_c) in zip(
        whole.calls, first.calls, second.calls
    ):
        if _batch_first(shape, batch) and not _joined(a, b, c, rtol, atol):
            bad.add(id(module))
        elif not _outputs_joined(outs, outs_b, outs_c, batch, rtol, atol):
            bad.add(id(module))
    return bad


def _outputs_joined(whole, first, second, batch: int, rtol: float, atol: float) -> bool:
    """Are a call's outputs that have the batch size first the halves' ones joined? One
    whose size only happens to be the batch's (h_n ``[layers * directions, B, H]`` when
    layers * directions == B) is not: in the halves it keeps that size."""
    if not (len(whole) == len(first) == len(second)):
        return True  # another set of outputs in the halves: nothing to compare
    return all(
        not _batch_first(shape, batch) or (shape[1:] == shape_b[1:] == shape_c[1:] and _joined(a, b, c, rtol, atol))
        for (shape, a), (shape_b, b), (shape_c, c) in zip(whole, first, second)
    )


def _mixing_message(model, whole, first, second, batch, same_path) -> str:
    culprit = None
    rtol, atol = tolerances(model)
    if same_path:
        for (module, shape, a, oshape, out, _), (_, _, b, _, ob, _), (_, _, c, _, oc, _) in zip(
            whole.calls, first.calls, second.calls
        ):
            if (
                _batch_first(shape, batch)
                and _joined(a, b, c, rtol, atol)
                and _batch_first(oshape, batch)
                and not _joined(out, ob, oc, rtol, atol)
            ):
                culprit = module  # the innermost such module is the last one to start
                if not any(True for _ in module.children()):
                    break
    names = {id(m): n for n, m in model.named_modules()}
    where = f"module '{names.get(id(culprit), '?')}' ({type(culprit).__name__})" if culprit is not None else "some layer"
    return (
        f"{where} mixes the samples: its output for a sample changes when the other samples of the batch "
        "change (a normalisation or a mean over the batch, for example), so per-sample gradients are not "
        "defined. Use per-sample layers, or call model.eval() for BatchNorm."
    )


# -- the same check on gradients ------------------------------------------------------
#
# Some layers mix samples in a way the forward values cannot show: timm's csatv2 attends
# across the batch right after a LayerNorm over one feature, whose output is the same for
# every sample, so every value is the halves' values joined while each sample's gradient
# still flows into the other samples' activations. The gradients arriving at the hooked
# modules' outputs show it: for per-sample maths they too are the halves' ones joined.


def _output_gradients(model: nn.Module, modules: List[nn.Module], inputs: Any, targets: Any, differentiate,
                      weights: torch.Tensor):
    """Per call of ``modules`` (in call order): (module, shape, summary of the gradient of
    ``sum_i weights_i f_i`` with respect to the call's first output), f the first
    differentiated output row."""
    n = weights.shape[0]
    records: List[list] = []
    handles = []

    def forward_hook(module, args, output):
        flat, spec = tree_flatten(output)
        positions = [k for k, t in enumerate(flat) if torch.is_tensor(t) and t.requires_grad]
        if not positions:
            return None
        k = positions[0]
        flat, replaced = copies_to_hook(flat, spec, positions)  # as capture hooks them
        record = [module, tuple(flat[k].shape), None]
        records.append(record)

        def tensor_hook(grad, record=record):
            record[2] = summary(grad)

        flat[k].register_hook(tensor_hook)
        return replaced

    try:
        for module in modules:
            handles.append(module.register_forward_hook(forward_hook))
        with torch.enable_grad():
            outputs = call_model(model, inputs)
            values = differentiate(outputs, targets, n)
            first_row = values if values.dim() == 1 else values[:, 0]
            # Differentiate for the parameters (not the hooked outputs, which later in-place
            # ops may have replaced), so that backward passes every hooked output.
            params = list({id(p): p for m in modules for p in m.parameters(recurse=False) if p.requires_grad}.values())
            torch.autograd.grad((first_row * weights.to(first_row)).sum(), params, allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    return records


def gradient_mixing(model: nn.Module, modules: List[nn.Module], inputs: Any, targets: Any, batch: int,
                    differentiate, skip: Set[int]) -> Optional[str]:
    """The name of the first of ``modules`` whose output gradient for the whole batch is
    not the two halves' joined (samples mixed in the backward only), or None."""
    half = batch // 2
    # Random weights per sample: a plain sum is blind to mixing that shares a quantity
    # out evenly (the gradients of a batch mean still add up to the same).
    weights = torch.rand(batch, generator=torch.Generator().manual_seed(0), dtype=torch.float64) + 0.5
    runs = [
        _output_gradients(model, modules, batching.take(inputs, sl), batching.take(targets, sl), differentiate,
                          weights[sl])
        for sl in (slice(0, batch), slice(0, half), slice(half, batch))
    ]
    whole, first, second = runs
    if not (len(whole) == len(first) == len(second)) or any(
        a[0] is not b[0] or a[0] is not c[0] for a, b, c in zip(whole, first, second)
    ):
        logger.debug("gradient layout check skipped: the halves took another path through the model")
        return None
    names = {id(m): n for n, m in model.named_modules()}
    rtol, atol = tolerances(model)
    rtol, atol = max(1e-3, 2 * rtol), max(1e-4, 2 * atol)
    for (module, shape, g), (_, shape_a, a), (_, shape_b, b) in zip(whole, first, second):
        if id(module) in skip or g is None or a is None or b is None:
            continue
        if not (_batch_first(shape, batch) and _batch_first(shape_a, half) and _batch_first(shape_b, batch - half)):
            continue
        # Norms only (the sum of a gradient can cancel), and looser than for values: a
        # float32 backward through a batch of another size rounds differently. Mixing
        # moves the norms far more.
        if not _joined(g[:, 1:], a[:, 1:], b[:, 1:], rtol, atol):
            return names.get(id(module), "?")
    return None
