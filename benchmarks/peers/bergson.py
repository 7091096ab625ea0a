"""bergson: its hook collector (``HookCollectorBase``) and ``GradientProcessor`` with
its default per-module projection (double-sided, p x p numbers per module; p chosen so
the total is about D). bergson is built for language models: its forward hook asserts
inputs of shape ``[N, S, I]``. The adapter first offers every module bergson supports;
if that fails, it keeps only the modules whose input is 3-D (a ViT's block Linears:
the patch embedding, head, norms and bare parameters are then not covered), and if none
is left, the workload's row shows the first error."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .base import Adapter, Unsupported
from .workload import scalar


def _collector_class():
    from bergson.collector.collector import HookCollectorBase

    @dataclass(kw_only=True)
    class BatchCollector(HookCollectorBase):
        """Keeps the current batch's projected gradients in ``mod_grads``."""

        def setup(self):
            pass

        def teardown(self):
            pass

        def backward_hook(self, module, g):
            self.mod_grads[module._name] = self._compute_gradient(module, g)

        def process_batch(self, indices, **kwargs):
            pass

    return BatchCollector


def _three_d_input_modules(model, names, x):
    """Names among ``names`` whose forward input is ``[N, S, I]``."""
    found, hooks = set(), []
    for name in names:
        module = model.get_submodule(name)
        hooks.append(module.register_forward_pre_hook(lambda m, inp, name=name: found.add(name) if inp[0].ndim == 3 else None))
    with torch.no_grad():
        model(x[:2])
    for h in hooks:
        h.remove()
    return [n for n in names if n in found]


class Peer(Adapter):
    package = "bergson"

    def __init__(self, model, workload, dim, seed, device, sample):
        super().__init__(model, workload, dim, seed, device, sample)
        from bergson.collector.collector import HookCollectorBase
        from bergson.gradients import GradientProcessor

        x, y = sample
        every = list(HookCollectorBase.discover_targets(model))
        per_module = max(1, round(math.sqrt(dim / max(1, len(every)))))
        try:
            self._make(GradientProcessor, every, per_module, seed)
            self(x[:2], y[:2])
            self.notes = f"all {len(every)} supported modules"
        except Exception as exc:  # noqa: BLE001 - the first failure explains a partial row
            first = f"{type(exc).__name__}: {str(exc)[:90]}"
            kept = _three_d_input_modules(model, every, x)
            if not kept:
                raise Unsupported(f"rejects the model: {first}") from exc
            per_module = max(1, round(math.sqrt(dim / len(kept))))
            self._make(GradientProcessor, kept, per_module, seed)
            self.notes = f"all modules fail ({first}); kept the {len(kept)} of {len(every)} modules with [N, S, I] inputs"
        self.notes += f", {per_module}x{per_module} per module"

    def _make(self, processor_cls, names, per_module, seed):
        processor = processor_cls(projection_dim=per_module, projection_seed=seed)
        self.collector = _collector_class()(model=self.model, processor=processor, target_modules=set(names))

    def __call__(self, x, y):
        self.collector.mod_grads.clear()
        with self.collector:
            self.model.zero_grad(set_to_none=True)
            scalar(self.model(x), y).sum().backward()
        grads = self.collector.mod_grads
        feats = torch.cat([grads[name].reshape(x.shape[0], -1).float() for name in sorted(grads)], 1)
        if "D =" not in self.notes and x.shape[0] > 2:
            self.notes += f", D = {feats.shape[1]}"
        return feats
