"""Per-sample gradients of a parameter from the ops that use it directly.

A generic-rule module would otherwise be re-run whole under ``vmap``: for a ViT whose
``cls_token`` and ``pos_embed`` live on the model itself, that is the whole network
again. But a direct use ``y = op(p, ...)`` whose output has the batch first gives
sample b's gradient as the vector-Jacobian product of that one op with row b of the
output gradient (samples are independent):

- when some other argument has the batch first too (``x + pos_embed``,
  ``layer_norm(x, ..., weight)``), the op is re-run one sample at a time under ``vmap``;
- when none has (``cls_token.expand(B, -1, -1)``), the output gradient is masked to one
  row at a time and the B products are one batched backward of the op.

Whether a first dimension of size B really is the batch cannot be read off shapes, so
the engine checks this split once per module against the full re-run, on a batch of at
least two samples, and only then trusts it (see :class:`~nnsim_hooks.engine.generic.GenericRule`).

With ``create_graph=True`` (the training term) the split keeps the graph: the parameter
is not detached, and the captured arguments and output gradients carry their own graph,
so regular autograd differentiates through the one op's vector-Jacobian products.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from typing import Dict, List, Optional

import torch
from torch.func import vjp, vmap
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..rules.factored import MAX_ELEMENTS
from .param_uses import DirectUse

logger = logging.getLogger(__name__)


def _cotangents(use: DirectUse, d: int) -> torch.Tensor:
    """``[B, d, *out.shape[1:]]``."""
    out = use.output
    rows = [use.grads[j] if j < len(use.grads) and use.grads[j] is not None else torch.zeros_like(out) for j in range(d)]
    return torch.stack(rows, dim=1)


def use_grads(use: DirectUse, d: int, batch: int, create_graph: bool = False) -> Optional[torch.Tensor]:
    """``[B, d, *param.shape]`` for one use, or None when it cannot be split (``create_graph``:
    see the module docstring)."""
    out = use.output
    if out.dim() == 0 or out.shape[0] != batch:
        return None
    if any(t._version != v for t, v in use.versions):
        return None  # an argument was modified in place afterwards
    flat, spec = tree_flatten((use.args, use.kwargs))
    param_slots = [i for i, v in enumerate(flat) if v is use.param]
    batched = [
        i for i, v in enumerate(flat)
        if torch.is_tensor(v) and v is not use.param and v.dim() > 0 and v.shape[0] == batch
    ]
    cotangents = _cotangents(use, d)
    param = use.param if create_graph else use.param.detach()

    def call(p, values):
        vals = list(flat)
        for i in param_slots:
            vals[i] = p
        for i, v in values.items():
            vals[i] = v
        args, kwargs = tree_unflatten(vals, spec)
        return use.func(*args, **kwargs)

    if batched:
        def per_sample(tensors, cot):
            f = lambda p: call(p, {i: t.unsqueeze(0) for i, t in zip(batched, tensors)}).squeeze(0)  # noqa: E731
            _, vjp_fn = vjp(f, param)
            return vmap(vjp_fn)(cot)[0]

        with contextlib.nullcontext() if create_graph else torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="There is a performance drop")
            return vmap(per_sample)([flat[i] for i in batched], cotangents)

    # No batched argument: mask the output gradient to one sample at a time.
    leaf = param if create_graph else param.clone().requires_grad_(True)
    with torch.enable_grad():
        y = call(leaf, {})
    step = max(1, MAX_ELEMENTS // max(1, d * out.numel()))
    rows: List[torch.Tensor] = []
    for start in range(0, batch, step):
        n = min(batch, start + step) - start
        masked = torch.zeros(n, d, *out.shape, dtype=out.dtype, device=out.device)
        idx = torch.arange(n, device=out.device)
        masked[idx, :, start + idx] = cotangents[start : start + n]
        (g,) = torch.autograd.grad(y, leaf, masked.reshape(n * d, *out.shape), retain_graph=True,
                                   create_graph=create_graph, is_grads_batched=True)
        rows.append(g.reshape(n, d, *leaf.shape))
    return torch.cat(rows)


def split_grads(uses: List[DirectUse], params: Dict[str, torch.nn.Parameter], d: int, batch: int, dtype, device,
                create_graph: bool = False):
    """Per-sample gradients of ``params`` (name -> parameter) summed over their direct
    uses; None if some use cannot be split."""
    by_id = {id(p): n for n, p in params.items()}
    out: Dict[str, torch.Tensor] = {n: torch.zeros(batch, d, *p.shape, dtype=dtype, device=device) for n, p in params.items()}
    for use in uses:
        name = by_id.get(id(use.param))
        if name is None:
            continue
        try:
            g = use_grads(use, d, batch, create_graph)
        except Exception as exc:  # no batching rule, shapes that do not split, ...
            logger.debug("cannot split the use of %r by %s: %s", name, getattr(use.func, "__name__", use.func), exc)
            return None
        if g is None:
            return None
        out[name] = out[name] + g.to(dtype)  # not in place: the sum may be in a graph
    return out
