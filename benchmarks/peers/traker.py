"""TRAK (``traker``): its functional (vmap) gradient computer and its projector.

On CPU TRAK uses ``BasicProjector`` with a normal projection (what ``TRAKer`` picks for
``device="cpu"``), which regenerates the ``p x 100`` blocks of the Gaussian matrix every
batch. On CUDA it uses ``CudaProjector`` (needs the ``fast_jl`` extension) and falls back
to ``BasicProjector`` as ``TRAKer`` does. The model output function is our scalar.
"""

from __future__ import annotations

import torch

from .base import Adapter
from .workload import scalar


class Peer(Adapter):
    package = "traker"
    slow = True

    def __init__(self, model, workload, dim, seed, device, sample):
        super().__init__(model, workload, dim, seed, device, sample)
        from trak.gradient_computers import FunctionalGradientComputer
        from trak.modelout_functions import AbstractModelOutput
        from trak.projectors import BasicProjector, CudaProjector, ProjectionType

        class ScalarOutput(AbstractModelOutput):
            def __init__(self):
                super().__init__()

            def get_output(self, model, weights, buffers, image, label):
                logits = torch.func.functional_call(model, (weights, buffers), image.unsqueeze(0))
                return scalar(logits, label.unsqueeze(0)).sum()

            def get_out_to_loss_grad(self, model, weights, buffers, batch):  # TRAK's scoring step, not timed here
                raise NotImplementedError

        grad_dim = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self.computer = FunctionalGradientComputer(model, ScalarOutput(), grad_dim, torch.float32, device)
        projector = None
        if str(device).startswith("cuda"):
            try:
                projector = CudaProjector(grad_dim, dim, seed, ProjectionType.rademacher, device, max_batch_size=32)
                self.notes = "CudaProjector (fast_jl), rademacher"
            except (ImportError, ModuleNotFoundError, RuntimeError, ValueError) as exc:
                self.notes = f"CudaProjector unavailable ({type(exc).__name__}); "
        if projector is None:
            projector = BasicProjector(grad_dim, dim, seed, ProjectionType.normal, device, dtype=torch.float32)
            self.notes += "BasicProjector, normal"
        self.projector = projector
        self._projector_args = (grad_dim, dim, device)
        self.notes += f"; vmap gradients; all parameters, D = {dim}"

    def __call__(self, x, y):
        self._grads = self.computer.compute_per_sample_grad((x, y))
        return self.projector.project(self._grads, model_id=0)

    def reseeded(self, seed):
        from trak.projectors import BasicProjector, ProjectionType

        grad_dim, dim, device = self._projector_args
        projector = self.projector
        if isinstance(projector, BasicProjector):
            projector = BasicProjector(grad_dim, dim, seed, ProjectionType.normal, device, dtype=torch.float32)
        else:
            projector.seed = seed
        return projector.project(self._grads, model_id=0)
