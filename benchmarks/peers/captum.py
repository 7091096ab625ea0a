"""Captum's ``TracInCPFastRandProj``: the gradient of the final fully-connected layer
only, as the outer product of the output gradient and the layer input, each projected
with a Gaussian (``projection_dim = D`` gives ``min(sqrt D, out) x min(sqrt D, in)``
numbers: 10 x 32 = 320 here). Per batch: ``compute_intermediate_quantities``."""

from __future__ import annotations

import os
import tempfile

import torch

from .base import Adapter, Unsupported
from .workload import ScalarSum

FINAL_LAYER = {"resnet18": "fc", "vit_tiny": "head"}


class Peer(Adapter):
    package = "captum"

    def __init__(self, model, workload, dim, seed, device, sample):
        super().__init__(model, workload, dim, seed, device, sample)
        from captum.influence import TracInCPFastRandProj
        from captum.influence._utils.nearest_neighbors import NearestNeighbors

        class NoNeighbours(NearestNeighbors):
            """Influence queries are not timed; skip building Annoy's index (not installed)."""

            def setup(self, data):
                pass

            def get_nearest_neighbors(self, query, k):
                raise NotImplementedError

        if workload not in FINAL_LAYER:
            raise Unsupported(f"no final layer known for {workload}")
        self._dir = tempfile.TemporaryDirectory()
        checkpoint = os.path.join(self._dir.name, "model.pt")
        torch.save(model.state_dict(), checkpoint)

        def load(m, path):
            m.load_state_dict(torch.load(path, map_location=device))
            return 1.0  # learning rate: irrelevant to the cosine

        x, y = sample
        self.tracin = TracInCPFastRandProj(
            model, getattr(model, FINAL_LAYER[workload]), torch.utils.data.TensorDataset(x, y), [checkpoint],
            checkpoints_load_func=load, loss_fn=ScalarSum(), batch_size=x.shape[0],
            nearest_neighbors=NoNeighbours(), projection_dim=dim, seed=seed,
        )
        self.notes = f"last layer (`{FINAL_LAYER[workload]}`) only"

    def __call__(self, x, y):
        feats = self.tracin.compute_intermediate_quantities((x, y))
        if "D =" not in self.notes:
            self.notes += f", D = {feats.shape[1]}"
        return feats

    def close(self):
        self._dir.cleanup()
