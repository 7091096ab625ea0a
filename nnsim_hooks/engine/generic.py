"""Per-sample gradients of a module on the generic rule, from all its calls of one pass.

From the direct uses of its parameters (:mod:`nnsim_hooks.capture.direct_uses`) once that
split has matched a full re-run for this module, else by re-running each call under
torch.func (:func:`~nnsim_hooks.rules.fallback.fallback_grad_sample`). Both keep the
graph for the training term (``Pass.create_graph``): for a ViT whose ``cls_token`` and
``pos_embed`` live on the model itself, the split differentiates two ops instead of the
whole network re-run per sample.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Dict, List

import torch

from ..capture.direct_uses import split_grads
from ..capture.hooks import LayerCall
from ..capture.targets import Target
from ..rules.base import Grads
from ..rules.fallback import ComposedLayerNorm, fallback_grad_sample
from .captured_pass import Pass

logger = logging.getLogger(__name__)


class GenericRule:
    def __init__(self):
        #: how the generic rule ran for each module: "vmap", "loop" or "direct uses"
        self.methods: Dict[str, str] = {}
        #: per module: True once its direct-use split matched a full re-run
        self._split_checked: Dict[str, bool] = {}

    def grads(self, target: Target, calls: List[LayerCall], p: Pass) -> Grads:
        """``{local name: [B, d, *shape]}`` for ``target`` over ``calls``."""
        names = list(target.param_names)
        params = {n: target.module.get_parameter(n) for n in names}
        splittable = (
            target.rule is None
            and not any(id(q) in p.unsplittable for q in params.values())
            and not any(call.skip for call in calls)
        )
        checked = self._split_checked.get(target.name)
        if splittable and checked:
            # The fused layer_norm's double derivatives through vmap(vjp) are wrong (see fallback.py).
            with ComposedLayerNorm() if p.create_graph else contextlib.nullcontext():
                split = split_grads(p.uses, params, p.d, p.batch, p.values.dtype, p.values.device, p.create_graph)
            if split is not None:
                self.methods[target.name] = "direct uses"
                return split
        out: Grads = {}
        for call in calls:
            wanted = [n for n in names if n not in call.skip]
            if not wanted:
                continue
            grads, method = fallback_grad_sample(call, p.d, wanted, create_graph=p.create_graph)
            self.methods[target.name] = method
            for n, g in grads.items():
                out[n] = out[n] + g if n in out else g
        if splittable and checked is None and p.batch >= 2:
            with torch.no_grad():  # values only
                split = split_grads(p.uses, params, p.d, p.batch, p.values.dtype, p.values.device)
            if split is not None:
                ok = all(_close(split[n], out[n]) for n in out)
                self._split_checked[target.name] = ok
                logger.debug("direct-use split for %r %s the full re-run", target.name, "matches" if ok else "differs from")
        return out


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the split ``a`` matches the re-run ``b``: a wrong split is off by O(1); the
    tolerance grows with the rounding of the coarser dtype (8 bits for a bfloat16 model,
    whose re-run is bfloat16 where the split sums in float32)."""
    eps = max(torch.finfo(a.dtype).eps, torch.finfo(b.dtype).eps) if a.is_floating_point() else 0.0
    rtol = max(1e-3, 8 * eps)
    a, b = a.double(), b.double()
    scale = b.abs().max().item() if b.numel() else 0.0
    return bool(torch.allclose(a, b, rtol=rtol, atol=max(1e-5, rtol / 100) * max(scale, 1e-12) + 1e-12))
