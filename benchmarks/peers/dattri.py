"""dattri: its ``AttributionTask`` gradient function (vmap over torch.func) and its
``random_project``, as its TRAK and TracIn attributors use them (a projector is made
per batch there too)."""

from __future__ import annotations

import torch

from .base import Adapter
from .workload import scalar


class Peer(Adapter):
    package = "dattri"
    slow = True

    def __init__(self, model, workload, dim, seed, device, sample):
        super().__init__(model, workload, dim, seed, device, sample)
        from dattri.task import AttributionTask

        def target(params, data):
            image, label = data
            logits = torch.func.functional_call(model, params, image.unsqueeze(0))
            return scalar(logits, label.unsqueeze(0)).sum()

        self.task = AttributionTask(loss_func=target, model=model, checkpoints=model.state_dict())
        self.grad_fn = self.task.get_grad_target_func(in_dims=(None, 0))
        self.params, _ = self.task.get_param(ckpt_idx=0)
        self.notes = f"vmap gradients, random_project normal; all parameters, D = {dim}"

    def __call__(self, x, y):
        self._grads = self.grad_fn(self.params, (x, y))
        return self._project(self._grads, self.seed)

    def reseeded(self, seed):
        return self._project(self._grads, seed)

    def _project(self, grads, seed):
        from dattri.func.projection import BasicProjector, ProjectionType, random_project

        try:
            project = random_project(
                grads, grads.shape[0], proj_dim=self.dim, proj_max_batch_size=32, proj_seed=seed,
                proj_type="normal", device=self.device,
            )
        except (ImportError, ModuleNotFoundError) as exc:  # CUDA without the fast_jl extension
            if "BasicProjector" not in self.notes:
                self.notes += f"; CudaProjector unavailable ({type(exc).__name__}), BasicProjector"
            projector = BasicProjector(grads.shape[1], self.dim, seed, ProjectionType.normal, torch.device(self.device))
            return projector.project(grads, ensemble_id=0)
        return project(grads, ensemble_id=0)
