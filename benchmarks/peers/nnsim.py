"""nnsim_hooks itself: ``attach(model, sketch_dim=D)`` then ``h.features(x)``."""

from __future__ import annotations

from .base import Adapter
from .workload import scalar


class Peer(Adapter):
    package = "nnsim_hooks"

    def __init__(self, model, workload, dim, seed, device, sample):
        super().__init__(model, workload, dim, seed, device, sample)
        import nnsim_hooks

        self.handle = nnsim_hooks.attach(
            model, output=lambda out, targets: scalar(out, targets), sketch_dim=dim, seed=seed, batch_size=sample[0].shape[0]
        )
        self.notes = f"all parameters, D = {dim}"

    def __call__(self, x, y):
        return self.handle.features(x, targets=y)

    def close(self):
        self.handle.detach()
